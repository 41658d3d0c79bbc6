"""Qwen2-VL / Qwen2.5-VL plans, token counts and M-RoPE positions against
transformers 5.24 (Qwen2VLImageProcessorPil, Qwen2VLProcessor, get_rope_index)."""

import itertools
import random
import subprocess
import sys

import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize)

from pyvlm.multimodal import qwen2_vl
from pyvlm.multimodal.processor import expand_image_tokens
from pyvlm.multimodal.processor import ImageBudgetError
from pyvlm.multimodal.qwen2_vl import Qwen2VLImageConfig
from tests.multimodal.hf_qwen2_vl import (IMAGE_PAD_ID, QWEN2_5_VL_7B, QWEN2_VL_7B,
                                          WORDS, hf_image_processor, hf_processor,
                                          pyvlm_config, rope_index_model)

WIDE, TALL = (20, 3990), (3990, 20)  # 199.5:1, inside transformers' 200:1 limit
OVER_MAX = (1100, 1300)  # 1.43 M pixels > the default max_pixels 1,003,520
BRIEF_SIZES = [(1, 1), (27, 332), (332, 27), (480, 640), WIDE, TALL, OVER_MAX]
# Sides at k * 14 for odd k sit exactly half way between multiples of 28:
# Python's round goes to even there, so these pin the rounding down.
HALF_WAY_SIZES = [(42, 70), (70, 42), (98, 126), (14, 14), (14, 2800), (434, 602)]
OVERRIDES = [dict(min_pixels=256 * 28 * 28, max_pixels=512 * 28 * 28),
             dict(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28),
             dict(min_pixels=100, max_pixels=200_000)]


def random_sizes(num, max_side):
    """Fresh sizes within transformers' 200:1 aspect limit."""
    sizes = []
    while len(sizes) < num:
        height, width = random.randint(1, max_side), random.randint(1, max_side)
        if max(height, width) <= 200 * min(height, width):
            sizes.append((height, width))
    return sizes


def prompt_text(num_images: int, between: str = "hello") -> str:
    return f" {between} ".join(["<|vision_start|> <|image_pad|> <|vision_end|>"] * num_images)


def processor_counts(processor, sizes, **call_kwargs):
    """Image-pad tokens per image in the processor's input_ids, and its grid_thw."""
    images = [Image.new("RGB", (width, height)) for height, width in sizes]
    out = processor(text=[prompt_text(len(sizes))], images=images, **call_kwargs)
    counts = [len(list(run)) for token, run in itertools.groupby(out["input_ids"][0])
              if token == IMAGE_PAD_ID]
    return counts, [tuple(g) for g in out["image_grid_thw"].tolist()]


def test_smart_resize_matches_transformers():
    sizes = BRIEF_SIZES + HALF_WAY_SIZES + random_sizes(300, 3000) + random_sizes(100, 60)
    settings = [(28, 3136, 1003520), (28, 3136, 12845056), (32, 1024, 4096), (28, 100, 200_000)]
    branches = set()
    for factor, min_pixels, max_pixels in settings:
        for height, width in sizes:
            ours = qwen2_vl.smart_resize(height, width, factor, min_pixels, max_pixels)
            assert ours == hf_smart_resize(height, width, factor, min_pixels, max_pixels)
            rounded = round(height / factor) * round(width / factor) * factor ** 2
            branches.add("down" if rounded > max_pixels
                         else "up" if rounded < min_pixels else "kept")
    assert branches == {"down", "up", "kept"}


@pytest.mark.parametrize("size", [(1, 201), (201, 1), (10, 2001), (3000, 14)])
def test_aspect_ratio_transformers_refuses_is_a_clear_value_error(size):
    height, width = size
    with pytest.raises(ValueError):
        hf_smart_resize(height, width, 28, 3136, 1003520)
    with pytest.raises(ValueError,
                       match=rf"image 2 of the prompt: .* {width}x{height} pixels.*200:1"):
        Qwen2VLImageConfig().plan_prompt([(1, 1), size])


