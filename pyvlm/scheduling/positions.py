"""Rotary positions of a request's tokens (no torch).

Most models place token i at position i. Qwen2-VL's M-RoPE gives every
prompt token three positions (temporal, height, width): text tokens share
one value on all three rows, image tokens take their patch's grid
coordinates, and tokens after the prompt continue at i + delta on every row
(SGLang's mrope_position_delta). The request builder computes them once,
torch-free, when the request is built; the scheduler hands each chunk its
slice, so the runner never derives positions and a prefix-cache hit, a
chunk boundary inside an image, or a preempted and recomputed request all
see exactly the same positions.
"""

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple


@dataclass(frozen=True)
class MropePositions:
    """rows: the prompt's positions, one tuple per row (3 for M-RoPE), all
    of the prompt's length; delta: generated token i (i >= prompt length)
    sits at i + delta on every row."""

    rows: Tuple[Tuple[int, ...], ...]
    delta: int
    # len(rows[0]), kept: every decode step asks (rows_for)
    num_prompt_tokens: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if len({len(row) for row in self.rows}) > 1:
            raise ValueError("every position row must cover the whole prompt")
        object.__setattr__(self, "num_prompt_tokens", len(self.rows[0]) if self.rows else 0)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def rows_for(self, start: int, count: int) -> List[List[int]]:
        """Positions of tokens start .. start + count - 1, one list per row."""
        if start >= self.num_prompt_tokens:  # generated tokens (every decode step)
            first = start + self.delta
            if count == 1:
                return [[first] for _ in self.rows]
            return [list(range(first, first + count)) for _ in self.rows]
        prompt_end = min(start + count, self.num_prompt_tokens)
        generated = range(max(start, prompt_end) + self.delta, start + count + self.delta)
        return [list(row[start:prompt_end]) + list(generated) for row in self.rows]


def linear_positions(start: int, count: int) -> List[List[int]]:
    """One row: token i at position i."""
    return [list(range(start, start + count))]


def positions_of(mrope: "MropePositions | None", start: int, count: int) -> List[List[int]]:
    """The position rows of tokens start .. start + count - 1 of a request
    whose M-RoPE positions are mrope (None: 1-D positions)."""
    if mrope is None:
        return linear_positions(start, count)
    return mrope.rows_for(start, count)


def text_mrope_positions(prompt_ids: Sequence[int], num_rows: int = 3) -> MropePositions:
    """M-RoPE positions of a prompt without images (every row 0 .. n - 1)."""
    row = tuple(range(len(prompt_ids)))
    return MropePositions(tuple(row for _ in range(num_rows)), 0)
