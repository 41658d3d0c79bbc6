"""What a prefill chunk costs when it reaches an image (vLLM's encoder
budget, in the prefill budget's tokens).

The step that reaches an image's first placeholder token runs the vision
tower on the whole image, however few of its tokens the chunk holds, and
that tower work comes on top of the decoder's work on the chunk's tokens.
So a chunk is charged its own tokens plus, for every image it starts, the
image's placeholder count (the tower's work, counted as one prompt token
per placeholder: on an H100 a 7B model's tower took ~5 ms for a 391-token
image, its decoder ~8 ms for those tokens; benchmarks/RESULTS.md). With a
step budget of 512 tokens, a 411-token prompt whose image starts near its
top then runs in two mixed
steps, the tower and ~120 tokens, then the rest, instead of one step of
both (three decode steps' time: the streams' inter-token p99). A chunk
that cannot pay is cut where it can (before an image it cannot pay for,
or within the text or the image's tokens after the last image it pays
for); the images' rows of a later chunk come from the encoder cache. A
step's first chunk must make progress: when not even its first token fits
(an image larger than the budget) it runs as granted, charged alike.
Images that enter through cross-attention are charged by their K/V rows
instead (the scheduler's admission).
"""

from typing import Iterable, List, Sequence, Tuple

from pyvlm.scheduling.types import MultimodalItem


def images_started(items: Iterable[MultimodalItem], start: int, end: int) -> List[MultimodalItem]:
    """Embedded images (no cross-attention rows) whose first placeholder
    token is in [start, end), by position."""
    return sorted((item for item in items
                   if not item.num_cross_rows and start <= item.offset < end),
                  key=lambda item: item.offset)


def tower_work(items: Iterable[MultimodalItem]) -> int:
    """The tower work of the embedded images among items (cross-attention
    images are charged by their K/V rows): their placeholder tokens."""
    return sum(item.length for item in items if not item.num_cross_rows)


def tower_charge(items: Iterable[MultimodalItem], start: int, end: int) -> int:
    """The tower work of the images the chunk [start, end) starts: their
    placeholder tokens, all of them."""
    return tower_work(images_started(items, start, end))


def fit_chunk(items: Sequence[MultimodalItem], start: int, num_tokens: int, budget_left: int,
              can_cut: bool, must_run: bool) -> Tuple[int, int]:
    """(tokens, tower): the longest chunk of up to num_tokens from position
    start whose tokens plus tower_charge fit budget_left; (0, 0) when none
    does. can_cut False (chunking off): the whole chunk, whatever the
    budget. must_run (the step's first chunk): the whole chunk when not
    even one token fits."""
    end = start + num_tokens
    images = images_started(items, start, end)
    whole = tower_work(images)
    if not can_cut or num_tokens + whole <= budget_left:
        return num_tokens, whole
    paid = whole
    # Ends past the k-th image's first token pay for images 1..k; from the
    # last image down, the first stretch with room holds the longest cut.
    for k in range(len(images), -1, -1):
        lowest = images[k - 1].offset + 1 if k else start + 1
        highest = images[k].offset if k < len(images) else end
        longest = min(highest, start + budget_left - paid)
        if longest >= lowest:
            return longest - start, paid
        if k:
            paid -= images[k - 1].length
    return (num_tokens, whole) if must_run else (0, 0)
