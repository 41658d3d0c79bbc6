"""Linear layers whose weight stacks several checkpoint matrices.

Fusing q/k/v (and gate/up) into one matmul is how vLLM-style engines save
kernel launches; `load_shard` copies each checkpoint matrix into its rows
of the existing parameter, so loading never keeps a second copy.
"""

from typing import Dict, Sequence

import torch
from torch import nn


class StackedLinear(nn.Linear):
    """nn.Linear whose output rows are the concatenation of named shards."""

    def __init__(self, in_features: int, shard_sizes: Dict[str, int], bias: bool):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: Dict[str, tuple] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    @property
    def shard_names(self) -> Sequence[str]:
        return tuple(self.shard_offsets)

    def load_shard(self, shard: str, param_name: str, loaded: torch.Tensor) -> None:
        """Copies a checkpoint tensor into the rows of shard (param_name is
        "weight" or "bias")."""
        offset, size = self.shard_offsets[shard]
        target = getattr(self, param_name).data.narrow(0, offset, size)
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard} {param_name}: expected shape "
                             f"{tuple(target.shape)}, got {tuple(loaded.shape)}")
        target.copy_(loaded)


def qkv_linear(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
               bias: bool) -> StackedLinear:
    """The fused q/k/v projection (GQA: fewer key/value heads)."""
    return StackedLinear(hidden_size, {"q_proj": num_heads * head_dim,
                                       "k_proj": num_kv_heads * head_dim,
                                       "v_proj": num_kv_heads * head_dim}, bias)
