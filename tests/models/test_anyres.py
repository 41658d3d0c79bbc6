"""The pure-Python anyres geometry against transformers' own functions on
random image sizes."""

import random

import torch

from pyvlm.multimodal.llava_onevision import (anyres_grid_shape, num_anyres_tiles,
                                              select_best_resolution)
from pyvlm.multimodal.llava_onevision import unpadding_crop as unpadded_size
from tests.tiny_models import GRID_PINPOINTS, VISION_IMAGE_SIZE

ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def random_sizes(count: int):
    rng = random.Random()
    return [(rng.randint(1, 2000), rng.randint(1, 2000)) for _ in range(count)]


def test_tiles_and_grid_match_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_onevision import modeling_llava_onevision as hf

    for pinpoints, tile in ((GRID_PINPOINTS, VISION_IMAGE_SIZE), (ONEVISION_PINPOINTS, 384)):
        for size in random_sizes(200):
            assert select_best_resolution(size, pinpoints) == tuple(hf_select(size, pinpoints))
            assert num_anyres_tiles(size, pinpoints, tile) == \
                hf.image_size_to_num_patches(size, pinpoints, tile)
            assert anyres_grid_shape(size, pinpoints, tile) == \
                hf.get_anyres_image_grid_shape(size, pinpoints, tile)


def test_unpadded_size_matches_unpad_image():
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    for size in random_sizes(200):
        current = (random.randint(1, 40), random.randint(1, 40))
        top, bottom, left, right = unpadded_size(size, current)
        fmap = torch.arange(current[0] * current[1]).view(1, *current)
        assert torch.equal(fmap[:, top:bottom, left:right], unpad_image(fmap, size))
