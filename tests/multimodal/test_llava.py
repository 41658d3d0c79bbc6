"""LLaVA-1.5 plans and token counts against transformers' LlavaProcessor, and
the LLaVA repository's layouts against a small re-implementation of its
rules (haotian-liu/LLaVA llava/mm_utils.py and llava/model/llava_arch.py)."""

import dataclasses
import itertools
import random

import pytest
from PIL import Image

from pyvlm.multimodal.llava import LlavaImageConfig
from pyvlm.multimodal.llava_next import LlavaNextImageConfig
from pyvlm.multimodal.processor import ImageBudgetError
from pyvlm.multimodal.tile_plans import SquareCanvas, Tile
from tests import tiny_models
from tests.multimodal.hf_llava import (CLIP_VISION, LLAVA_15_CONFIG, LLAVA_15_PAD_PREPROCESSOR,
                                       LLAVA_15_PREPROCESSOR, LLAVA_16_CONFIG,
                                       LLAVA_16_PREPROCESSOR, REPO_CLIP_PREPROCESSOR,
                                       REPO_V15_CONFIG, REPO_V16_CONFIG, V16_PINPOINTS,
                                       hf_llava_processor)

SIZES = [(1, 1), (3, 300), (300, 3), (20, 50), (336, 336), (337, 335), (480, 640), (640, 480),
         (1000, 3), (4000, 3000)]