def test_exactly_200_to_1_is_accepted_like_transformers():
    for height, width in [(1, 200), (200, 1), (14, 2800)]:
        expected = hf_smart_resize(height, width, 28, 3136, 1003520)
        assert Qwen2VLImageConfig().plan((height, width)).resized_size == expected


def test_default_counts_match_the_processor():
    processor, config = hf_processor(), Qwen2VLImageConfig()
    sizes = BRIEF_SIZES + HALF_WAY_SIZES + random_sizes(6, 900)
    counts, grids = processor_counts(processor, sizes)
    plans = config.plan_prompt(sizes)
    assert [plan.num_tokens for plan in plans] == counts
    assert [plan.grid_thw for plan in plans] == grids
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [plan.num_tokens for plan in plans] == expected
    over = config.plan(OVER_MAX)
    assert over.num_buffer_pixels <= config.max_pixels < OVER_MAX[0] * OVER_MAX[1]


@pytest.mark.parametrize("bounds", OVERRIDES)
def test_min_max_pixels_overrides_match_the_processor(bounds):
    """Init-time min/max_pixels (from_pretrained(..., min_pixels=...)) and
    call-time size {shortest_edge, longest_edge}, as in transformers."""
    sizes = BRIEF_SIZES + random_sizes(3, 2000)
    ours = Qwen2VLImageConfig().with_overrides(bounds).plan_prompt(sizes)
    counts, grids = processor_counts(hf_processor(**bounds), sizes)
    assert [plan.num_tokens for plan in ours] == counts
    assert [plan.grid_thw for plan in ours] == grids
    size = {"shortest_edge": bounds["min_pixels"], "longest_edge": bounds["max_pixels"]}
    by_size = Qwen2VLImageConfig().with_overrides({"size": size}).plan_prompt(sizes)
    assert by_size == ours
    assert processor_counts(hf_processor(), sizes, size=size) == (counts, grids)
    assert ours != Qwen2VLImageConfig().plan_prompt(sizes)  # the override changed something


def test_real_checkpoint_configs_read_like_transformers():
    sizes = [(1, 1), (27, 332), (3000, 4000), (5000, 4000)] + random_sizes(20, 5000)
    for preprocessor in (QWEN2_VL_7B, QWEN2_5_VL_7B):
        config = pyvlm_config(**preprocessor)
        assert (config.min_pixels, config.max_pixels) == (3136, 12845056)
        hf = hf_image_processor(**preprocessor)
        assert [config.plan(size).num_patches for size in sizes] == [
            hf.get_number_of_image_patches(*size) for size in sizes]
        assert config.normalization.mean == tuple(hf.image_mean)
        assert config.normalization.std == tuple(hf.image_std)
        assert config.normalization.rescale_factor == hf.rescale_factor
        assert config.normalization.resample == hf.resample


def test_transformers_5_size_and_top_level_bounds_combine_as_transformers_does():
    cases = [dict(size={"shortest_edge": 1000, "longest_edge": 90_000}),
             dict(size={"shortest_edge": 1000, "longest_edge": 90_000}, max_pixels=50_000),
             dict(size={"longest_edge": 90_000}, min_pixels=5_000),
             dict(max_pixels=70_000), dict(min_pixels=None, max_pixels=None,
                                           size={"shortest_edge": 2000, "longest_edge": 40_000})]
    for preprocessor in cases:
        hf = hf_image_processor(**preprocessor)
        config = pyvlm_config(**preprocessor)
        assert (config.min_pixels, config.max_pixels) == (hf.size.shortest_edge,
                                                          hf.size.longest_edge)


