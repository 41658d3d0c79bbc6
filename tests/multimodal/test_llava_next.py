"""LLaVA-NeXT plans and token counts against transformers' LlavaNextProcessor
and the model's own grid helpers, with llava-v1.6's real settings."""

import dataclasses
import itertools
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers.models.llava_next import modeling_llava_next as hf_model

from pyvlm.multimodal import anyres
from pyvlm.multimodal.llava_next import LlavaNextImageConfig
from pyvlm.multimodal.processor import ImageBudgetError, expand_image_tokens
from pyvlm.multimodal.tile_plans import Normalization, Tile
from tests import tiny_models
from tests.multimodal.hf_llava import (CLIP_VISION, LLAVA_16_CONFIG, LLAVA_16_PREPROCESSOR,
                                       V16_PINPOINTS, hf_llava_next_processor)

EDGE_SIZES = [(1, 1), (3, 300), (300, 3), (1, 500), (500, 1), (2, 3), (20, 50), (100, 100),
              (336, 336), (337, 335), (480, 640), (640, 480), (336, 1008), (1008, 336),
              (55, 176), (88, 99), (110, 352), (376, 799), (728, 2392), (4000, 3000),
              (3000, 4000)]
SIGLIP_VISION = {"model_type": "siglip_vision_model", "image_size": 336, "patch_size": 14}


def random_sizes(num, max_side=3000):
    return [(random.randint(1, max_side), random.randint(1, max_side)) for _ in range(num)]


def pinpoint_sizes(num=80):
    """Sizes near the pinpoints' shapes, so every pinpoint wins some."""
    sizes = []
    for _ in range(num):
        height, width = random.choice(V16_PINPOINTS)
        scale = random.choice([0.2, 0.5, 0.9, 1.0, 1.3, 2.5])
        sizes.append((max(1, int(height * scale) + random.randint(-3, 3)),
                      max(1, int(width * scale) + random.randint(-3, 3))))
    return sizes


def v16_config(**changes) -> LlavaNextImageConfig:
    return dataclasses.replace(
        LlavaNextImageConfig.from_hf_configs(LLAVA_16_PREPROCESSOR, LLAVA_16_CONFIG), **changes)


def test_config_from_real_v16_settings():
    config = LlavaNextImageConfig.from_hf_configs(LLAVA_16_PREPROCESSOR, LLAVA_16_CONFIG)
    assert config == LlavaNextImageConfig(
        tile_size=336, patch_size=14, grid_pinpoints=tuple(map(tuple, V16_PINPOINTS)),
        normalization=Normalization(3, 0.00392156862745098, (0.48145466, 0.4578275, 0.40821073),
                                    (0.26862954, 0.26130258, 0.27577711)),
        vision_feature_select_strategy="default", num_cls_tokens=1)
    assert config.num_tile_features == 576 and config.features_per_side == 24


@pytest.mark.parametrize("strategy,num_cls", [("default", 1), ("full", 0)])
def test_counts_match_get_number_of_features(strategy, num_cls):
    processor = hf_llava_next_processor(strategy=strategy, num_cls_tokens=num_cls)
    config = v16_config(vision_feature_select_strategy=strategy, num_cls_tokens=num_cls)
    sizes = EDGE_SIZES + random_sizes(300) + random_sizes(100, 400) + pinpoint_sizes()
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [config.num_image_tokens(size) for size in sizes] == expected
    assert [plan.num_tokens for plan in config.plan_prompt(sizes)] == expected
    assert len(set(expected)) > 30


