"""The tensor-parallel linear layers against nn.Linear.

At one rank each layer is nn.Linear on the same weights. Split over 2 or 4
ranks simulated in this process (every rank's layer built, loaded from the
full checkpoint tensors through its weight loaders and run on the same
input), the column outputs concatenate, and the row outputs sum, to the
unsplit layer's. Sizes, weights and inputs are fresh every run.
"""

import random

import pytest
import torch
from torch import nn

from pyvlm.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                 QKVParallelLinear, RowParallelLinear)
from pyvlm.layers.mlp import GatedMLP
from pyvlm.layers.tensor_parallel import TensorParallelGroup

TP_SIZES = [2, 4]


def random_linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_()
    return layer


def random_size(multiple_of: int = 4) -> int:
    return multiple_of * random.randint(1, 12)


def group(rank: int, size: int) -> TensorParallelGroup:
    return TensorParallelGroup(rank=rank, size=size)


def load_from(layer: nn.Module, ref: nn.Linear, *shard_name: str) -> None:
    """Every parameter of ref through layer's weight loaders (whole tensors)."""
    for kind in ("weight", "bias"):
        if getattr(ref, kind) is not None:
            param = getattr(layer, kind)
            param.weight_loader(param, getattr(ref, kind).detach(), *shard_name)


def inputs(in_features: int) -> torch.Tensor:
    return torch.randn(random.randint(1, 9), in_features)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # The split matmuls sum in another order than the whole one.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


# ---- one rank: nn.Linear -------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layer_class", [ColumnParallelLinear, RowParallelLinear])
def test_one_rank_is_nn_linear(layer_class, bias):
    ref = random_linear(random_size(1), random_size(1), bias)
    layer = layer_class(ref.in_features, ref.out_features, bias)
    load_from(layer, ref)
    x = inputs(ref.in_features)
    with torch.no_grad():
        assert torch.equal(layer(x), ref(x))


@pytest.mark.parametrize("bias", [True, False])
def test_one_rank_merged_and_qkv_are_one_nn_linear(bias):
    hidden, head_dim, num_heads, num_kv_heads = random_size(1), random_size(2), 6, 2
    sizes = {"q_proj": num_heads * head_dim, "k_proj": num_kv_heads * head_dim,
             "v_proj": num_kv_heads * head_dim}
    refs = {name: random_linear(hidden, size, bias) for name, size in sizes.items()}
    merged = MergedColumnParallelLinear(hidden, sizes, bias)
    qkv = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, bias)
    for name, ref in refs.items():
        load_from(merged, ref, name)
        load_from(qkv, ref, name)
    whole = nn.Linear(hidden, sum(sizes.values()), bias)
    with torch.no_grad():
        whole.weight.copy_(torch.cat([ref.weight for ref in refs.values()]))
        if bias:
            whole.bias.copy_(torch.cat([ref.bias for ref in refs.values()]))
        x = inputs(hidden)
        assert torch.equal(merged(x), whole(x)) and torch.equal(qkv(x), whole(x))


