"""Llama-3.2-Vision canvas plans against transformers' MllamaImageProcessorPil
(its canvas functions for many sizes, its outputs for real images); fresh
random sizes every run."""

import random

import pytest
from PIL import Image
from transformers import MllamaImageProcessorPil
from transformers.models.mllama import image_processing_pil_mllama as hf_mllama

from pyvlm.multimodal.mllama import (MllamaImageConfig, optimal_tiled_canvas,
                                     size_fit_to_canvas, supported_aspect_ratios)
from pyvlm.multimodal.processor import ImageBudgetError
from tests.multimodal.hf_mllama import LLAMA_3_2_VISION, VISION_CONFIG, hf_processor

# 1 x 1, tiny, exactly one tile, one tile + 1, exact grids, very wide / tall,
# larger than 4 tiles, and sizes whose scales tie across canvases.
EDGE_SIZES = [(1, 1), (3, 5), (560, 560), (561, 560), (560, 561), (1120, 1120), (560, 2240),
              (2240, 560), (1, 5000), (5000, 1), (7, 900), (900, 7), (5000, 5000),
              (3000, 4000), (280, 1120), (1120, 280), (1000, 1), (559, 1121)]


def random_sizes(count: int, max_side: int = 6000):
    """Fresh sizes: any shape, mostly small, some very elongated."""
    sizes = [(random.randint(1, max_side), random.randint(1, max_side)) for _ in range(count)]
    sizes += [(random.randint(1, 60), random.randint(1, max_side)) for _ in range(count // 4)]
    sizes += [(random.randint(1, max_side), random.randint(1, 60)) for _ in range(count // 4)]
    return sizes


@pytest.mark.parametrize("max_image_tiles", [1, 2, 4, 6, 9])
def test_supported_aspect_ratios_are_transformers(max_image_tiles):
    expected = hf_mllama.get_all_supported_aspect_ratios(max_image_tiles)
    assert list(supported_aspect_ratios(max_image_tiles)) == expected


@pytest.mark.parametrize("max_image_tiles,tile_size", [(4, 560), (1, 560), (2, 448), (6, 50),
                                                       (9, 336)])
def test_canvas_and_resize_equal_transformers(max_image_tiles, tile_size):
    for height, width in EDGE_SIZES + random_sizes(400):
        canvas = optimal_tiled_canvas(height, width, max_image_tiles, tile_size)
        expected = hf_mllama.get_optimal_tiled_canvas(height, width, max_image_tiles, tile_size)
        assert canvas == tuple(int(v) for v in expected), (height, width)
        resized = size_fit_to_canvas(height, width, *canvas, tile_size)
        expected = hf_mllama.get_image_size_fit_to_canvas(height, width, *canvas, tile_size)
        assert resized == tuple(int(v) for v in expected), (height, width)


def test_plans_equal_the_processor_outputs():
    """aspect_ratio_ids, aspect_ratio_mask and num_tiles of one call, with a
    small tile so the images stay cheap (the rule scales with the tile)."""
    preprocessor = dict(LLAMA_3_2_VISION, size={"height": 40, "width": 40})
    sizes = [(1, 1), (40, 40), (41, 40), (3, 200), (200, 3), (500, 500)] + [
        (random.randint(1, 200), random.randint(1, 200)) for _ in range(10)]
    images = [Image.new("RGB", (width, height)) for height, width in sizes]
    out = hf_processor(**preprocessor)(images=[images], return_tensors="np")
    plans = MllamaImageConfig.from_hf_configs(preprocessor, {}).plan_prompt(sizes)
    assert [p.aspect_ratio_id for p in plans] == out["aspect_ratio_ids"][0].tolist()
    assert [list(p.aspect_ratio_mask) for p in plans] == out["aspect_ratio_mask"][0].tolist()
    assert [p.num_tiles for p in plans] == out["num_tiles"][0]
    assert {p.num_tiles for p in plans} >= {1, 2, 4}


def test_the_real_checkpoint_config_is_the_default():
    config = MllamaImageConfig.from_hf_configs(LLAMA_3_2_VISION, {"vision_config": VISION_CONFIG})
    assert config == MllamaImageConfig()
    hf = hf_processor(**LLAMA_3_2_VISION)
    assert config.normalization.mean == tuple(hf.image_mean)
    assert config.normalization.std == tuple(hf.image_std)
    assert (config.tile_size, config.max_image_tiles) == (hf.size.height, hf.max_image_tiles)


def test_missing_keys_take_transformers_defaults():
    config = MllamaImageConfig.from_hf_configs({"image_mean": None}, {})
    hf = MllamaImageProcessorPil()
    assert (config.tile_size, config.max_image_tiles) == (hf.size.height, hf.max_image_tiles)
    norm = config.normalization
    assert (norm.resample, norm.mean, norm.std) == (int(hf.resample), tuple(hf.image_mean),
                                                   tuple(hf.image_std))
    assert norm.rescale_factor == hf.rescale_factor


def test_disabled_rescale_and_normalize_are_identities():
    norm = MllamaImageConfig.from_hf_configs(
        dict(LLAMA_3_2_VISION, do_rescale=False, do_normalize=False), {}).normalization
    assert (norm.rescale_factor, norm.mean, norm.std) == (1.0, (0.0,) * 3, (1.0,) * 3)


@pytest.mark.parametrize("change,message", [
    (dict(do_pad=False), "do_pad"), (dict(do_resize=False), "do_resize"),
    (dict(do_convert_rgb=False), "do_convert_rgb"),
    (dict(size={"height": 560, "width": 448}), "square"),
    (dict(size={"shortest_edge": 560}), "square"),
    (dict(resample=1), "resample"), (dict(max_image_tiles=0), "max_image_tiles"),
])
def test_unreproduced_preprocessor_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        MllamaImageConfig.from_hf_configs(dict(LLAMA_3_2_VISION, **change), {})


@pytest.mark.parametrize("change,message", [
    (dict(image_size=448), "image_size"), (dict(max_num_tiles=6), "max_num_tiles"),
    (dict(supported_aspect_ratios=[[1, 1], [2, 1], [1, 2]]), "supported_aspect_ratios"),
])
def test_a_disagreeing_vision_tower_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        MllamaImageConfig.from_hf_configs(LLAMA_3_2_VISION,
                                          {"vision_config": dict(VISION_CONFIG, **change)})


def test_no_processor_overrides_are_taken():
    config = MllamaImageConfig()
    assert config.with_overrides(None) is config and config.with_overrides({}) is config
    with pytest.raises(ValueError, match="max_image_tiles"):
        config.with_overrides({"max_image_tiles": 2})


def test_an_image_is_one_token_and_one_dimensional():
    config = MllamaImageConfig()
    plans = config.plan_prompt([(random.randint(1, 3000), random.randint(1, 3000))])
    assert plans[0].num_tokens == 1
    assert config.placeholder_text("<|image|>") == "<|image|>"
    assert config.prompt_positions([5, 128256, 6], [(1, 1)], plans) is None


def test_plan_sizes_and_variant():
    height, width = random.randint(561, 1120), random.randint(1121, 2240)
    plan = MllamaImageConfig().plan((height, width))
    rows, cols = plan.canvas
    assert plan.num_pixel_values == rows * cols * 3 * 560 * 560
    assert plan.num_buffer_pixels == plan.resized_size[0] * plan.resized_size[1]
    assert plan.tile_offsets == tuple((r * 560, c * 560) for r in range(rows) for c in range(cols))
    other = MllamaImageConfig(max_image_tiles=1).plan((height, width))
    assert other.variant != plan.variant


def test_buffer_budget_and_empty_images_are_refused():
    config = MllamaImageConfig()
    with pytest.raises(ImageBudgetError, match="image 2 of the prompt"):
        config.plan_prompt([(10, 10), (3000, 3000)], max_buffer_pixels=560 * 560)
    with pytest.raises(ValueError, match="image 1 of the prompt.*no pixels"):
        config.plan_prompt([(0, 10)])
