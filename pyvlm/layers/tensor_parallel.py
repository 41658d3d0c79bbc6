"""This process's place in a tensor-parallel group (Megatron-LM's layout, as
vLLM and SGLang use it): each of `size` ranks holds 1/size of every large
matrix and the ranks' partial results are summed by an all-reduce, through
torch.distributed (NCCL between GPUs, gloo on the CPU).

The group a model is built for is the *current* one (vLLM's parallel
state): the engine sets it around building the model (`building_with`),
and the parallel layers take it when none is passed, so model files need
no group argument. Parts that stay whole on every rank (projectors) are
built inside `replicated()`, vision towers inside `building_tower()`:
replicated, unless the engine builds with shard_towers (its
mm_encoder_tp_mode "weights"), when they split over the group too.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, List

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
    unused by a group of one); host_group: a gloo group of the same ranks
    for agreeing on host values within a step (None: process_group, which
    must then be gloo)."""

    rank: int = 0
    size: int = 1
    process_group: Any = field(default=None, compare=False, repr=False)
    host_group: Any = field(default=None, compare=False, repr=False)

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
        return torch.cat(self.all_gather(part), dim=-1)

    def all_gather(self, part: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's `part` (all of one shape), in rank order."""
        if self.size == 1:
            return [part]
        import torch.distributed as dist

        part = part.contiguous()
        parts = [torch.empty_like(part) for _ in range(self.size)]
        dist.all_gather(parts, part, group=self.process_group)
        return parts

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (a host round trip, no device
        sync); every rank must ask."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX,
                        group=self.host_group if self.host_group is not None
                        else self.process_group)
        return bool(value.item())


SINGLE_RANK = TensorParallelGroup()

_current = SINGLE_RANK
_shard_towers = False


def current_group() -> TensorParallelGroup:
    """The group parallel layers built now split over (SINGLE_RANK unless
    inside building_with)."""
    return _current


@contextlib.contextmanager
def building_with(group: TensorParallelGroup,
                  shard_towers: bool = False) -> Iterator[TensorParallelGroup]:
    """Parallel layers built inside split over `group` (unless given one);
    vision towers too when shard_towers (building_tower)."""
    global _current, _shard_towers
    previous = _current, _shard_towers
    _current, _shard_towers = group, shard_towers
    try:
        yield group
    finally:
        _current, _shard_towers = previous


def building_tower():
    """A vision tower built inside splits its layers over the current group
    when the build shards towers (building_with(..., shard_towers=True)),
    else stays whole on every rank (replicated)."""
    return building_with(_current, True) if _shard_towers else replicated()


def replicated():
    """Layers built inside stay whole on every rank (e.g. a vision tower
    that each rank runs in full)."""
    return building_with(SINGLE_RANK)
