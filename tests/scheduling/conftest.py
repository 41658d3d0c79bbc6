import random

import pytest


@pytest.fixture
def rng():
    """A fresh random generator per test; its seed is printed for replay."""
    seed = random.randrange(2**32)
    print(f"rng seed: {seed}")
    return random.Random(seed)
