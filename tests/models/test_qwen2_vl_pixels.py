"""Qwen2-VL patch rows against Qwen2VLImageProcessorPil's pixel_values, bit
for bit (fresh random pixels every run)."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from pyvlm.models import qwen2_vl_pixels
from pyvlm.models.qwen2_vl_pixels import qwen2_vl_pixel_values
from pyvlm.multimodal.llava_onevision import Normalization
from pyvlm.multimodal.qwen2_vl import Qwen2VLImageConfig
from tests.multimodal.hf_qwen2_vl import hf_image_processor

# 1 x 1 is scaled up to 56 x 56; 1100 x 1300 is over the default max_pixels.
SIZES = [(1, 1), (27, 332), (332, 27), (480, 640), (1100, 1300), (20, 3990)]


def random_image(height: int, width: int) -> Image.Image:
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy())


def random_size(max_side: int):
    """A fresh (height, width) within Qwen2-VL's 200:1 aspect-ratio limit."""
    width = random.randint(30, max_side)
    return random.randint(max(1, -(-width // 200)), max_side), width


def random_images(num_random_sizes: int, max_side: int = 500):
    """Images of every size of SIZES and of num_random_sizes fresh ones."""
    sizes = SIZES + [random_size(max_side) for _ in range(num_random_sizes)]
    return [random_image(height, width) for height, width in sizes]


def hf_rows(processor, images):
    """transformers' pixel_values of one call, split per image."""
    out = processor(images=images, return_tensors="np")
    rows = [int(np.prod(grid)) for grid in out["image_grid_thw"]]
    return list(torch.from_numpy(out["pixel_values"]).split(rows))


@pytest.mark.parametrize("preprocessor", [
    {}, dict(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28),
    dict(resample=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
])
def test_float32_rows_equal_transformers(preprocessor):
    images = random_images(3)
    config = Qwen2VLImageConfig.from_hf_configs(preprocessor, {})
    plans = config.plan_prompt([(im.height, im.width) for im in images])
    ours = qwen2_vl_pixel_values(images, plans)
    expected = hf_rows(hf_image_processor(**preprocessor), images)
    for got, want, plan in zip(ours, expected, plans):
        assert got.dtype == torch.float32
        assert got.shape == (plan.num_patches, 3 * 2 * 14 * 14) == want.shape
        assert got.numel() == plan.num_pixel_values
        assert torch.equal(got, want)


def test_bfloat16_rows_equal_transformers_float32_rounded():
    images = random_images(1)
    plans = Qwen2VLImageConfig().plan_prompt([(im.height, im.width) for im in images])
    ours = qwen2_vl_pixel_values(images, plans, dtype=torch.bfloat16)
    for got, want in zip(ours, hf_rows(hf_image_processor(), images)):
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want.to(torch.bfloat16))


def test_one_op_call_per_shared_normalisation(monkeypatch):
    """Plans of two configs in one prompt: one call each, each matching its
    own transformers processor, outputs in the images' order."""
    calls = []
    real_op = qwen2_vl_pixels.preprocess_images_patchify

    def counting_op(images, *args, **kwargs):
        calls.append(len(images))
        return real_op(images, *args, **kwargs)

    monkeypatch.setattr(qwen2_vl_pixels, "preprocess_images_patchify", counting_op)
    gray = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    images = [random_image(*random_size(300)) for _ in range(4)]
    configs = [Qwen2VLImageConfig(), Qwen2VLImageConfig.from_hf_configs(gray, {})]
    plans = [configs[i % 2].plan((im.height, im.width)) for i, im in enumerate(images)]
    ours = qwen2_vl_pixel_values(images, plans)
    assert calls == [2, 2]
    for i, (image, got) in enumerate(zip(images, ours)):
        (want,) = hf_rows(hf_image_processor(**([{}, gray][i % 2])), [image])
        assert torch.equal(got, want)


def test_no_images_make_no_rows():
    assert qwen2_vl_pixel_values([], []) == []


def test_inputs_that_do_not_fit_the_plans_are_refused():
    config = Qwen2VLImageConfig()
    image = random_image(40, 60)
    with pytest.raises(ValueError, match="image is 40x60 but its plan is for"):
        qwen2_vl_pixel_values([image], [config.plan((60, 40))])
    with pytest.raises(ValueError, match="1 images but 2 plans"):
        qwen2_vl_pixel_values([image], [config.plan((40, 60))] * 2)
    with pytest.raises(ValueError, match="expected an RGB image"):
        qwen2_vl_pixel_values([image.convert("L")], [config.plan((40, 60))])


def test_plans_keep_the_normalisation_they_were_given():
    norm = Normalization(resample=2, rescale_factor=1 / 255, mean=(0.1, 0.2, 0.3),
                         std=(0.4, 0.5, 0.6))
    plan = Qwen2VLImageConfig(normalization=norm).plan((30, 30))
    assert plan.normalization == norm