# ---- simulated ranks -----------------------------------------------------------


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("bias", [True, False])
def test_column_outputs_concatenate_to_the_whole_layer(tp_size, bias):
    ref = random_linear(random_size(1), random_size(tp_size), bias)
    x = inputs(ref.in_features)
    outputs = []
    for rank in range(tp_size):
        layer = ColumnParallelLinear(ref.in_features, ref.out_features, bias, group(rank, tp_size))
        load_from(layer, ref)
        assert layer.weight.shape == (ref.out_features // tp_size, ref.in_features)
        with torch.no_grad():
            outputs.append(layer(x))
    with torch.no_grad():
        assert_same(torch.cat(outputs, dim=-1), ref(x))


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("bias", [True, False])
def test_row_outputs_sum_to_the_whole_layer_with_the_bias_once(tp_size, bias):
    ref = random_linear(random_size(tp_size), random_size(1), bias)
    x = inputs(ref.in_features)
    x_slices = x.chunk(tp_size, dim=-1)
    outputs = []
    for rank in range(tp_size):
        layer = RowParallelLinear(ref.in_features, ref.out_features, bias, group(rank, tp_size),
                                  reduce_results=False)
        load_from(layer, ref)
        assert layer.weight.shape == (ref.out_features, ref.in_features // tp_size)
        with torch.no_grad():
            outputs.append(layer(x_slices[rank]))
    with torch.no_grad():
        assert_same(sum(outputs), ref(x))


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("bias", [True, False])
def test_merged_gate_up_outputs_are_each_ranks_gate_and_up_slices(tp_size, bias):
    hidden, intermediate = random_size(1), random_size(tp_size)
    refs = {name: random_linear(hidden, intermediate, bias) for name in ("gate_proj", "up_proj")}
    x = inputs(hidden)
    gates, ups = [], []
    for rank in range(tp_size):
        layer = MergedColumnParallelLinear(hidden, {name: intermediate for name in refs}, bias,
                                           group(rank, tp_size))
        for name, ref in refs.items():
            load_from(layer, ref, name)
        with torch.no_grad():
            gate, up = layer(x).chunk(2, dim=-1)
        gates.append(gate)
        ups.append(up)
    with torch.no_grad():
        assert_same(torch.cat(gates, dim=-1), refs["gate_proj"](x))
        assert_same(torch.cat(ups, dim=-1), refs["up_proj"](x))


# (tp_size, num_heads, num_kv_heads): kv heads split, one per rank, and
# fewer than the ranks (replicated).
QKV_CASES = [(2, 8, 4), (2, 8, 2), (2, 4, 1), (4, 8, 8), (4, 8, 4), (4, 8, 2), (4, 4, 1)]


def heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return t.view(t.shape[0], -1, head_dim)


@pytest.mark.parametrize("tp_size,num_heads,num_kv_heads", QKV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_qkv_ranks_hold_their_heads_and_each_query_heads_gqa_group(
        tp_size, num_heads, num_kv_heads, bias):
    hidden, head_dim = random_size(1), random_size(2)
    sizes = {"q_proj": num_heads, "k_proj": num_kv_heads, "v_proj": num_kv_heads}
    refs = {name: random_linear(hidden, n * head_dim, bias) for name, n in sizes.items()}
    x = inputs(hidden)
    with torch.no_grad():
        full = {name: heads(ref(x), head_dim) for name, ref in refs.items()}
    queries_per_kv_head = num_heads // num_kv_heads
    queries = []
    for rank in range(tp_size):
        layer = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, bias,
                                  group(rank, tp_size))
        for name, ref in refs.items():
            load_from(layer, ref, name)
        assert layer.num_heads == num_heads // tp_size
        assert layer.num_kv_heads == max(1, num_kv_heads // tp_size)
        with torch.no_grad():
            q, k, v = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
        queries.append(q)
        # Each local query head attends with the local kv head GQA gives it
        # on this rank; that must be the kv head of its global GQA group.
        local_queries_per_kv_head = layer.num_heads // layer.num_kv_heads
        for local_head in range(layer.num_heads):
            global_head = rank * layer.num_heads + local_head
            local_kv = local_head // local_queries_per_kv_head
            global_kv = global_head // queries_per_kv_head
            assert_same(heads(k, head_dim)[:, local_kv], full["k_proj"][:, global_kv])
            assert_same(heads(v, head_dim)[:, local_kv], full["v_proj"][:, global_kv])
    assert_same(heads(torch.cat(queries, dim=-1), head_dim), full["q_proj"])


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("bias", [True, False])
def test_parallel_gated_mlp_sums_to_the_whole_mlp(tp_size, bias):
    hidden, intermediate = random_size(1), random_size(tp_size)
    whole = GatedMLP(hidden, intermediate, bias)
    with torch.no_grad():
        for param in whole.parameters():
            param.normal_()
    gate, up = whole.gate_up_proj.weight.detach().chunk(2)
    gate_bias, up_bias = whole.gate_up_proj.bias.detach().chunk(2) if bias else (None, None)
    x = inputs(hidden)
    outputs = []
    for rank in range(tp_size):
        mlp = GatedMLP(hidden, intermediate, bias, group(rank, tp_size))
        mlp.down_proj.reduce_results = False  # the test sums the ranks
        for name, weight, b in [("gate_proj", gate, gate_bias), ("up_proj", up, up_bias)]:
            mlp.gate_up_proj.weight.weight_loader(mlp.gate_up_proj.weight, weight, name)
            if bias:
                mlp.gate_up_proj.bias.weight_loader(mlp.gate_up_proj.bias, b, name)
        load_from(mlp.down_proj, whole.down_proj)
        with torch.no_grad():
            outputs.append(mlp(x))
    with torch.no_grad():
        assert_same(sum(outputs), whole(x))


# ---- the reduction hook and refusals -------------------------------------------


def test_the_reduction_is_the_identity_for_one_rank_and_runs_torch_distributed_for_more():
    """One rank returns its input as is; more ranks reduce through
    torch.distributed (over real ranks in tests/layers/test_tensor_parallel.py),
    which this process has not initialized."""
    x = torch.randn(3, 5)
    assert TensorParallelGroup().all_reduce(x) is x
    assert TensorParallelGroup().all_gather_last_dim(x) is x
    layer = RowParallelLinear(4, 6, tp=group(1, 2))
    with pytest.raises((RuntimeError, ValueError), match="init_process_group|not been initialized"):
        layer(torch.randn(3, 2))


def test_uneven_splits_are_refused():
    with pytest.raises(ValueError, match="does not split evenly"):
        ColumnParallelLinear(8, 10, tp=group(0, 4))
    with pytest.raises(ValueError, match="does not split evenly"):
        RowParallelLinear(6, 8, tp=group(0, 4))
    with pytest.raises(ValueError, match="num_heads 6"):
        QKVParallelLinear(16, 8, 6, 2, tp=group(0, 4))
    with pytest.raises(ValueError, match="3 key/value heads"):
        QKVParallelLinear(16, 8, 12, 3, tp=group(0, 4))
    with pytest.raises(ValueError, match="rank 2 is outside"):
        TensorParallelGroup(rank=2, size=2)


def test_loaders_take_only_whole_checkpoint_tensors():
    ref = random_linear(8, 12, True)
    column = ColumnParallelLinear(8, 12, tp=group(1, 2))
    with pytest.raises(ValueError, match=r"expected shape \(12, 8\), got \(6, 8\)"):
        column.weight.weight_loader(column.weight, ref.weight.detach()[:6])
    row = RowParallelLinear(12, 8, tp=group(1, 2))
    with pytest.raises(ValueError, match=r"expected shape \(8, 12\), got \(8, 6\)"):
        row.weight.weight_loader(row.weight, torch.randn(8, 6))
    qkv = QKVParallelLinear(8, 4, 2, 1)
    with pytest.raises(ValueError, match="no shard 'o_proj'"):
        qkv.weight.weight_loader(qkv.weight, torch.randn(4, 8), "o_proj")