def test_plan_geometry_matches_the_model_helpers():
    config = v16_config()
    winners = set()
    for size in EDGE_SIZES + random_sizes(150) + pinpoint_sizes():
        plan = config.plan(size)
        winners.add(plan.best_resolution)
        assert plan.num_tiles == hf_model.image_size_to_num_patches(size, V16_PINPOINTS, 336)
        assert plan.grid_shape == config.grid_shape(size) == tuple(
            hf_model.get_anyres_image_grid_shape(size, V16_PINPOINTS, 336))
        rows, cols = plan.grid_shape
        fmap = torch.arange(rows * 24 * cols * 24).view(1, rows * 24, cols * 24)
        top, bottom, left, right = plan.feature_crop
        assert torch.equal(fmap[:, top:bottom, left:right], hf_model.unpad_image(fmap, size))
    assert winners == set(map(tuple, V16_PINPOINTS))


def test_plan_tiles_are_the_squashed_base_then_the_padded_grid_row_by_row():
    plan = v16_config().plan((480, 640))
    assert plan.best_resolution == (672, 672) and plan.grid_shape == (2, 2)
    assert plan.tiles[0] == Tile((336, 336), (0, 0))  # the base: a squash, not a crop
    resized = anyres.patch_output_size((480, 640), (672, 672))
    assert resized == (504, 672)
    assert plan.tiles[1:] == (Tile(resized, (-84, 0)), Tile(resized, (-84, 336)),
                              Tile(resized, (252, 0)), Tile(resized, (252, 336)))
    assert plan.variant == "anyres" and plan.canvas is None
    assert plan.num_pixel_values == 5 * 3 * 336 * 336
    assert plan.num_buffer_pixels == 504 * 672


def prompt_counts(processor, sizes):
    """Image placeholders per image, counted in the processor's input_ids."""
    text = " hello ".join(["<image>"] * len(sizes))
    images = [Image.new("RGB", (width, height)) for height, width in sizes]
    ids = processor(text=[text], images=[images])["input_ids"][0]
    return [len(list(run)) for token, run in itertools.groupby(ids)
            if token == tiny_models.IMAGE_TOKEN_ID]


def test_prompt_counts_single_and_multi_image():
    processor, config = hf_llava_next_processor(), v16_config()
    for sizes in ([(1, 1)], [(3, 300)], random_sizes(1, 1200), random_sizes(2, 1200),
                  [(20, 50), (700, 90), (336, 336)]):
        expected = prompt_counts(processor, sizes)
        assert [plan.num_tokens for plan in config.plan_prompt(sizes)] == expected


def test_expand_image_tokens_matches_processor_ids():
    processor, config = hf_llava_next_processor(), v16_config()
    sizes = [(37, 90), (200, 11)]
    text = "hello <image> world <image> hello"
    expected = processor(text=[text], images=[[Image.new("RGB", (w, h)) for h, w in sizes]])
    prompt = processor.tokenizer(text)["input_ids"]
    counts = [plan.num_tokens for plan in config.plan_prompt(sizes)]
    ids, spans = expand_image_tokens(prompt, tiny_models.IMAGE_TOKEN_ID, sizes, counts)
    assert list(ids) == list(expected["input_ids"][0])
    assert [length for _, length in spans] == counts


def test_processor_contract():
    config = v16_config()
    assert config.placeholder_text("<image>") == "<image>"
    assert config.with_overrides(None) is config and config.with_overrides({}) is config
    with pytest.raises(ValueError, match="not supported by the LLaVA-NeXT"):
        config.with_overrides({"image_grid_pinpoints": [[336, 336]]})
    assert config.prompt_positions([1, 2], [(0, 1)], config.plan_prompt([(5, 5)])) is None
    # Anyres bounds the buffer: 4000 x 3000 is resized to 672 x 505 inside 672 x 672.
    with pytest.raises(ImageBudgetError, match="image 2 of the prompt .* 505x672 resized copy"):
        config.plan_prompt([(10, 10), (4000, 3000)], max_buffer_pixels=672 * 505 - 1)
    assert len(config.plan_prompt([(10, 10), (4000, 3000)], max_buffer_pixels=672 * 505)) == 2
    with pytest.raises(ValueError, match="no pixels"):
        config.plan((0, 5))