SIGLIP_PREPROCESSOR = {"image_processor_type": "SiglipImageProcessor", "do_normalize": True,
                       "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                       "image_std": [0.5, 0.5, 0.5], "resample": 3,
                       "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384}}
SIGLIP_CONFIG = {"vision_config": {"model_type": "siglip_vision_model", "image_size": 384,
                                   "patch_size": 14},
                 "vision_feature_select_strategy": "full"}


def random_sizes(num, max_side=3000):
    return [(random.randint(1, max_side), random.randint(1, max_side)) for _ in range(num)]


def prompt_counts(processor, sizes):
    text = " hello ".join(["<image>"] * len(sizes))
    images = [Image.new("RGB", (width, height)) for height, width in sizes]
    ids = processor(text=[text], images=[images])["input_ids"][0]
    return [len(list(run)) for token, run in itertools.groupby(ids)
            if token == tiny_models.IMAGE_TOKEN_ID]


@pytest.mark.parametrize("preprocessor", [LLAVA_15_PREPROCESSOR, LLAVA_15_PAD_PREPROCESSOR])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_counts_match_llava_processor(preprocessor, strategy):
    model = dict(LLAVA_15_CONFIG, vision_feature_select_strategy=strategy)
    config = LlavaImageConfig.from_hf_configs(preprocessor, model)
    processor = hf_llava_processor(preprocessor, strategy)
    sizes = SIZES + random_sizes(20)
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [plan.num_tokens for plan in config.plan_prompt(sizes)] == expected
    assert expected[0] == (576 if strategy == "default" else 577)
    small = [(1, 1), (3, 300)] + random_sizes(2, 700)
    assert [config.num_image_tokens(s) for s in small] == prompt_counts(processor, small)


def test_siglip_preprocessor_counts():
    config = LlavaImageConfig.from_hf_configs(SIGLIP_PREPROCESSOR, SIGLIP_CONFIG)
    processor = hf_llava_processor(SIGLIP_PREPROCESSOR, "full", num_cls_tokens=0)
    sizes = [(1, 1), (30, 700)]
    counts = [config.num_image_tokens(s) for s in sizes]
    assert counts == prompt_counts(processor, sizes) == [729] * 2
    assert config.plan((30, 700)).tiles == (Tile((384, 384), (0, 0)),)


def test_square_and_pad_plans():
    clip = LlavaImageConfig.from_hf_configs(LLAVA_15_PREPROCESSOR, LLAVA_15_CONFIG)
    plan = clip.plan((480, 640))
    assert plan.tiles == (Tile((336, 448), (0, 56)),) and plan.canvas is None
    assert (plan.variant, plan.num_tiles, plan.best_resolution, plan.grid_shape) == (
        "square", 1, None, None)
    assert clip.plan((3, 300)).tiles == (Tile((336, 33600), (0, 16632)),)
    pad = LlavaImageConfig.from_hf_configs(LLAVA_15_PAD_PREPROCESSOR, LLAVA_15_CONFIG)
    plan = pad.plan((480, 641))
    assert plan.canvas == SquareCanvas(641, 80, 0, (122, 116, 104))
    assert plan.tiles == (Tile((336, 336), (0, 0)),) and plan.variant == "pad"
    assert pad.plan((641, 480)).canvas == SquareCanvas(641, 0, 80, (122, 116, 104))


def test_buffer_refusals_name_the_buffer():
    clip = LlavaImageConfig.from_hf_configs(LLAVA_15_PREPROCESSOR, LLAVA_15_CONFIG)
    with pytest.raises(ImageBudgetError, match="33600x336 resized copy of 11,289,600 pixels"):
        clip.plan_prompt([(3, 300)], max_buffer_pixels=10_000_000)
    pad = LlavaImageConfig.from_hf_configs(LLAVA_15_PAD_PREPROCESSOR, LLAVA_15_CONFIG)
    with pytest.raises(ImageBudgetError, match="4000x4000 square canvas .*padded to a square"):
        pad.plan_prompt([(5, 5), (3000, 4000)], max_buffer_pixels=10_000_000)
    assert pad.plan_prompt([(3, 300)], max_buffer_pixels=300 * 300 // 2 + 336 * 336)


def test_processor_contract():
    config = LlavaImageConfig.from_hf_configs(LLAVA_15_PREPROCESSOR, LLAVA_15_CONFIG)
    assert config.placeholder_text("<image>") == "<image>"
    assert config.with_overrides({}) is config
    with pytest.raises(ValueError, match="not supported by the LLaVA image processor"):
        config.with_overrides({"do_pad": True})
    assert config.prompt_positions([3], [(0, 576)], config.plan_prompt([(4, 4)])) is None


def test_missing_keys_take_the_class_defaults_and_the_tower_size():
    clip = LlavaImageConfig.from_hf_configs(LLAVA_15_PREPROCESSOR, LLAVA_15_CONFIG)
    assert LlavaImageConfig.from_hf_configs({}, {}) == clip
    siglip = LlavaImageConfig.from_hf_configs({"image_processor_type": "SiglipImageProcessor"},
                                              SIGLIP_CONFIG)
    assert (siglip.resize, siglip.center_crop, siglip.normalization.mean) == (
        (384, 384), False, (0.5, 0.5, 0.5))


def test_llava_image_processor_without_pad_is_square():
    no_pad = dict(LLAVA_15_PAD_PREPROCESSOR, do_pad=False)
    assert LlavaImageConfig.from_hf_configs(no_pad, LLAVA_15_CONFIG) == \
        LlavaImageConfig.from_hf_configs(LLAVA_15_PREPROCESSOR, LLAVA_15_CONFIG)


@pytest.mark.parametrize("preprocessor,model,match", [
    (dict(LLAVA_15_PREPROCESSOR, crop_size={"height": 224, "width": 224}), LLAVA_15_CONFIG,
     "tiles"),
    (dict(LLAVA_15_PREPROCESSOR, do_resize=False), LLAVA_15_CONFIG, "do_resize"),
    (dict(LLAVA_15_PREPROCESSOR, do_center_crop=False), LLAVA_15_CONFIG, "tiles"),
    (dict(LLAVA_15_PREPROCESSOR, size={"shortest_edge": 336, "longest_edge": 600}),
     LLAVA_15_CONFIG, "not supported"),
    (dict(LLAVA_15_PREPROCESSOR, resample=4), LLAVA_15_CONFIG, "resample"),
    (LLAVA_16_PREPROCESSOR, LLAVA_15_CONFIG, "not LlavaNextImageProcessor"),
    (LLAVA_15_PREPROCESSOR, dict(LLAVA_15_CONFIG, vision_config=dict(CLIP_VISION, image_size=224)),
     "tiles"),
    (LLAVA_15_PREPROCESSOR, dict(LLAVA_15_CONFIG, vision_feature_select_strategy="x"),
     "not one of"),
])
def test_refused_settings(preprocessor, model, match):
    with pytest.raises(ValueError, match=match):
        LlavaImageConfig.from_hf_configs(preprocessor, model)


# --- The LLaVA repository's rules, re-implemented from its code -------------

def repo_select_best_resolution(original_size, possible_resolutions):
    """mm_utils.select_best_resolution: sizes and pinpoints are (width, height)."""
    original_width, original_height = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        effective = min(int(original_width * scale) * int(original_height * scale),
                        original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    return best_fit


def repo_unpadded_rows_cols(current_height, current_width, original_size):
    """llava_arch.unpad_image's output (rows, cols); original_size is (width, height)."""
    original_width, original_height = original_size
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return len(range(padding, current_height - padding)), current_width
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return current_height, len(range(padding, current_width - padding))


def repo_num_features(image_size, pinpoints, tile=336, per_side=24):
    """Rows prepare_inputs_labels_for_multimodal makes of one anyres image
    (mm_patch_merge_type spatial_unpad, mm_vision_select_feature patch)."""
    height, width = image_size
    best_width, best_height = repo_select_best_resolution((width, height), pinpoints)
    rows, cols = repo_unpadded_rows_cols(best_height // tile * per_side,
                                         best_width // tile * per_side, (width, height))
    return per_side ** 2 + rows * cols + rows  # base, unpadded grid, one newline per row


def repo_v16() -> LlavaImageConfig:
    return LlavaImageConfig.from_llava_repo(REPO_V16_CONFIG, REPO_CLIP_PREPROCESSOR)


def test_repo_pad_layout_is_transformers_llava_pad():
    repo = LlavaImageConfig.from_llava_repo(REPO_V15_CONFIG, REPO_CLIP_PREPROCESSOR)
    assert repo == LlavaImageConfig.from_hf_configs(LLAVA_15_PAD_PREPROCESSOR, LLAVA_15_CONFIG)
    square = LlavaImageConfig.from_llava_repo({}, REPO_CLIP_PREPROCESSOR)
    assert square == LlavaImageConfig.from_hf_configs(LLAVA_15_PREPROCESSOR, LLAVA_15_CONFIG)


def test_repo_anyres_counts_and_grids_follow_the_repository():
    config = repo_v16()
    assert config.variant == "anyres" and config.anyres.truncate_unpad
    assert config.anyres.normalization.resample == 3  # Image.resize's default: bicubic
    truncated = [(110, 352), (656, 205), (352, 748), (792, 1408)]  # unpad_image's int() bites
    sizes = SIZES + random_sizes(300) + random_sizes(300, 400) + truncated
    for size in sizes:
        plan = config.plan(size)
        width, height = repo_select_best_resolution(size[::-1], V16_PINPOINTS)
        assert plan.best_resolution == (height, width)
        assert plan.num_tokens == config.num_image_tokens(size) == repo_num_features(
            size, V16_PINPOINTS)
        assert plan.tiles[0] == Tile((336, 336), (0, 0))  # process_anyres_image's squash


def test_repo_anyres_differs_from_transformers_where_stated():
    repo, hf = repo_v16(), LlavaNextImageConfig.from_hf_configs(LLAVA_16_PREPROCESSOR,
                                                                LLAVA_16_CONFIG)
    # Pinpoints read as (width, height): ties between transposed pinpoints flip.
    assert repo.plan((100, 100)).grid_shape == (2, 1)
    assert hf.plan((100, 100)).grid_shape == (1, 2)
    assert repo.plan((100, 200)).grid_shape == (2, 1) and hf.plan((100, 200)).grid_shape == (1, 2)
    # Same grid, but unpad_image's int() makes 14 of 110 * (48 / 352) = 14.999999999999998.
    size = (110, 352)
    assert repo.plan(size).best_resolution == hf.plan(size).best_resolution == (336, 672)
    assert repo.num_image_tokens(size) == repo_num_features(size, V16_PINPOINTS) == 1262
    assert hf.num_image_tokens(size) == 1360
    # Where neither applies, the two agree.
    assert repo.num_image_tokens((480, 640)) == hf.num_image_tokens((480, 640))


def test_repo_refusals():
    with pytest.raises(ValueError, match="spatial_unpad"):
        LlavaImageConfig.from_llava_repo(dict(REPO_V16_CONFIG, mm_patch_merge_type="flat"),
                                         REPO_CLIP_PREPROCESSOR)
    with pytest.raises(ValueError, match="CLS"):
        LlavaImageConfig.from_llava_repo(
            dict(REPO_V16_CONFIG, mm_vision_select_feature="cls_patch"), REPO_CLIP_PREPROCESSOR)
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        LlavaImageConfig.from_llava_repo({k: v for k, v in REPO_V16_CONFIG.items()
                                          if k != "image_grid_pinpoints"}, REPO_CLIP_PREPROCESSOR)
    with pytest.raises(ValueError, match="anyres"):
        dataclasses.replace(repo_v16(), image_aspect_ratio="pad")
    string_pins = dict(REPO_V16_CONFIG, image_grid_pinpoints=str([tuple(p) for p in V16_PINPOINTS]))
    assert LlavaImageConfig.from_llava_repo(string_pins, REPO_CLIP_PREPROCESSOR) == repo_v16()


def test_converted_checkpoints_select_the_repository_rules():
    """A checkpoint converted from the authors' layout to transformers' (its
    processor dict marked pad_to_square / anyres_rules) gets the same config
    as from_llava_repo; its pinpoints stay the repository's (width, height)."""
    pad = LlavaImageConfig.from_hf_configs(dict(LLAVA_15_PREPROCESSOR, pad_to_square=True),
                                           LLAVA_15_CONFIG)
    assert pad == LlavaImageConfig.from_llava_repo(REPO_V15_CONFIG, REPO_CLIP_PREPROCESSOR)
    marked = dict(LLAVA_16_PREPROCESSOR, anyres_rules="llava_repo", base_tile="squash")
    anyres = LlavaNextImageConfig.from_hf_configs(marked, LLAVA_16_CONFIG)
    assert anyres == repo_v16().anyres
    assert anyres.grid_pinpoints[:2] == ((672, 336), (336, 672))
    with pytest.raises(ValueError, match="base_tile 'resize_crop'"):
        LlavaNextImageConfig.from_hf_configs(dict(marked, base_tile="resize_crop"), LLAVA_16_CONFIG)
    with pytest.raises(ValueError, match="anyres_rules"):
        LlavaNextImageConfig.from_hf_configs(dict(marked, anyres_rules="hf"), LLAVA_16_CONFIG)


def test_repo_pinpoint_strings():
    ranged = dict(REPO_V16_CONFIG, image_grid_pinpoints="(1x1),...,(2x3)")
    config = LlavaImageConfig.from_llava_repo(ranged, REPO_CLIP_PREPROCESSOR).anyres
    # (width, height) grids 1x1, 1x2, 1x3, 2x1, 2x2, 2x3 of 336, as (height, width)
    assert config.grid_pinpoints == tuple((h * 336, w * 336) for w in (1, 2) for h in (1, 2, 3))
