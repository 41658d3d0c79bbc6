"""LLaVA-OneVision plans and token counts against transformers' processor."""

import itertools
import random

import pytest
from PIL import Image
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

from pyvlm.multimodal import llava_onevision as lo
from pyvlm.multimodal.processor import expand_image_tokens
from tests import tiny_models
from tests.multimodal.hf_llava_onevision import (SEVEN_B_PREPROCESSOR, hf_processor,
                                                 pyvlm_config)

EDGE_SIZES = [(1, 1), (1, 500), (500, 1), (2, 3), (3, 1000), (1000, 3), (20, 50), (380, 570),
              (667, 1000), (714, 1000), (728, 2392), (4000, 3000)]


def pinpoint_sizes(pinpoints, num=60):
    """Sizes near pinpoint shapes (scaled, jittered), so many pinpoints win."""
    sizes = []
    for _ in range(num):
        height, width = random.choice(pinpoints)
        scale = random.choice([0.3, 0.5, 0.9, 1.0, 1.7, 3.0])
        sizes.append((max(1, int(height * scale) + random.randint(-3, 3)),
                      max(1, int(width * scale) + random.randint(-3, 3))))
    return sizes


def random_sizes(max_side, num=60):
    return [(random.randint(1, max_side), random.randint(1, max_side)) for _ in range(num)]


@pytest.mark.parametrize("name,max_side", [("tiny", 400), ("7b", 5000)])
def test_best_resolution_and_resize_match_transformers(name, max_side):
    config = pyvlm_config(name)
    pinpoints = [list(p) for p in config.grid_pinpoints]
    winners = set()
    for size in EDGE_SIZES + random_sizes(max_side) + pinpoint_sizes(pinpoints):
        best = select_best_resolution(size, pinpoints)
        assert lo.select_best_resolution(size, config.grid_pinpoints) == tuple(best)
        image = _Shape(size)
        expected = get_patch_output_size(image, best, input_data_format="channels_first")
        assert lo.patch_output_size(size, tuple(best)) == tuple(expected)
        winners.add(tuple(best))
    assert len(winners) >= 12


class _Shape:
    """Just the .shape transformers' get_image_size reads (channels first)."""

    def __init__(self, size):
        self.shape = (3, *size)
        self.ndim = 3


@pytest.mark.parametrize("name,strategy,max_side", [("tiny", "full", 400), ("7b", "full", 5000),
                                                    ("7b", "default", 5000)])
def test_single_image_counts_match_processor(name, strategy, max_side):
    processor, config = hf_processor(name, strategy), pyvlm_config(name, strategy)
    sizes = EDGE_SIZES + random_sizes(max_side, 150) + pinpoint_sizes(
        [list(p) for p in config.grid_pinpoints], 150)
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [config.num_image_tokens(size, 1) for size in sizes] == expected
    assert len(set(expected)) > 20  # the sizes exercise unpadding and anyres_max downsampling


def prompt_counts(processor, sizes):
    """Image placeholders per image, counted in the processor's input_ids."""
    text = " hello ".join(["<image>"] * len(sizes))
    images = [Image.new("RGB", (width, height)) for height, width in sizes]
    ids = processor(text=[text], images=[images])["input_ids"][0]
    return [len(list(run)) for token, run in itertools.groupby(ids)
            if token == tiny_models.IMAGE_TOKEN_ID]


@pytest.mark.parametrize("name", ["tiny", "7b"])
def test_prompt_counts_single_and_multi_image(name):
    processor, config = hf_processor(name), pyvlm_config(name)
    max_side = 300 if name == "tiny" else 1200
    for num_images in (1, 1, 2, 3):
        sizes = random_sizes(max_side, num_images)
        expected = prompt_counts(processor, sizes)
        assert [plan.num_tokens for plan in config.plan_prompt(sizes)] == expected
        assert [config.num_image_tokens(s, num_images) for s in sizes] == expected


def test_expand_image_tokens_matches_processor_ids():
    processor, config = hf_processor("tiny"), pyvlm_config("tiny")
    for sizes in ([(37, 90)], [(37, 90), (200, 11)]):
        text = "hello <image> world " + " ".join(["<image>"] * (len(sizes) - 1)) + " hello"
        images = [Image.new("RGB", (w, h)) for h, w in sizes]
        expected = processor(text=[text], images=[images])["input_ids"][0]
        prompt = processor.tokenizer(text)["input_ids"]
        counts = [plan.num_tokens for plan in config.plan_prompt(sizes)]
        ids, spans = expand_image_tokens(prompt, tiny_models.IMAGE_TOKEN_ID, sizes, counts)
        assert list(ids) == list(expected)
        for (offset, length), count in zip(spans, counts):
            assert length == count
            assert set(ids[offset:offset + length]) == {tiny_models.IMAGE_TOKEN_ID}
            assert ids[offset - 1] != tiny_models.IMAGE_TOKEN_ID
        assert [o for o, _ in spans] == sorted(o for o, _ in spans)


def test_expand_image_tokens_refuses_count_mismatch():
    with pytest.raises(ValueError, match="placeholders"):
        expand_image_tokens([1, 3, 2, 3], 3, ["one image"], [5])


def test_anyres_plan_tiles_cover_the_padded_grid():
    config = pyvlm_config("7b")
    plan = config.plan((667, 1000), 1)
    best = plan.best_resolution
    assert plan.tiles[0] == lo.Tile((384, 384), (0, 0))
    assert plan.num_tiles == 1 + (best[0] // 384) * (best[1] // 384)
    resized = lo.patch_output_size((667, 1000), best)
    top, left = (best[0] - resized[0]) // 2, (best[1] - resized[1]) // 2
    corners = {tile.crop_tl for tile in plan.tiles[1:]}
    assert corners == {(r - top, c - left) for r in range(0, best[0], 384)
                       for c in range(0, best[1], 384)}
    square = config.plan((667, 1000), 2)
    assert square.variant == "pad_square" and square.num_tiles == 1
    assert (square.canvas.side, square.canvas.top, square.canvas.left) == (1000, 166, 0)
    assert square.canvas.fill == (127, 127, 127)


def test_config_from_hf_dicts_and_refusals():
    config = lo.LlavaOnevisionImageConfig.from_hf_configs(
        SEVEN_B_PREPROCESSOR, {"vision_config": {"image_size": 384, "patch_size": 14}})
    assert config == pyvlm_config("7b")
    assert config.num_tile_features == 729
    bad = [dict(SEVEN_B_PREPROCESSOR, size={"height": 384, "width": 336}),
           dict(SEVEN_B_PREPROCESSOR, resample=1),
           dict(SEVEN_B_PREPROCESSOR, do_center_crop=True),
           dict(SEVEN_B_PREPROCESSOR, image_grid_pinpoints=[[384, 500]])]
    for preprocessor in bad:
        with pytest.raises(ValueError):
            lo.LlavaOnevisionImageConfig.from_configs(preprocessor, vision_image_size=384,
                                                      vision_patch_size=14)
    with pytest.raises(ValueError, match="image_size"):
        lo.LlavaOnevisionImageConfig.from_configs(SEVEN_B_PREPROCESSOR, vision_image_size=336)
    with pytest.raises(ValueError, match="anyres_max"):
        lo.LlavaOnevisionImageConfig(vision_aspect_ratio="pad")