def test_siglip_tower_and_missing_keys():
    siglip = dict(LLAVA_16_CONFIG, vision_config=SIGLIP_VISION,
                  vision_feature_select_strategy="full")
    config = LlavaNextImageConfig.from_hf_configs(LLAVA_16_PREPROCESSOR, siglip)
    assert (config.num_cls_tokens, config.num_tile_features) == (0, 576)
    # No pinpoints anywhere: transformers' defaults, the v1.6 list.
    bare_pre = {k: v for k, v in LLAVA_16_PREPROCESSOR.items() if k != "image_grid_pinpoints"}
    bare_model = {k: v for k, v in LLAVA_16_CONFIG.items() if k != "image_grid_pinpoints"}
    assert LlavaNextImageConfig.from_hf_configs(bare_pre, bare_model) == v16_config()
    # Missing sizes are the tower's (transformers' class default, 224, could not feed it).
    no_sizes = {k: v for k, v in LLAVA_16_PREPROCESSOR.items() if k not in ("size", "crop_size")}
    assert LlavaNextImageConfig.from_hf_configs(no_sizes, LLAVA_16_CONFIG) == v16_config()
    assert LlavaNextImageConfig.from_hf_configs({}, {}) == v16_config()
    # do_resize / do_center_crop off change nothing (the tiles have the crop size already).
    flags = dict(LLAVA_16_PREPROCESSOR, do_resize=False, do_center_crop=False)
    assert LlavaNextImageConfig.from_hf_configs(flags, LLAVA_16_CONFIG) == v16_config()


@pytest.mark.parametrize("preprocessor,model,match", [
    (dict(LLAVA_16_PREPROCESSOR, crop_size={"height": 224, "width": 224}), LLAVA_16_CONFIG,
     "crop_size"),
    (dict(LLAVA_16_PREPROCESSOR, size={"height": 336, "width": 672}), LLAVA_16_CONFIG, "square"),
    (dict(LLAVA_16_PREPROCESSOR, resample=1), LLAVA_16_CONFIG, "resample"),
    (dict(LLAVA_16_PREPROCESSOR, image_processor_type="CLIPImageProcessor"), LLAVA_16_CONFIG,
     "LlavaNextImageProcessor"),
    (dict(LLAVA_16_PREPROCESSOR, image_grid_pinpoints=[[336, 500]]),
     dict(LLAVA_16_CONFIG, image_grid_pinpoints=[[336, 500]]), "multiple"),
    (dict(LLAVA_16_PREPROCESSOR, image_grid_pinpoints=[[336, 672]]), LLAVA_16_CONFIG, "differ"),
    (LLAVA_16_PREPROCESSOR, dict(LLAVA_16_CONFIG, vision_config=dict(CLIP_VISION, image_size=384)),
     "image_size"),
    (LLAVA_16_PREPROCESSOR, dict(LLAVA_16_CONFIG, vision_feature_select_strategy="full"),
     "CLS"),
    (LLAVA_16_PREPROCESSOR, dict(LLAVA_16_CONFIG, vision_config=SIGLIP_VISION), "CLS"),
    (LLAVA_16_PREPROCESSOR, dict(LLAVA_16_CONFIG, vision_feature_select_strategy="cls"),
     "not one of"),
    (LLAVA_16_PREPROCESSOR, dict(LLAVA_16_CONFIG, vision_config={"model_type": "dinov2"}),
     "not supported"),
])
def test_refused_settings(preprocessor, model, match):
    with pytest.raises(ValueError, match=match):
        LlavaNextImageConfig.from_hf_configs(preprocessor, model)


def test_new_modules_import_without_torch():
    modules = ["pyvlm.multimodal.llava_next", "pyvlm.multimodal.llava",
               "pyvlm.multimodal.llava_configs", "pyvlm.multimodal.anyres",
               "pyvlm.multimodal.tile_plans", "pyvlm.multimodal.preprocessor_config"]
    code = (f"import sys; import {', '.join(modules)}; "
            f"assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