@pytest.mark.parametrize("preprocessor,message", [
    (dict(do_resize=False), "do_resize"),
    (dict(do_convert_rgb=False), "do_convert_rgb"),
    (dict(resample=1), "resample 1"),
    (dict(size={"shortest_edge": 3136}), "shortest_edge and longest_edge"),
    (dict(size={"height": 448, "width": 448}), "shortest_edge and longest_edge"),
    (dict(min_pixels=5000, max_pixels=4000), r"min_pixels \(5000\) is larger"),
    (dict(patch_size=16), "patch_size 16 differs"),
    (dict(merge_size=1), "merge_size 1 differs from the vision tower's spatial_merge_size 2"),
])
def test_settings_pyvlm_does_not_reproduce_are_refused(preprocessor, message):
    with pytest.raises(ValueError, match=message):
        pyvlm_config(**preprocessor)


@pytest.mark.parametrize("kwargs,message", [
    ({"max_pixel": 10}, r"\['max_pixel'\] are not supported by the Qwen2-VL image processor"),
    ({"min_pixels": 5000, "max_pixels": 4000}, r"min_pixels \(5000\) is larger than max_pixels"),
    ({"min_pixels": 2_000_000}, r"min_pixels \(2000000\) is larger than max_pixels \(1003520\)"),
    ({"max_pixels": 0}, "max_pixels must be a positive integer, got 0"),
    ({"min_pixels": -5}, "min_pixels must be a positive integer, got -5"),
    ({"max_pixels": 5e5}, "max_pixels must be a positive integer, got 500000.0"),
    ({"max_pixels": True}, "max_pixels must be a positive integer, got True"),
    ({"min_pixels": "3136"}, "min_pixels must be a positive integer, got '3136'"),
    ({"size": {"longest_edge": 10_000}}, "size must give exactly shortest_edge and longest_edge"),
    ({"size": [3136, 10_000]}, "size must be an object"),
])
def test_bad_overrides_are_value_errors_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        Qwen2VLImageConfig().with_overrides(kwargs)
    assert "mm_processor_kwargs" in str(error.value)


def test_no_overrides_is_the_same_config():
    config = pyvlm_config(**QWEN2_VL_7B)
    assert config.with_overrides(None) is config and config.with_overrides({}) is config
    assert config.with_overrides({"min_pixels": None}) == config  # null: not given
    assert config.with_overrides({"max_pixels": 10_000}).max_pixels == 10_000


def test_plan_prompt_refuses_a_buffer_over_the_limit():
    config = Qwen2VLImageConfig()
    height, width = random.randint(200, 900), random.randint(200, 900)
    plan = config.plan((height, width))
    area = plan.resized_size[0] * plan.resized_size[1]
    assert plan.num_buffer_pixels == area
    assert config.plan_prompt([(5, 5), (height, width)], max_buffer_pixels=area) == [
        config.plan((5, 5)), plan]
    resized_height, resized_width = plan.resized_size
    with pytest.raises(ImageBudgetError, match=rf"image 2 of the prompt \({width}x{height} pixels\) "
                       rf"would need a {resized_width}x{resized_height} resized copy"):
        config.plan_prompt([(5, 5), (height, width)], max_buffer_pixels=area - 1)


def test_plan_values_follow_the_grid():
    plan = Qwen2VLImageConfig().plan((480, 640))
    assert plan.resized_size == (476, 644)
    assert plan.grid_thw == (1, 34, 46) and plan.llm_grid_hw == (17, 23)
    assert plan.num_tokens == 17 * 23
    assert plan.num_pixel_values == 34 * 46 * 3 * 2 * 14 * 14
    assert plan.variant == "qwen2_vl:476x644"
    assert Qwen2VLImageConfig().with_overrides({"max_pixels": 100_000}).plan((480, 640)).variant \
        != plan.variant


def test_placeholder_text_is_what_the_chat_template_writes():
    assert Qwen2VLImageConfig().placeholder_text("<|image_pad|>") == \
        "<|vision_start|><|image_pad|><|vision_end|>"


def word_ids(text: str):
    return [WORDS.index(word) for word in text.split()]


