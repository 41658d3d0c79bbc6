"""mllama's cross-attention token spans against transformers' processor
functions (get_cross_attention_token_mask, then the dense mask), on fresh
random prompts with 0 to 4 image tokens, consecutive ones included."""

import random

import numpy as np
import pytest
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

from pyvlm.multimodal.mllama_masks import ImageSpan, image_spans, images_attended

IMAGE = 7


def random_prompt(num_images: int, consecutive: bool) -> list:
    ids = [random.randint(10, 99) for _ in range(random.randint(num_images + 1, 30))]
    places = sorted(random.sample(range(len(ids)), num_images))
    if consecutive and num_images >= 2:
        first = random.randrange(num_images - 1)
        places[first + 1] = places[first] + 1 if places[first] + 1 < len(ids) else places[first + 1]
        places = sorted(set(places))
    for place in places:
        ids[place] = IMAGE
    return ids


def dense_ours(ids, num_generated: int) -> np.ndarray:
    spans = image_spans(ids, IMAGE)
    length = len(ids) + num_generated
    mask = np.zeros((length, max(len(spans), 1)), dtype=np.int64)
    for position in range(length):
        for index in images_attended(spans, position):
            mask[position, index] = 1
    return mask


@pytest.mark.parametrize("num_images", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("consecutive", [False, True])
def test_spans_equal_transformers_dense_mask(num_images, consecutive):
    for _ in range(20):
        ids = random_prompt(num_images, consecutive)
        sparse = get_cross_attention_token_mask(ids, IMAGE)
        count = ids.count(IMAGE)
        if count == 0:
            assert image_spans(ids, IMAGE) == []
            continue
        theirs = convert_sparse_cross_attention_mask_to_dense(
            [sparse], [[1] * count], max_num_tiles=1, length=len(ids))[0, :, :, 0]
        assert np.array_equal(dense_ours(ids, 0), theirs), (ids, sparse)


def test_generated_tokens_attend_as_the_last_prompt_token():
    ids = [11, IMAGE, 12, 13, IMAGE, IMAGE, 14, 15]
    mask = dense_ours(ids, num_generated=5)
    assert all(np.array_equal(mask[len(ids) - 1], row) for row in mask[len(ids):])
    assert image_spans(ids, IMAGE) == [ImageSpan(1, 4), ImageSpan(4, None), ImageSpan(5, None)]
    assert images_attended(image_spans(ids, IMAGE), 0) == []  # text before any image
