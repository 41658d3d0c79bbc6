"""Linear layers split for tensor parallelism (Megatron-LM's column/row
scheme, with vLLM's names), each parameter carrying its own weight loader.

- ColumnParallelLinear splits the output features: rank r computes its
  1/size of them. Its output stays split: the row-parallel layer after it
  takes exactly that split as its input.
- RowParallelLinear splits the input features: each rank computes a partial
  sum of the full output, and the ranks' partials are summed by the group's
  all-reduce (pyvlm.layers.tensor_parallel; the identity for one rank).
- MergedColumnParallelLinear fuses several column-parallel matrices on one
  input into one matmul (gate/up); QKVParallelLinear fuses q/k/v, splitting
  heads over the ranks and replicating key/value heads when there are fewer
  of them than ranks (GQA). FusedQKVParallelLinear splits the same way a
  q/k/v projection that the checkpoint already stores as one tensor
  (Qwen2-VL's vision `attn.qkv`).

A checkpoint tensor is always the full, unsplit one: `param.weight_loader(
param, tensor[, shard_name])` copies this rank's slice into the existing
parameter in place, so loading never keeps a second copy. The same loader
is the layer's `weight_loader` method; pyvlm's own loader calls that, since
a parameter rebuilt by deepcopy or to_empty loses its attributes. With the
default group (rank 0 of 1) every layer computes exactly what nn.Linear does.

A layer's `tp` defaults to the group current when it is built
(pyvlm.layers.tensor_parallel.current_group): the engine builds the model
inside `building_with(group)`, so model files pass no group.
"""

import math
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from .tensor_parallel import TensorParallelGroup, current_group, divide

# Up to this many token rows, a CUDA linear layer with 16-bit weights runs
# pyvlm's skinny GEMM instead of cuBLAS: a decode step reads every weight
# once, and cuBLAS's split-K GEMV adds a reduction kernel per layer. On an
# H100 it is 4-15% faster than cuBLAS at 1 and 2 tokens for every Qwen2-VL-7B
# decode matrix, and slower from 4 (its CUDA-core FMAs grow with the tokens;
# benchmarks/RESULTS.md, "Skinny GEMM"). PYVLM_SKINNY_GEMM_MAX_TOKENS
# overrides it for A/B runs (0: always cuBLAS).
MAX_SKINNY_GEMM_TOKENS = int(os.environ.get("PYVLM_SKINNY_GEMM_MAX_TOKENS", "2"))
_SKINNY_DTYPES = (torch.float16, torch.bfloat16)


def takes_skinny_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear() runs x @ weight^T as the skinny GEMM."""
    return (x.is_cuda and x.dtype in _SKINNY_DTYPES and weight.dtype == x.dtype
            and x.shape[-1] > 0 and x.numel() // x.shape[-1] <= MAX_SKINNY_GEMM_TOKENS
            and x.stride(-1) == 1 and weight.is_contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), by the skinny GEMM for a few tokens on CUDA.

    Both accumulate in float32 and round once, so they differ only in the
    order of the sums.
    """
    if takes_skinny_gemm(x, weight):
        return ops.skinny_gemm(x, weight, bias)
    return F.linear(x, weight, bias)


def _copy_slice(target: torch.Tensor, loaded: torch.Tensor, dim: int, start: int,
                full_size: int) -> None:
    """target <- loaded.narrow(dim, start, target.shape[dim]), where loaded
    must be the whole checkpoint tensor (full_size along dim)."""
    expected = list(target.shape)
    expected[dim] = full_size
    if list(loaded.shape) != expected:
        raise ValueError(f"expected shape {tuple(expected)}, got {tuple(loaded.shape)}")
    target.copy_(loaded.narrow(dim, start, target.shape[dim]))