POSITION_PROMPTS = {
    "text only": ("hello world hello world hello", 0),
    "one image": ("hello <|vision_start|> <|image_pad|> <|vision_end|> world", 1),
    "two images, text between and after": (
        "hello <|vision_start|> <|image_pad|> <|vision_end|> world hello world "
        "<|vision_start|> <|image_pad|> <|vision_end|> hello world", 2),
    "image first and last": ("<|image_pad|> hello world <|image_pad|>", 2),
}


def hf_positions(model, processor, text, sizes):
    """transformers' processor output and get_rope_index of it."""
    images = [Image.new("RGB", (width, height)) for height, width in sizes]
    out = processor(text=[text], images=images or None, return_tensors="pt")
    grid = out["image_grid_thw"] if sizes else None
    positions, delta = model.get_rope_index(out["input_ids"], out["mm_token_type_ids"],
                                            image_grid_thw=grid)
    return out["input_ids"][0].tolist(), positions[:, 0].tolist(), delta.item()


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def rope_model(request):
    return rope_index_model(request.param)


@pytest.mark.parametrize("case", list(POSITION_PROMPTS))
def test_prompt_positions_match_get_rope_index(rope_model, case):
    text, num_images = POSITION_PROMPTS[case]
    sizes = [(random.randint(30, 400), random.randint(30, 400)) for _ in range(num_images)]
    if num_images == 2:
        sizes[1] = (sizes[0][0] + 150, sizes[0][1] + 90)  # different grids
    config = Qwen2VLImageConfig()
    plans = config.plan_prompt(sizes)
    ids, spans = expand_image_tokens(word_ids(text), IMAGE_PAD_ID, sizes,
                                     [plan.num_tokens for plan in plans])
    hf_ids, hf_rows, hf_delta = hf_positions(rope_model, hf_processor(), text, sizes)
    assert ids == hf_ids
    mrope = config.prompt_positions(ids, spans, plans)
    assert [list(row) for row in mrope.rows] == hf_rows
    assert mrope.delta == hf_delta
    if case == "text only":
        assert mrope.rows == (tuple(range(len(ids))),) * 3 and mrope.delta == 0


def test_prompt_positions_of_a_tall_and_a_wide_image(rope_model):
    """Rows and columns differ a lot: text resumes after the larger of the two."""
    text = POSITION_PROMPTS["two images, text between and after"][0]
    sizes = [(random.randint(900, 1400), random.randint(20, 40)),
             (random.randint(20, 40), random.randint(900, 1400))]
    config = Qwen2VLImageConfig()
    plans = config.plan_prompt(sizes)
    ids, spans = expand_image_tokens(word_ids(text), IMAGE_PAD_ID, sizes,
                                     [plan.num_tokens for plan in plans])
    _, hf_rows, hf_delta = hf_positions(rope_model, hf_processor(), text, sizes)
    mrope = config.prompt_positions(ids, spans, plans)
    assert ([list(row) for row in mrope.rows], mrope.delta) == (hf_rows, hf_delta)


def test_prompt_positions_refuse_spans_that_do_not_fit_the_plans():
    config = Qwen2VLImageConfig()
    plan = config.plan((56, 112))  # 2 x 4 merged grid
    with pytest.raises(ValueError, match="differs from its 2x4 grid"):
        config.prompt_positions([0] * 20, [(2, 7)], [plan])
    with pytest.raises(ValueError, match="leaves the 9-token prompt"):
        config.prompt_positions([0] * 9, [(2, 8)], [plan])
    with pytest.raises(ValueError, match="overlaps"):
        config.prompt_positions([0] * 30, [(10, 8), (12, 8)], [plan, plan])
    with pytest.raises(ValueError, match="1 image spans but 2 plans"):
        config.prompt_positions([0] * 30, [(10, 8)], [plan, plan])


def test_module_imports_neither_torch_nor_numpy():
    code = ("import sys, pyvlm.multimodal.qwen2_vl; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

