"""encoder_budget: a chunk pays for its tokens plus the tower work of the
images it starts (all of their placeholder tokens) and, when it cannot, is
cut to the longest chunk it can pay for; checked against a brute force over
every cut, on fresh random layouts."""

import random

from pyvlm.scheduling.encoder_budget import fit_chunk, tower_charge
from pyvlm.scheduling.types import MultimodalItem


def random_layout(rng: random.Random):
    """Images (some cross-attention ones, charged elsewhere) between text."""
    items, position = [], rng.randint(0, 5)
    for _ in range(rng.randint(0, 4)):
        length = rng.randint(1, 30)
        cross = rng.randint(0, 99) if rng.random() < 0.2 else 0
        items.append(MultimodalItem(rng.getrandbits(60), position, length, num_cross_rows=cross))
        position += length + rng.randint(0, 8)
    return items, position + rng.randint(0, 10)


def tower(items, start, end) -> int:
    """Brute force: the placeholder tokens of every embedded image whose
    first token the chunk [start, end) holds."""
    return sum(item.length for item in items
               if not item.num_cross_rows and start <= item.offset < end)


def test_fit_chunk_takes_the_longest_cut_it_can_pay_for():
    rng = random.Random()
    for _ in range(3000):
        items, length = random_layout(rng)
        start = rng.randint(0, length - 1) if length else 0
        num_tokens = rng.randint(1, max(1, length - start))
        budget = rng.randint(0, 80)
        end = start + num_tokens
        assert tower_charge(items, start, end) == tower(items, start, end)
        fitting = [cut for cut in range(start + 1, end + 1)
                   if cut - start + tower(items, start, cut) <= budget]
        best = max(fitting, default=None)
        paid = (best - start, tower(items, start, best)) if best else (0, 0)
        assert fit_chunk(items, start, num_tokens, budget, True, must_run=False) == paid
        # The step's first chunk runs as granted only when no cut fits.
        whole = (num_tokens, tower(items, start, end))
        assert fit_chunk(items, start, num_tokens, budget, True, must_run=True) == (
            paid if best else whole)
        # Without chunking a chunk runs whole and is charged in full.
        assert fit_chunk(items, start, num_tokens, budget, False, must_run=False) == whole


def test_an_image_already_started_costs_nothing_more():
    image = MultimodalItem(7, offset=10, length=40)
    assert tower_charge([image], 10, 20) == 40  # this chunk starts it
    assert tower_charge([image], 20, 30) == 0  # an earlier one did (encoder cache)
    assert fit_chunk([image], 0, 30, 20, True, must_run=False) == (10, 0)  # text only
    assert fit_chunk([image], 0, 30, 55, True, must_run=False) == (15, 40)  # 5 of its tokens
    assert fit_chunk([image], 0, 30, 70, True, must_run=False) == (30, 40)
