"""--context-length is clamped to the positions the model supports (beyond
its rotary table the output would be silently wrong), unless --rope-scaling
extends them; a rope-scaled model generates transformers' tokens for the
same rope configuration."""

import logging

import torch

import pyvlm
from pyvlm.scheduling.types import SamplingParams
from pyvlm.entrypoints.startup import with_rope_scaling
from tests.hf_reference import greedy_tokens, image_processor_for

LINEAR_4X = {"rope_type": "linear", "factor": 4.0}


def engine(checkpoint, **args):
    return pyvlm.Engine(model=str(checkpoint), device="cpu", page_size=4, max_total_tokens=2048,
                        **args)


def test_a_context_length_beyond_the_model_is_clamped(tiny_checkpoint_qwen2, caplog):
    with caplog.at_level(logging.WARNING, logger="pyvlm.engine"):
        with engine(tiny_checkpoint_qwen2, context_length=10000) as eng:
            assert eng.state.context_length == 4096  # the tiny model's max_position_embeddings
    assert "10000" in caplog.text and "4096" in caplog.text and "--rope-scaling" in caplog.text
    with engine(tiny_checkpoint_qwen2, context_length=1000) as eng:
        assert eng.state.context_length == 1000


def test_rope_scaling_extends_the_positions(tiny_checkpoint_qwen2):
    with engine(tiny_checkpoint_qwen2, context_length=10000, rope_scaling=LINEAR_4X) as eng:
        assert eng.state.context_length == 10000
        table = eng.state.model.language_model.rotary_emb.cos_sin_cache
        assert table.shape[0] == 4 * 4096


def test_a_rope_scaled_model_matches_transformers(tiny_checkpoint_qwen2):
    from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_checkpoint_qwen2)
    scaled = with_rope_scaling(config.to_dict(), LINEAR_4X)["text_config"]
    config.text_config.rope_parameters = scaled["rope_parameters"]
    config.text_config.max_position_embeddings = scaled["max_position_embeddings"]
    hf_model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_checkpoint_qwen2, config=config, dtype=torch.float32).eval()
    with engine(tiny_checkpoint_qwen2, rope_scaling=LINEAR_4X, dtype="float32") as eng:
        ids = eng.builder.from_prompt("the cat sat on the mat " * 6, [], SamplingParams()).prompt_ids
        ours = eng.generate(ids, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    with engine(tiny_checkpoint_qwen2, dtype="float32") as eng:
        plain = eng.generate(ids, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    processor = image_processor_for({})
    assert ours["output_ids"] == greedy_tokens(hf_model, processor, ids, [], 12)
    assert ours["output_ids"] != plain["output_ids"]  # the scaling changed the answer


def test_rope_scaling_merges_over_the_checkpoints_parameters():
    config = {"text_config": {"rope_theta": 5e5, "max_position_embeddings": 1000,
                              "rope_scaling": {"type": "dynamic", "factor": 2.0}}}
    text = with_rope_scaling(config, {"rope_type": "linear", "factor": 3.0})["text_config"]
    assert text["rope_parameters"] == {"rope_theta": 5e5, "factor": 3.0, "rope_type": "linear",
                                       "original_max_position_embeddings": 1000}
    assert text["max_position_embeddings"] == 3000 and "rope_scaling" not in text
    flat = with_rope_scaling({"max_position_embeddings": 8}, {"rope_type": "linear",
                                                              "factor": 2})
    assert flat["max_position_embeddings"] == 16


def test_mistrals_sliding_window_bounds_the_context(tiny_checkpoint_llava_next_mistral, tmp_path,
                                                    caplog):
    """pyvlm's attention is full: within Mistral's sliding window that is
    what the model computes, past it it would not be, so the window is the
    context and a longer prompt is refused naming it."""
    import json
    import shutil

    import pytest

    checkpoint = tmp_path / "windowed"
    shutil.copytree(tiny_checkpoint_llava_next_mistral, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["sliding_window"] = 64
    (checkpoint / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="pyvlm.engine"):
        with engine(checkpoint) as eng:
            assert eng.state.context_length == 64
            with pytest.raises(ValueError, match="context length of 64"):
                eng.generate("cat " * 80, {"max_new_tokens": 2})
            assert eng.generate("cat " * 10, {"max_new_tokens": 2})["output_ids"]
    assert "sliding window" in caplog.text
