"""This process's place in a tensor-parallel group (Megatron-LM's layout, as
vLLM and SGLang use it): each of `size` ranks holds 1/size of every large
matrix and the ranks' partial results are summed by an all-reduce, through
torch.distributed (NCCL between GPUs, gloo on the CPU).

The group a model is built for is the *current* one (vLLM's parallel
state): the engine sets it around building the model (`building_with`),
and the parallel layers take it when none is passed, so model files need
no group argument. Parts that stay whole on every rank (the vision towers,
by default) are built inside `replicated()`.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """numerator / denominator, which must divide exactly."""
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} does not split evenly over {denominator} ranks")
    return numerator // denominator


@dataclass(frozen=True)
class TensorParallelGroup:
    """rank (0-based) of size ranks that split each parallel layer;
    process_group: the torch.distributed group the ranks' collectives run
    over (None: the default group, once torch.distributed is initialized;
    unused by a group of one)."""

    rank: int = 0
    size: int = 1
    process_group: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside [0, {self.size})")

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of `partial` over the group's ranks, the same on every
        rank (in place: partial is overwritten). The identity for one rank."""
        if self.size == 1:
            return partial
        import torch.distributed as dist

        dist.all_reduce(partial, group=self.process_group)
        return partial

    def all_gather_last_dim(self, part: torch.Tensor) -> torch.Tensor:
        """The ranks' `part`s concatenated along the last dimension, in rank
        order, the same on every rank (e.g. vocab-parallel logits)."""
        if self.size == 1:
            return part
        import torch.distributed as dist

        part = part.contiguous()
        parts = [torch.empty_like(part) for _ in range(self.size)]
        dist.all_gather(parts, part, group=self.process_group)
        return torch.cat(parts, dim=-1)


SINGLE_RANK = TensorParallelGroup()

_current = SINGLE_RANK


def current_group() -> TensorParallelGroup:
    """The group parallel layers built now split over (SINGLE_RANK unless
    inside building_with)."""
    return _current


@contextlib.contextmanager
def building_with(group: TensorParallelGroup) -> Iterator[TensorParallelGroup]:
    """Parallel layers built inside split over `group` (unless given one)."""
    global _current
    previous, _current = _current, group
    try:
        yield group
    finally:
        _current = previous


def replicated():
    """Layers built inside stay whole on every rank (e.g. a vision tower
    that each rank runs in full)."""
    return building_with(SINGLE_RANK)
