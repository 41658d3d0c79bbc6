"""encoder_budget: a chunk pays for the images it starts (their tokens past
its end) and, when it cannot, ends before the first image it cannot pay
for; checked against a brute force over every cut, on fresh random
layouts."""

import random

from pyvlm.scheduling.encoder_budget import fit_chunk, images_started, tokens_past_chunk
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


def cost(items, start, end) -> int:
    """Brute force: the chunk's tokens plus, for every embedded image whose
    first token it holds, that image's tokens past its end."""
    extra = 0
    for item in items:
        if not item.num_cross_rows and start <= item.offset < end:
            extra += max(0, item.offset + item.length - end)
    return end - start + extra


def test_fit_chunk_takes_the_longest_cut_it_can_pay_for():
    rng = random.Random()
    for _ in range(3000):
        items, length = random_layout(rng)
        start = rng.randint(0, length - 1) if length else 0
        num_tokens = rng.randint(1, max(1, length - start))
        budget = rng.randint(0, 80)
        end = start + num_tokens
        assert tokens_past_chunk(items, start, end) == cost(items, start, end) - num_tokens
        got, extra = fit_chunk(items, start, num_tokens, budget, can_cut=True)
        cuts = [end] + [item.offset for item in images_started(items, start, end)]
        fitting = [cut for cut in cuts if cost(items, start, cut) <= budget]
        best = max(fitting, default=start)
        assert got == best - start, (items, start, num_tokens, budget)
        assert got + extra == (cost(items, start, best) if got else 0)
        # A chunk that must run runs whole and is charged in full.
        assert fit_chunk(items, start, num_tokens, budget, can_cut=False) == (
            num_tokens, cost(items, start, end) - num_tokens)


def test_an_image_already_started_costs_nothing_more():
    image = MultimodalItem(7, offset=10, length=40)
    assert tokens_past_chunk([image], 10, 20) == 30  # this chunk starts it
    assert tokens_past_chunk([image], 20, 30) == 0  # an earlier one did (encoder cache)
    assert fit_chunk([image], 0, 30, budget_left=20, can_cut=True) == (10, 0)  # text only
    assert fit_chunk([image], 0, 30, budget_left=50, can_cut=True) == (30, 20)
