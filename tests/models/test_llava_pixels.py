"""LLaVA-1.5 and LLaVA-NeXT pixel tiles, bit-exact against transformers' PIL
image processors, and the LLaVA repository's process_images layouts
against a re-implementation of its code on Pillow."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from pyvlm.models import llava_pixels
from pyvlm.models.llava_pixels import llava_pixel_values
from pyvlm.multimodal.llava import LlavaImageConfig
from pyvlm.multimodal.llava_next import LlavaNextImageConfig
from tests.multimodal.hf_llava import (LLAVA_15_CONFIG, LLAVA_15_PAD_PREPROCESSOR,
                                       LLAVA_15_PREPROCESSOR, LLAVA_16_CONFIG,
                                       LLAVA_16_PREPROCESSOR, REPO_CLIP_PREPROCESSOR,
                                       REPO_V15_CONFIG, REPO_V16_CONFIG, V16_PINPOINTS,
                                       hf_image_processor, processor_kwargs)
from tests.multimodal.test_llava import (SIGLIP_CONFIG, SIGLIP_PREPROCESSOR,
                                         repo_select_best_resolution)

# Tiny, thin, small, square, wide, tall and large images.
SIZES = [(1, 1), (3, 300), (300, 3), (2, 3), (100, 100), (200, 700), (700, 200), (337, 335),
         (1500, 1100)]
rng = np.random.default_rng()


def random_image(height, width) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_sizes(num, max_side=1200):
    return [(random.randint(1, max_side), random.randint(1, max_side)) for _ in range(num)]


def hf_tiles(processor, images):
    """transformers' pixel_values of one prompt, per image, [tiles, 3, S, S]."""
    out = processor(images=[images], return_tensors=None)["pixel_values"]
    return [torch.from_numpy(np.asarray(tiles)) for tiles in out]


def ours(config, images):
    plans = config.plan_prompt([(im.height, im.width) for im in images])
    return plans, llava_pixel_values(images, plans, "cpu")


def assert_equal_tiles(got, expected, plans):
    for tiles, reference, plan in zip(got, expected, plans):
        if reference.dim() == 3:  # one tile per image
            reference = reference[None]
        reference = reference[:plan.num_tiles]  # LLaVA-NeXT pads a batch to its most tiles
        assert tiles.dtype == reference.dtype == torch.float32
        assert tiles.shape == reference.shape == (plan.num_tiles, 3, 336, 336)
        assert torch.equal(tiles, reference)


@pytest.fixture
def count_op_calls(monkeypatch):
    calls = []
    real = llava_pixels.preprocess_images

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(llava_pixels, "preprocess_images", counted)
    return calls


def test_llava_next_tiles_match_the_pil_processor(count_op_calls):
    config = LlavaNextImageConfig.from_hf_configs(LLAVA_16_PREPROCESSOR, LLAVA_16_CONFIG)
    processor = hf_image_processor(LLAVA_16_PREPROCESSOR)
    images = [random_image(*size) for size in SIZES + random_sizes(3)]
    plans, got = ours(config, images)
    assert len(count_op_calls) == 1  # one op call for the whole prompt
    assert_equal_tiles(got, hf_tiles(processor, images), plans)
    assert {plan.best_resolution for plan in plans} >= {(336, 672), (672, 336), (672, 672)}


def test_llava_next_with_resize_and_crop_off():
    """do_resize / do_center_crop only touch tiles already of the crop size."""
    preprocessor = dict(LLAVA_16_PREPROCESSOR, do_resize=False, do_center_crop=False)
    config = LlavaNextImageConfig.from_hf_configs(preprocessor, LLAVA_16_CONFIG)
    images = [random_image(*size) for size in [(3, 300), (480, 640)]]
    plans, got = ours(config, images)
    assert_equal_tiles(got, hf_tiles(hf_image_processor(preprocessor), images), plans)


@pytest.mark.parametrize("preprocessor", [LLAVA_15_PREPROCESSOR, LLAVA_15_PAD_PREPROCESSOR])
def test_llava_tiles_match_the_pil_processor(preprocessor, count_op_calls):
    config = LlavaImageConfig.from_hf_configs(preprocessor, LLAVA_15_CONFIG)
    images = [random_image(*size) for size in SIZES + random_sizes(3)]
    plans, got = ours(config, images)
    assert len(count_op_calls) == 1
    assert_equal_tiles(got, hf_tiles(hf_image_processor(preprocessor), images), plans)


