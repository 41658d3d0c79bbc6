"""The engine on a GPU: the same greedy tokens as transformers (float32, tiny
checkpoints), chunked prefill and prefix-cache hits included, and a
bfloat16 run end to end."""

import pytest
import torch

from tests.entrypoints.test_engine_parity import (GREEDY, Reference, assert_same_tokens,
                                                  engine_for, generate_all, make_prompts)

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def hf_model_cuda(tiny_checkpoint_qwen2):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_checkpoint_qwen2, dtype=torch.float32).to("cuda").eval()


@pytest.mark.parametrize("server_args", [{}, {"chunked_prefill_size": 16}])
def test_cuda_engine_matches_transformers(tiny_checkpoint_qwen2, hf_model_cuda, server_args):
    prompts = make_prompts(seed=1)
    with engine_for(tiny_checkpoint_qwen2, device="cuda", max_total_tokens=8192,
                    **server_args) as engine:
        reference = Reference(hf_model_cuda, engine)
        first = generate_all(engine, prompts)
        again = generate_all(engine, prompts)  # every prompt now hits the prefix cache
    assert_same_tokens(first, prompts, reference)
    assert_same_tokens(again, prompts, reference)
    assert all(r["meta_info"]["cached_tokens"] > 0 for r in again)


def test_cuda_engine_runs_in_bfloat16(tiny_checkpoint_llama):
    prompts = make_prompts(seed=3)
    with engine_for(tiny_checkpoint_llama, device="cuda", dtype="bfloat16",
                    max_total_tokens=8192) as engine:
        results = generate_all(engine, prompts)
    assert all(len(r["output_ids"]) == GREEDY["max_new_tokens"] for r in results)
