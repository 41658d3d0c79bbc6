"""LLaVA-OneVision pixel tiles against LlavaOnevisionImageProcessorPil, and
token counts against the rows transformers' tiny model produces."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyvlm.multimodal.image_io import decode_image
from pyvlm.multimodal.llava_onevision import Normalization
from pyvlm.models.llava_pixels import llava_pixel_values as llava_onevision_pixel_values
from tests import tiny_models
from tests.multimodal.hf_llava_onevision import hf_image_processor, pyvlm_config

IMAGES = Path("/work/shared/data/images")
PHOTOS = ["cat.jpeg", "dog.jpeg", "example_image.png", "logo.png"]
SYNTHETIC = [(1, 1), (1, 500), (500, 1), (3, 7), (37, 150), (150, 37), (31, 33), (64, 64),
             (97, 190), (190, 97), (160, 30), (250, 250)]
rng = np.random.default_rng()


def random_image(height, width) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_tiles(processor, images):
    """transformers' pixel_values for one prompt, one tensor per image (its
    own tiles only: the cross-image batch padding is cut off)."""
    out = processor(images=[images], return_tensors=None)
    num_images = len(images)
    return [torch.from_numpy(np.asarray(out["pixel_values"][i])) for i in range(num_images)]


def assert_prompt_matches(name, images, hf_processor):
    config = pyvlm_config(name)
    plans = config.plan_prompt([(im.height, im.width) for im in images])
    ours = llava_onevision_pixel_values(images, plans, "cpu")
    for got, expected, plan in zip(ours, hf_tiles(hf_processor, images), plans):
        expected = expected[:plan.num_tiles]  # HF pads each image to the batch's tile count
        assert got.shape == expected.shape == (plan.num_tiles, 3, config.tile_size, config.tile_size)
        assert got.dtype == torch.float32
        assert (got - expected).abs().max().item() <= 1e-6


@pytest.fixture(scope="module")
def photos():
    return [decode_image((IMAGES / name).read_bytes()) for name in PHOTOS]


def test_tiny_single_image_synthetic_sizes():
    processor = hf_image_processor("tiny")
    for height, width in SYNTHETIC:
        assert_prompt_matches("tiny", [random_image(height, width)], processor)


def test_tiny_photos_single_and_multi_image(photos):
    processor = hf_image_processor("tiny")
    for photo in photos:
        assert_prompt_matches("tiny", [photo], processor)
    assert_prompt_matches("tiny", photos, processor)
    assert_prompt_matches("tiny", [random_image(1, 500), random_image(300, 2)], processor)


def test_7b_config_photo_and_odd_sizes(photos):
    processor = hf_image_processor("7b")
    assert_prompt_matches("7b", [photos[2]], processor)  # 570 x 380 JPEG named .png
    for height, width in [(1, 500), (500, 1), (37, 1500), (800, 390)]:
        assert_prompt_matches("7b", [random_image(height, width)], processor)


def test_7b_config_multi_image_prompt(photos):
    processor = hf_image_processor("7b")
    assert_prompt_matches("7b", [photos[0], random_image(90, 400), random_image(3, 3)], processor)


def test_mixed_normalisations_in_one_batch():
    """Plans from two configs (different mean/std) in one call keep their own."""
    small, large = random_image(50, 70), random_image(20, 90)
    tiny_plan = pyvlm_config("tiny").plan((50, 70), 1)
    other = dataclasses.replace(pyvlm_config("tiny"), normalization=Normalization())
    other_plan = other.plan((20, 90), 1)
    got = llava_onevision_pixel_values([small, large], [tiny_plan, other_plan], "cpu")
    alone = [llava_onevision_pixel_values([im], [p], "cpu")[0]
             for im, p in [(small, tiny_plan), (large, other_plan)]]
    assert all(torch.equal(a, b) for a, b in zip(got, alone))
    assert tiny_plan.normalization != other_plan.normalization


def test_wrong_image_for_plan_is_refused():
    plan = pyvlm_config("tiny").plan((10, 20), 1)
    with pytest.raises(ValueError, match="plan"):
        llava_onevision_pixel_values([random_image(20, 10)], [plan], "cpu")


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_models.tiny_llava_onevision("qwen2", seed=0)


def model_rows(model, images, plans):
    """Rows of transformers' packed image features, per image."""
    pixel_values = torch.cat(llava_onevision_pixel_values(images, plans, "cpu"))
    sizes = torch.tensor([[im.height, im.width] for im in images])
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=pixel_values, image_sizes=sizes, vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
            batch_num_images=torch.tensor([len(images)]))
    return [features.shape[0] for features in out.pooler_output]


def test_token_counts_equal_model_feature_rows(tiny_model):
    config = pyvlm_config("tiny")
    big_grid = 0
    for height, width in SYNTHETIC + [(190, 190), (400, 60)]:
        plan = config.plan((height, width), 1)
        big_grid += plan.num_tiles > 10  # grids big enough for anyres_max_9 downsampling
        assert model_rows(tiny_model, [random_image(height, width)], [plan]) == [plan.num_tokens]
    assert big_grid >= 2
    sizes = [(37, 150), (150, 37), (64, 64)]
    images = [random_image(h, w) for h, w in sizes]
    plans = config.plan_prompt(sizes)
    assert model_rows(tiny_model, images, plans) == [p.num_tokens for p in plans] == [17] * 3
