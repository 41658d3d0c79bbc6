"""benchmarks/profile_decode.py's step distribution: the nearest-rank
percentile, and which images a step's chunks start."""

import random

import numpy as np

from benchmarks.profile_decode import percentile, towers_started
from pyvlm.scheduling.types import MultimodalItem


def test_percentile_is_the_nearest_rank():
    rng = random.Random()
    for _ in range(50):
        values = [rng.uniform(0, 100) for _ in range(rng.randint(1, 300))]
        for q in (50, 90, 99, 100, rng.uniform(1, 100)):
            expected = np.percentile(values, q, method="inverted_cdf")
            assert percentile(values, q) == expected


def test_a_step_starts_the_images_whose_first_token_is_in_one_of_its_chunks():
    from types import SimpleNamespace

    def item(offset):
        return MultimodalItem(hash=offset, offset=offset, length=10)

    def chunk(start, length, items):
        return SimpleNamespace(start_pos=start, token_ids=[0] * length, mm_items=items)

    images = [item(0), item(20), item(40)]
    batch = SimpleNamespace(chunks=[
        chunk(0, 25, images),  # starts the images at 0 and 20
        chunk(25, 30, images),  # the one at 40 (20 began in the chunk before)
        chunk(100, 1, [item(3)]),  # a decode of a request whose image is long done
    ])
    assert towers_started(batch) == 3
    assert towers_started(SimpleNamespace(chunks=[chunk(41, 5, images)])) == 0
