"""pyvlm.multimodal.image_sizes against transformers' own size functions."""

import random
import subprocess
import sys

import numpy as np
import pytest

from pyvlm.multimodal import image_sizes

transformers = pytest.importorskip("transformers")
from transformers.image_transforms import (  # noqa: E402
    center_crop, get_resize_output_image_size, get_size_with_aspect_ratio)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # noqa: E402

SIZES = [(1, 1), (1, 2000), (2000, 1), (3, 7), (224, 224), (480, 640), (667, 1000),
         (3000, 4000), (1001, 999)] + [(random.randint(1, 3000), random.randint(1, 3000))
                                       for _ in range(200)]


@pytest.mark.parametrize("max_size", [None, 1333])
def test_shortest_edge_size_matches_transformers(max_size):
    for h, w in SIZES:
        image = np.zeros((3, h, w), dtype=np.uint8)
        for edge in (224, 336, 800):
            expected = get_resize_output_image_size(image, edge, default_to_square=False,
                                                    max_size=max_size, input_data_format="channels_first")
            assert image_sizes.shortest_edge_size(h, w, edge, max_size) == tuple(expected)


def test_shortest_longest_edge_size_matches_transformers():
    for h, w in SIZES:
        for edge, longest in [(224, None), (800, 1333), (56 * 56, 28 * 28 * 1280)]:
            expected = get_size_with_aspect_ratio((h, w), edge, longest)
            assert image_sizes.shortest_longest_edge_size(h, w, edge, longest) == tuple(expected)


def test_center_crop_top_left_matches_transformers():
    for h, w in [(1, 1), (3, 7), (8, 9), (224, 298), (5, 300), (301, 4)]:
        image = (np.arange(h * w, dtype=np.int64).reshape(1, h, w) + 1)
        for ch, cw in [(1, 1), (2, 3), (224, 224), (7, 9), (300, 5)]:
            got = center_crop(image, (ch, cw), input_data_format="channels_first")[0]
            top, left = image_sizes.center_crop_top_left(h, w, ch, cw)
            # Rebuild the window (zeros outside the image) from our top-left.
            ours = np.zeros((ch, cw), dtype=np.int64)
            for y in range(max(top, 0), min(top + ch, h)):
                for x in range(max(left, 0), min(left + cw, w)):
                    ours[y - top, x - left] = image[0, y, x]
            assert np.array_equal(got, ours), (h, w, ch, cw)


def test_smart_resize_matches_transformers():
    for h, w in SIZES:
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError, match="aspect ratio"):
                image_sizes.smart_resize(h, w)
            continue
        for factor, lo, hi in [(28, 56 * 56, 28 * 28 * 1280), (32, 3136, 12845056), (28, 4 * 28 * 28, 16384 * 28 * 28)]:
            assert image_sizes.smart_resize(h, w, factor, lo, hi) == smart_resize(h, w, factor, lo, hi)


def test_fixed_size_and_clip_plan():
    assert image_sizes.fixed_size(5, 9, 384, 384) == (384, 384)
    assert image_sizes.clip_resize_and_crop(480, 640) == ((224, 298), (0, 37))


def test_image_sizes_imports_no_torch_or_numpy():
    code = ("import sys, pyvlm.multimodal.image_sizes; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
