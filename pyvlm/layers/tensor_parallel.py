"""This process's place in a tensor-parallel group (Megatron-LM's layout, as
vLLM and SGLang use it): each of `size` ranks holds 1/size of every large
matrix and the ranks' partial results are summed by an all-reduce.

Nothing here talks to other processes yet: a group of size 1 (the default
everywhere) needs no communication, and a larger group can be built, sliced
and loaded (see pyvlm/layers/linear.py) but its all-reduce is not wired to
torch.distributed.
"""

from dataclasses import dataclass

import torch


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """numerator / denominator, which must divide exactly."""
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} does not split evenly over {denominator} ranks")
    return numerator // denominator


@dataclass(frozen=True)
class TensorParallelGroup:
    """rank (0-based) of size ranks that split each parallel layer."""

    rank: int = 0
    size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside [0, {self.size})")

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of `partial` over the group's ranks, the same on every rank.

        The hook RowParallelLinear reduces through: the identity for a group
        of one. Multi-GPU serving fills it in with torch.distributed's
        all_reduce over the group's process group (or a custom all-reduce);
        until then a larger group refuses rather than return a partial sum.
        """
        if self.size == 1:
            return partial
        raise NotImplementedError(
            f"tensor-parallel all-reduce over {self.size} ranks is not wired to "
            "torch.distributed yet; build RowParallelLinear(reduce_results=False) "
            "and sum the ranks' outputs yourself")


SINGLE_RANK = TensorParallelGroup()