def test_siglip_preprocessor_tiles():
    preprocessor = dict(SIGLIP_PREPROCESSOR, size={"height": 336, "width": 336})
    model = dict(SIGLIP_CONFIG, vision_config=dict(SIGLIP_CONFIG["vision_config"], image_size=336))
    config = LlavaImageConfig.from_hf_configs(preprocessor, model)
    images = [random_image(*size) for size in [(1, 1), (3, 300), (500, 200)]]
    plans, got = ours(config, images)
    assert_equal_tiles(got, hf_tiles(hf_image_processor(preprocessor), images), plans)


def test_wrong_image_for_plan_is_refused():
    config = LlavaNextImageConfig.from_hf_configs(LLAVA_16_PREPROCESSOR, LLAVA_16_CONFIG)
    with pytest.raises(ValueError, match="plan"):
        llava_pixel_values([random_image(20, 10)], [config.plan((10, 20))], "cpu")


# --- The LLaVA repository's process_images, re-implemented on Pillow ---------

def repo_clip_processor():
    """The repository's image_processor: the tower's CLIPImageProcessor."""
    return CLIPImageProcessorPil(**processor_kwargs(REPO_CLIP_PREPROCESSOR))


def repo_process_anyres_image(image, processor, grid_pinpoints):
    """mm_utils.process_anyres_image: pinpoints (width, height); Pillow's
    default resize filter; black padding; the processor on every patch."""
    width, height = image.size
    best_width, best_height = repo_select_best_resolution(image.size, grid_pinpoints)
    scale_w, scale_h = best_width / width, best_height / height
    if scale_w < scale_h:
        new_width, new_height = best_width, min(math.ceil(height * scale_w), best_height)
    else:
        new_width, new_height = min(math.ceil(width * scale_h), best_width), best_height
    padded = Image.new("RGB", (best_width, best_height), (0, 0, 0))
    padded.paste(image.resize((new_width, new_height)),
                 ((best_width - new_width) // 2, (best_height - new_height) // 2))
    side = processor.crop_size["height"]
    patches = [padded.crop((j, i, j + side, i + side))
               for i in range(0, best_height, side) for j in range(0, best_width, side)]
    base = image.resize((processor.size["shortest_edge"], processor.size["shortest_edge"]))
    return torch.stack([torch.from_numpy(np.asarray(
        processor(images=[patch], return_tensors=None)["pixel_values"][0]))
        for patch in [base] + patches])


def repo_expand2square(image, background_color):
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background_color)
    offset = (0, (width - height) // 2) if width > height else ((height - width) // 2, 0)
    result.paste(image, offset)
    return result


def test_repo_anyres_tiles_follow_process_anyres_image():
    config = LlavaImageConfig.from_llava_repo(REPO_V16_CONFIG, REPO_CLIP_PREPROCESSOR)
    processor = repo_clip_processor()
    sizes = SIZES + random_sizes(2) + [(100, 100), (110, 352)]  # ties flip; unpad truncates
    images = [random_image(*size) for size in sizes]
    plans, got = ours(config, images)
    expected = [repo_process_anyres_image(im, processor, V16_PINPOINTS) for im in images]
    assert_equal_tiles(got, expected, plans)


def test_repo_base_tile_equals_transformers_llava_next_base_tile():
    """The stated equivalence: both squash the whole image with bicubic."""
    processor = repo_clip_processor()
    hf = hf_image_processor(LLAVA_16_PREPROCESSOR)
    for size in [(1, 1), (3, 300), (100, 100), (480, 640), (1500, 1100)]:
        image = random_image(*size)
        repo_base = repo_process_anyres_image(image, processor, V16_PINPOINTS)[0]
        assert torch.equal(repo_base, hf_tiles(hf, [image])[0][0])


def test_repo_pad_tiles_follow_expand2square():
    config = LlavaImageConfig.from_llava_repo(REPO_V15_CONFIG, REPO_CLIP_PREPROCESSOR)
    processor = repo_clip_processor()
    fill = tuple(int(x * 255) for x in processor.image_mean)
    images = [random_image(*size) for size in SIZES + random_sizes(2)]
    plans, got = ours(config, images)
    expected = [processor(images=[repo_expand2square(im, fill)],
                          return_tensors=None)["pixel_values"][0] for im in images]
    assert_equal_tiles(got, [torch.from_numpy(np.asarray(e)) for e in expected], plans)
