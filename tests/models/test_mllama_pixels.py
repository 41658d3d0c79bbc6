"""Llama-3.2-Vision tiles against MllamaImageProcessorPil's pixel_values, bit
for bit, for the real tiles (fresh random pixels and sizes every run)."""

import random

import pytest
import torch
from PIL import Image

from pyvlm.models import mllama_pixels
from pyvlm.models.mllama_pixels import mllama_pixel_values
from pyvlm.multimodal.mllama import MllamaImageConfig
from tests.multimodal.hf_mllama import LLAMA_3_2_VISION, hf_processor

# Upscaled 1 x 1, a wide sliver (1 row resized, the rest padding), one tile
# + 1 row (a 2 x 1 canvas, unresized), an exact 1 x 2 grid, a downscaled 2 x 2.
SIZES = [(1, 1), (7, 900), (561, 560), (560, 1120), (800, 1200)]


def random_image(height: int, width: int) -> Image.Image:
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy())


def random_images(num_random_sizes: int, max_side: int = 1300):
    sizes = SIZES + [(random.randint(1, max_side), random.randint(1, max_side))
                     for _ in range(num_random_sizes)]
    return [random_image(height, width) for height, width in sizes]


def hf_tiles(processor, images, plans):
    """transformers' pixel_values of one prompt: the real tiles of each image,
    after checking that its padding tiles are raw zeros."""
    pixel_values = torch.from_numpy(processor(images=[images], return_tensors="np")["pixel_values"])
    tiles = []
    for image_tiles, plan in zip(pixel_values[0], plans):
        assert not image_tiles[plan.num_tiles:].any()
        tiles.append(image_tiles[:plan.num_tiles])
    return tiles


def plans_of(config, images):
    return config.plan_prompt([(im.height, im.width) for im in images])


@pytest.mark.parametrize("preprocessor", [
    LLAMA_3_2_VISION,
    dict(LLAMA_3_2_VISION, resample=3, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4],
         max_image_tiles=6, size={"height": 224, "width": 224}),
])
def test_float32_tiles_equal_transformers(preprocessor):
    images = random_images(2)
    config = MllamaImageConfig.from_hf_configs(preprocessor, {})
    plans = plans_of(config, images)
    ours = mllama_pixel_values(images, plans)
    padded = 0
    for got, want, plan in zip(ours, hf_tiles(hf_processor(**preprocessor), images, plans), plans):
        side = plan.tile_size
        assert got.dtype == torch.float32 and got.shape == (plan.num_tiles, 3, side, side)
        assert got.numel() == plan.num_pixel_values
        assert torch.equal(got, want)
        padded += plan.num_tiles * side * side - plan.num_buffer_pixels
    assert padded > 0  # the canvas padding (normalised zeros) was compared too


def test_the_padding_is_normalised_zero():
    """transformers pads before rescale / normalise: padding is -mean / std."""
    image = random_image(random.randint(1, 50), random.randint(600, 2000))
    plan = MllamaImageConfig().plan((image.height, image.width))
    tiles = mllama_pixel_values([image], [plan])[0]
    norm = plan.normalization
    expected = [(0.0 - m) / s for m, s in zip(norm.mean, norm.std)]
    below_image = tiles[0, :, plan.resized_size[0]:, :]
    for channel, value in enumerate(expected):
        assert torch.allclose(below_image[channel], torch.tensor(value, dtype=torch.float32))


def test_bfloat16_tiles_equal_transformers_float32_rounded():
    images = random_images(1)
    plans = plans_of(MllamaImageConfig(), images)
    ours = mllama_pixel_values(images, plans, dtype=torch.bfloat16)
    for got, want in zip(ours, hf_tiles(hf_processor(**LLAMA_3_2_VISION), images, plans)):
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want.to(torch.bfloat16))


def test_one_op_call_per_shared_normalisation(monkeypatch):
    """Plans of two configs in one prompt: one call each, outputs in order."""
    calls = []
    real_op = mllama_pixels.preprocess_images

    def counting_op(images, *args, **kwargs):
        calls.append(len(images))
        return real_op(images, *args, **kwargs)

    monkeypatch.setattr(mllama_pixels, "preprocess_images", counting_op)
    other = dict(LLAMA_3_2_VISION, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    configs = [MllamaImageConfig.from_hf_configs(p, {}) for p in (LLAMA_3_2_VISION, other)]
    images = random_images(1, max_side=700)
    plans = [configs[i % 2].plan((im.height, im.width)) for i, im in enumerate(images)]
    ours = mllama_pixel_values(images, plans)
    assert sorted(calls) == sorted([len(images[0::2]), len(images[1::2])])
    for i, (image, got) in enumerate(zip(images, ours)):
        processor = hf_processor(**(LLAMA_3_2_VISION, other)[i % 2])
        assert torch.equal(got, hf_tiles(processor, [image], [plans[i]])[0])


def test_an_image_unlike_its_plan_is_refused():
    plan = MllamaImageConfig().plan((10, 20))
    with pytest.raises(ValueError, match="plan"):
        mllama_pixel_values([random_image(20, 10)], [plan])
    with pytest.raises(ValueError, match="plans"):
        mllama_pixel_values([random_image(10, 20)], [])
