"""Fixtures the runner's test modules share."""

import pytest
import torch


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    """transformers' float32 model of the requesting module's `checkpoint`."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