class ParallelLinear(nn.Module):
    """y = x W^T + b on this rank's [out_features, in_features] slice of W.

    input_size/output_size are the full layer's; in_features/out_features
    this rank's (as nn.Linear names its weight's shape). Parameters are
    initialised as nn.Linear's (checkpoints overwrite them) and each gets a
    `weight_loader` attribute.
    """

    def __init__(self, input_size: int, output_size: int, in_features: int, out_features: int,
                 bias: bool, tp: TensorParallelGroup):
        super().__init__()
        self.tp = tp
        self.input_size, self.output_size = input_size, output_size
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features)) if bias else None)
        self._init_like_nn_linear()
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader

    def _init_like_nn_linear(self) -> None:
        # nn.Linear.reset_parameters, draw for draw, so a seeded model builds
        # the same random weights as with nn.Linear.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_name: Optional[str] = None) -> None:
        """Copies this rank's slice of the full checkpoint tensor `loaded`
        into param (shard_name: which fused matrix it is, for merged layers);
        ValueError if loaded has the wrong shape."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_size={self.output_size}, "
                f"bias={self.bias is not None}, tp_rank={self.tp.rank}, tp_size={self.tp.size}")


@dataclass(frozen=True)
class OutputShard:
    """One checkpoint matrix of a column-parallel layer, as this rank holds it."""

    offset: int  # its first row in this rank's weight
    size: int  # its rows on this rank
    source_start: int  # the first of them in the checkpoint matrix
    source_size: int  # the checkpoint matrix's rows


def output_shards(sizes: Mapping[Optional[str], Tuple[int, int]],
                  tp: TensorParallelGroup) -> Dict[Optional[str], OutputShard]:
    """Rows of each matrix on this rank. sizes: name -> (rows of the whole
    matrix, how many consecutive ranks hold the same slice of it: 1 unless
    the matrix is replicated, as GQA's key/value heads on more ranks than
    heads)."""
    shards, offset = {}, 0
    for name, (full_size, num_replicas) in sizes.items():
        size = divide(full_size, tp.size // num_replicas, f"{name or 'output'} size")
        start = (tp.rank // num_replicas) * size
        shards[name] = OutputShard(offset, size, start, full_size)
        offset += size
    return shards


class ColumnParallelLinear(ParallelLinear):
    """A linear layer whose output features are split over the ranks: rank r
    computes features [r * n, (r + 1) * n) of the full layer, n = output_size
    / tp.size. The output is not gathered."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 tp: Optional[TensorParallelGroup] = None):
        self._init_shards(input_size, {None: (output_size, 1)}, bias, tp)

    def _init_shards(self, input_size: int, sizes: Mapping[Optional[str], Tuple[int, int]],
                     bias: bool, tp: Optional[TensorParallelGroup]) -> None:
        tp = tp or current_group()
        shards = output_shards(sizes, tp)
        out_features = sum(shard.size for shard in shards.values())
        output_size = sum(full_size for full_size, _ in sizes.values())
        super().__init__(input_size, output_size, input_size, out_features, bias, tp)
        self.output_shards = shards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_name: Optional[str] = None) -> None:
        """Copies this rank's rows of a checkpoint weight or bias (of the
        fused matrix `shard_name`, for the merged layers)."""
        if shard_name not in self.output_shards:
            raise ValueError(f"no shard {shard_name!r} (shards: "
                             f"{', '.join(map(str, self.output_shards))})")
        shard = self.output_shards[shard_name]
        target = param.data.narrow(0, shard.offset, shard.size)
        _copy_slice(target, loaded, 0, shard.source_start, shard.source_size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel matrices on the same input, fused into one matmul
    (gate_proj and up_proj): each is split over the ranks on its own, so
    rank r's output is [gate_r | up_r], in the order of output_sizes."""

    def __init__(self, input_size: int, output_sizes: Mapping[str, int], bias: bool = True,
                 tp: Optional[TensorParallelGroup] = None):
        self._init_shards(input_size, {name: (size, 1) for name, size in output_sizes.items()},
                          bias, tp)

    @property
    def shard_names(self) -> Sequence[str]:
        """The checkpoint modules fused here ("gate_proj", "up_proj")."""
        return tuple(self.output_shards)


def _kv_replicas(num_kv_heads: int, tp_size: int) -> int:
    """How many ranks hold each key/value head (1: the heads are split)."""
    if num_kv_heads >= tp_size:
        divide(num_kv_heads, tp_size, "num_kv_heads")
        return 1
    if tp_size % num_kv_heads:
        raise ValueError(f"{num_kv_heads} key/value heads cannot be replicated evenly "
                         f"over {tp_size} ranks")
    return tp_size // num_kv_heads


def num_local_kv_heads(num_kv_heads: int, tp: Optional[TensorParallelGroup] = None) -> int:
    """Key/value heads each rank holds (of the current group by default):
    num_kv_heads / tp.size, or 1 when the heads are replicated. The KV
    cache of a rank holds exactly these heads."""
    tp = tp or current_group()
    return num_kv_heads * _kv_replicas(num_kv_heads, tp.size) // tp.size


class KVParallelLinear(ColumnParallelLinear):
    """A key or value projection on its own, heads split over the ranks as
    QKVParallelLinear splits them (replicated when fewer than the ranks):
    for attention whose keys come from another input than its queries
    (mllama's cross-attention reads the image states). num_kv_heads is
    this rank's."""

    def __init__(self, input_size: int, head_dim: int, num_kv_heads: int, bias: bool = True,
                 tp: Optional[TensorParallelGroup] = None):
        tp = tp or current_group()
        replicas = _kv_replicas(num_kv_heads, tp.size)
        self._init_shards(input_size, {None: (num_kv_heads * head_dim, replicas)}, bias, tp)
        self.head_dim = head_dim
        self.num_kv_heads = self.out_features // head_dim


class QKVParallelLinear(MergedColumnParallelLinear):
    """The fused q/k/v projection, attention heads split over the ranks.

    Rank r holds num_heads / tp.size query heads and num_kv_heads / tp.size
    key/value heads; with fewer key/value heads than ranks each is
    replicated on tp.size / num_kv_heads consecutive ranks (rank r holds
    head r // replicas), so every query head still meets its GQA group.
    num_heads, num_kv_heads, q_size and kv_size are this rank's.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = True, tp: Optional[TensorParallelGroup] = None,
                 shard_names: Sequence[str] = ("q_proj", "k_proj", "v_proj")):
        tp = tp or current_group()
        num_local_heads = divide(num_heads, tp.size, "num_heads")
        replicas = _kv_replicas(num_kv_heads, tp.size)
        q_name, k_name, v_name = shard_names
        self._init_shards(hidden_size, {q_name: (num_heads * head_dim, 1),
                                        k_name: (num_kv_heads * head_dim, replicas),
                                        v_name: (num_kv_heads * head_dim, replicas)}, bias, tp)
        self.head_dim = head_dim
        self.num_heads = num_local_heads
        self.num_kv_heads = self.output_shards[k_name].size // head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim


class FusedQKVParallelLinear(ColumnParallelLinear):
    """A q/k/v projection stored in the checkpoint as ONE tensor, [q rows;
    k rows; v rows] (and one bias likewise), split by heads as
    QKVParallelLinear splits three separate ones: rank r holds
    [q_r; k_r; v_r], its query heads' rows then its key/value heads' rows
    (replicated when fewer key/value heads than ranks). The weight loader
    takes the whole fused tensor and copies the rank's rows of each block.
    With one rank it is nn.Linear(hidden_size, q + 2 * kv rows).
    num_heads, num_kv_heads, q_size and kv_size are this rank's.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int,
                 num_kv_heads: Optional[int] = None, bias: bool = True,
                 tp: Optional[TensorParallelGroup] = None):
        tp = tp or current_group()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        num_local_heads = divide(num_heads, tp.size, "num_heads")
        replicas = _kv_replicas(num_kv_heads, tp.size)
        self._init_shards(hidden_size, {"q": (num_heads * head_dim, 1),
                                        "k": (num_kv_heads * head_dim, replicas),
                                        "v": (num_kv_heads * head_dim, replicas)}, bias, tp)
        self.head_dim = head_dim
        self.num_heads = num_local_heads
        self.num_kv_heads = self.output_shards["k"].size // head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_name: Optional[str] = None) -> None:
        """Copies this rank's rows of each block (q, k, v) of the whole
        fused checkpoint weight or bias."""
        if shard_name is not None:
            raise ValueError(f"a fused q/k/v layer loads one tensor, not shard {shard_name!r}")
        expected = (self.output_size, *param.shape[1:])
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expected shape {expected}, got {tuple(loaded.shape)}")
        block_start = 0
        for shard in self.output_shards.values():
            param.data.narrow(0, shard.offset, shard.size).copy_(
                loaded.narrow(0, block_start + shard.source_start, shard.size))
            block_start += shard.source_size


