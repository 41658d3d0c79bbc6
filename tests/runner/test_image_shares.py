"""A step's images split over real tensor-parallel ranks (gloo, spawned:
tests/tp_ranks.py): each rank encodes only its share, every rank ends with
every image's rows, equal to one process encoding them all (through
VisionBatcher, cache included); a rank with no share still meets the
gather; an image that fails on one rank's share fails the same way on
every rank. Image sizes, rows and counts are fresh every run."""

import random

import pytest
import torch

from pyvlm.runner.encoder_cache import EncoderCache, VisionBatcher
from pyvlm.runner.image_shares import ImageShares, share_owners
from pyvlm.scheduling.types import MultimodalItem
from tests.tp_ranks import Ranks

WIDTH = 6


@pytest.fixture(scope="module")
def two_ranks():
    ranks = Ranks(2)
    yield ranks
    ranks.close()


def rows_of_image(item: MultimodalItem) -> torch.Tensor:
    """The fake tower's rows of an image: a function of its hash alone."""
    generator = torch.Generator().manual_seed(item.hash)
    return torch.randn(item.length, WIDTH, generator=generator, dtype=torch.float64)


class FakeTower:
    """Records which images it encoded; raises for the hash `bad`."""

    def __init__(self, bad=None):
        self.encoded, self.bad = [], bad

    def __call__(self, items):
        if any(item.hash == self.bad for item in items):
            raise ValueError(f"image {self.bad} cannot be encoded")
        self.encoded += [item.hash for item in items]
        return [rows_of_image(item) for item in items]


def fresh_items(count: int, seed: int):
    rng = random.Random(seed)
    hashes = rng.sample(range(1, 1 << 30), count)
    return [MultimodalItem(hash=h, offset=0, length=rng.randint(1, 40)) for h in hashes]


# ---- on the ranks ----------------------------------------------------------------

def embed_on_rank(group, items, bad=None):
    """(rows by hash, what this rank's tower encoded, a second embed's
    encodings: cache hits) through a VisionBatcher sharing over group."""
    tower = FakeTower(bad)
    shares = ImageShares(group, lambda item: item.length, WIDTH, torch.float64,
                         torch.device("cpu"))
    batcher = VisionBatcher(tower, EncoderCache(1 << 24), shares=shares)
    try:
        found = batcher.embed(items)
    except ValueError as exc:
        return ("error", str(exc), tower.encoded)
    encoded_first = list(tower.encoded)
    batcher.embed(items)  # every image is cached on every rank now
    return (found, encoded_first, tower.encoded[len(encoded_first):])


# ---- checks ------------------------------------------------------------------------

def test_owners_go_largest_first_to_the_least_loaded_rank():
    for _ in range(50):
        rows = [random.randint(1, 500) for _ in range(random.randint(0, 12))]
        num_ranks = random.randint(1, 5)
        owners = share_owners(rows, num_ranks)
        assert len(owners) == len(rows) and all(0 <= o < num_ranks for o in owners)
        loads = [sum(r for r, o in zip(rows, owners) if o == rank) for rank in range(num_ranks)]
        if rows:  # greedy: the last image placed went to the least loaded rank
            assert max(loads) - min(loads) <= max(rows)
        assert owners == share_owners(list(rows), num_ranks)  # every rank agrees


def test_each_rank_encodes_its_share_and_every_rank_gets_every_image(two_ranks):
    items = fresh_items(random.randint(3, 9), random.randrange(1 << 30))
    results = two_ranks.run(embed_on_rank, items)
    owners = share_owners([item.length for item in items], 2)
    for rank, (found, encoded, encoded_again) in enumerate(results):
        assert sorted(encoded) == sorted(item.hash for item, owner in zip(items, owners)
                                         if owner == rank)
        assert encoded_again == []  # hits on every rank: the caches agree
        assert set(found) == {item.hash for item in items}
        for item in items:
            torch.testing.assert_close(found[item.hash], rows_of_image(item), rtol=0, atol=0)
    assert all(results[0][1]) and all(results[1][1])  # both ranks had a share


def test_a_rank_without_a_share_still_gets_the_image(two_ranks):
    items = fresh_items(1, random.randrange(1 << 30))
    results = two_ranks.run(embed_on_rank, items)
    assert [len(encoded) for _, encoded, _ in results] == [1, 0]
    for found, _, _ in results:
        torch.testing.assert_close(found[items[0].hash], rows_of_image(items[0]), rtol=0, atol=0)


def test_a_bad_image_in_one_ranks_share_fails_on_every_rank_alike(two_ranks):
    items = fresh_items(random.randint(4, 8), random.randrange(1 << 30))
    owners = share_owners([item.length for item in items], 2)
    bad = next(item.hash for item, owner in zip(items, owners) if owner == 1)
    results = two_ranks.run(embed_on_rank, items, bad)
    assert [result[:2] for result in results] == [
        ("error", f"image {bad} cannot be encoded")] * 2
