"""The tiny Qwen2-VL / Qwen2.5-VL checkpoints load in transformers as the
released repositories do: same weights as the in-memory models, the weight
names of each layout, the special token ids the configs use, the chat
template's vision tokens and the image processor's pixel budget."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.tiny_qwen2_vl import (CHAT_TEMPLATE, IM_END_ID, IMAGE_PAD_ID, MAX_PIXELS, MERGE_SIZE,
                                 MIN_PIXELS, PATCH_SIZE, SPECIAL_TOKENS, VISION_END_ID,
                                 VISION_START_ID, architecture, hub_weight_name, tiny_qwen2_vl)

# fixture -> (version, seed), as tests/conftest.py writes them
CHECKPOINTS = {"tiny_checkpoint_qwen2_vl": ("2", 0), "tiny_checkpoint_qwen2_5_vl": ("2.5", 1),
               "tiny_checkpoint_qwen2_vl_hub_style": ("2", 2),
               "tiny_checkpoint_qwen2_5_vl_hub_style": ("2.5", 3)}
HUB_STYLE = [name for name in CHECKPOINTS if name.endswith("hub_style")]


@pytest.fixture(params=list(CHECKPOINTS))
def checkpoint(request):
    """(directory, version, seed, is_hub_style)."""
    version, seed = CHECKPOINTS[request.param]
    return (request.getfixturevalue(request.param), version, seed,
            request.param in HUB_STYLE)


def weight_names(directory) -> set:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    names = set()
    for shard in set(index["weight_map"].values()):
        with safe_open(str(directory / shard), framework="pt") as handle:
            names |= set(handle.keys())
    assert names == set(index["weight_map"])
    return names


def test_transformers_loads_the_in_memory_weights(checkpoint):
    import transformers

    directory, version, seed, _ = checkpoint
    model_class = getattr(transformers, architecture(version))
    loaded = model_class.from_pretrained(directory).state_dict()
    expected = tiny_qwen2_vl(version, seed).state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_weight_names_follow_the_layout(checkpoint):
    directory, version, seed, hub_style = checkpoint
    expected = tiny_qwen2_vl(version, seed).state_dict().keys()
    names = weight_names(directory)
    if hub_style:
        assert names == {hub_weight_name(name) for name in expected}
        assert {name.split(".")[0] for name in names} == {"visual", "model", "lm_head"}
        assert not any(name.startswith(("model.visual.", "model.language_model."))
                       for name in names)
    else:
        assert names == set(expected)
        assert any(name.startswith("model.visual.blocks.") for name in names)
    assert len(set(json.loads((directory / "model.safetensors.index.json").read_text())
                   ["weight_map"].values())) > 1  # sharded, as the real repositories


def test_hub_style_config_is_the_flat_older_form(tiny_checkpoint_qwen2_5_vl_hub_style):
    config = json.loads((tiny_checkpoint_qwen2_5_vl_hub_style / "config.json").read_text())
    assert "text_config" not in config and config["num_hidden_layers"] == 3
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert config["vision_config"]["in_chans"] == 3 and config["torch_dtype"] == "float32"
    tokenizer_config = json.loads(
        (tiny_checkpoint_qwen2_5_vl_hub_style / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert json.loads((tiny_checkpoint_qwen2_5_vl_hub_style / "chat_template.json").read_text()
                      ) == {"chat_template": CHAT_TEMPLATE}


def test_special_tokens_have_the_config_ids(checkpoint):
    from transformers import AutoConfig, AutoTokenizer

    directory = checkpoint[0]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = AutoConfig.from_pretrained(directory)
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert (config.image_token_id, config.vision_start_token_id, config.vision_end_token_id) == (
        IMAGE_PAD_ID, VISION_START_ID, VISION_END_ID)
    assert tokenizer.eos_token_id == IM_END_ID == config.text_config.eos_token_id
    generation = json.loads((directory / "generation_config.json").read_text())
    assert IM_END_ID in generation["eos_token_id"]


def test_chat_template_emits_one_vision_block_per_image(tiny_checkpoint_qwen2_vl):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint_qwen2_vl)
    source = (tiny_checkpoint_qwen2_vl / "chat_template.jinja").read_text()
    assert source == CHAT_TEMPLATE
    num_images = int(torch.randint(1, 4, ()).item())
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": "What is this?"}]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                        chat_template=source, add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    block = [VISION_START_ID, IMAGE_PAD_ID, VISION_END_ID]
    starts = [i for i in range(len(ids)) if ids[i:i + 3] == block]
    assert len(starts) == num_images == ids.count(IMAGE_PAD_ID)


def test_image_processor_keeps_images_within_the_pixel_budget(checkpoint):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(checkpoint[0])
    rng = np.random.default_rng()
    height, width = (int(v) for v in rng.integers(20, 400, size=2))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    out = processor(images=[image], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert t == 1 and h % MERGE_SIZE == 0 and w % MERGE_SIZE == 0
    assert MIN_PIXELS <= h * w * PATCH_SIZE ** 2 <= MAX_PIXELS
    assert out["pixel_values"].shape == (h * w, 3 * 2 * PATCH_SIZE ** 2)