class RowParallelLinear(ParallelLinear):
    """A linear layer whose input features are split over the ranks: rank r
    takes features [r * n, (r + 1) * n), n = input_size / tp.size (a
    column-parallel layer's output), and the ranks' partial products are
    summed by tp.all_reduce.

    The bias enters the sum once: rank 0 adds it to its partial product
    (in the same matmul), the other ranks add none, so the reduced output
    holds it exactly once on every rank (vLLM does the same). Every rank
    still loads the whole bias. reduce_results=False returns the partial
    product unreduced, for a caller that reduces later (or sums the ranks
    itself, as the tests do).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 tp: Optional[TensorParallelGroup] = None, reduce_results: bool = True):
        tp = tp or current_group()
        super().__init__(input_size, output_size, divide(input_size, tp.size, "input size"),
                         output_size, bias, tp)
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        return self.tp.all_reduce(partial) if self.reduce_results else partial

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_name: Optional[str] = None) -> None:
        """Copies this rank's columns of the checkpoint weight, or the whole bias."""
        if shard_name is not None:
            raise ValueError(f"a row-parallel layer has no shard {shard_name!r}")
        if param is self.bias:
            _copy_slice(param.data, loaded, 0, 0, self.output_size)
        else:
            _copy_slice(param.data, loaded, 1, self.tp.rank * self.in_features, self.input_size)
