"""FusedQKVParallelLinear: q/k/v stored as ONE checkpoint tensor [q; k; v]
(Qwen2-VL's vision attn.qkv), split by heads over ranks simulated in this
process (TensorParallelGroup(rank, size), no process group).

At one rank the layer is nn.Linear on the fused tensor. Over 2 and 4 ranks
each rank's q, k and v heads are those of the whole projection computed in
float64 (a GQA query head meets its own key/value head, replicated when
fewer than the ranks), and a row-parallel projection of each rank's heads
sums to the whole one. Sizes, weights and inputs are fresh every run.
"""

import random

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyvlm.layers.linear import FusedQKVParallelLinear, RowParallelLinear
from pyvlm.layers.tensor_parallel import TensorParallelGroup
from pyvlm.models.loader import iter_safetensors
from pyvlm.models.weight_loading import load_weights

# (tp_size, num_heads, num_kv_heads): as many kv heads as heads (the vision
# towers), kv heads split, and fewer than the ranks (replicated).
CASES = [(2, 4, 4), (2, 8, 2), (2, 4, 1), (4, 8, 8), (4, 8, 4), (4, 4, 2), (4, 4, 1)]


def fused_weights(hidden: int, head_dim: int, num_heads: int, num_kv_heads: int):
    """(weight [q + 2 kv rows, hidden], bias) of a whole fused layer, float64."""
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    return torch.randn(rows, hidden, dtype=torch.float64), torch.randn(rows, dtype=torch.float64)


def loaded_layer(weight, bias, head_dim, num_heads, num_kv_heads, tp) -> FusedQKVParallelLinear:
    layer = FusedQKVParallelLinear(weight.shape[1], head_dim, num_heads, num_kv_heads,
                                   bias=bias is not None, tp=tp).double()
    with torch.no_grad():
        layer.weight_loader(layer.weight, weight)
        if bias is not None:
            layer.weight_loader(layer.bias, bias)
    return layer


def heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return t.view(t.shape[0], -1, head_dim)


@pytest.mark.parametrize("bias", [True, False])
def test_one_rank_is_nn_linear_on_the_fused_tensor(bias):
    hidden, head_dim, num_heads = random.randint(1, 24), 2 * random.randint(1, 6), 3
    ref = nn.Linear(hidden, 3 * num_heads * head_dim, bias=bias)
    layer = FusedQKVParallelLinear(hidden, head_dim, num_heads, bias=bias)
    assert layer.weight.shape == ref.weight.shape
    with torch.no_grad():
        layer.weight_loader(layer.weight, ref.weight)
        if bias:
            layer.weight_loader(layer.bias, ref.bias)
        x = torch.randn(random.randint(1, 9), hidden)
        assert torch.equal(layer(x), ref(x))
    assert (layer.num_heads, layer.num_kv_heads) == (num_heads, num_heads)


@pytest.mark.parametrize("tp_size,num_heads,num_kv_heads", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_each_rank_holds_its_heads_rows_of_each_block(tp_size, num_heads, num_kv_heads, bias):
    hidden, head_dim = random.randint(1, 24), 2 * random.randint(1, 6)
    weight, full_bias = fused_weights(hidden, head_dim, num_heads, num_kv_heads)
    full_bias = full_bias if bias else None
    q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
    x = torch.randn(random.randint(1, 9), hidden, dtype=torch.float64)
    full_q, full_k, full_v = (heads(t, head_dim) for t in F.linear(x, weight, full_bias).split(
        [q_rows, kv_rows, kv_rows], dim=-1))
    queries_per_kv_head = num_heads // num_kv_heads
    queries = []
    for rank in range(tp_size):
        layer = loaded_layer(weight, full_bias, head_dim, num_heads, num_kv_heads,
                             TensorParallelGroup(rank, tp_size))
        assert layer.num_heads == num_heads // tp_size
        assert layer.num_kv_heads == max(1, num_kv_heads // tp_size)
        assert layer.weight.shape == (layer.q_size + 2 * layer.kv_size, hidden)
        with torch.no_grad():
            q, k, v = (heads(t, head_dim) for t in layer(x).split(
                [layer.q_size, layer.kv_size, layer.kv_size], dim=-1))
        queries.append(q)
        local_queries_per_kv_head = layer.num_heads // layer.num_kv_heads
        for local_head in range(layer.num_heads):
            global_head = rank * layer.num_heads + local_head
            local_kv, global_kv = (local_head // local_queries_per_kv_head,
                                   global_head // queries_per_kv_head)
            torch.testing.assert_close(k[:, local_kv], full_k[:, global_kv])
            torch.testing.assert_close(v[:, local_kv], full_v[:, global_kv])
    torch.testing.assert_close(torch.cat(queries, dim=1), full_q)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_a_row_parallel_projection_of_each_ranks_heads_sums_to_the_whole(tp_size):
    """The attention block's pairing (values as the attention output): the
    ranks' value heads, projected by each rank's proj rows, sum to proj of
    the whole value heads, so the fused split meets RowParallelLinear's."""
    hidden, head_dim, num_heads = random.randint(1, 24), 2 * random.randint(1, 6), 2 * tp_size
    weight, bias = fused_weights(hidden, head_dim, num_heads, num_heads)
    proj = nn.Linear(num_heads * head_dim, hidden, dtype=torch.float64)
    x = torch.randn(random.randint(1, 9), hidden, dtype=torch.float64)
    partials = []
    for rank in range(tp_size):
        tp = TensorParallelGroup(rank, tp_size)
        layer = loaded_layer(weight, bias, head_dim, num_heads, num_heads, tp)
        row = RowParallelLinear(num_heads * head_dim, hidden, tp=tp, reduce_results=False).double()
        with torch.no_grad():
            row.weight_loader(row.weight, proj.weight)
            row.weight_loader(row.bias, proj.bias)
            partials.append(row(layer(x)[:, layer.q_size + layer.kv_size:]))
    with torch.no_grad():
        values = F.linear(x, weight, bias)[:, 2 * num_heads * head_dim:]
        torch.testing.assert_close(sum(partials), proj(values))


def test_uneven_heads_wrong_shapes_and_shard_names_are_refused():
    with pytest.raises(ValueError, match="num_heads 6 does not split evenly over 4 ranks"):
        FusedQKVParallelLinear(16, 4, 6, tp=TensorParallelGroup(0, 4))
    with pytest.raises(ValueError, match="3 key/value heads"):
        FusedQKVParallelLinear(16, 4, 12, 3, tp=TensorParallelGroup(0, 4))
    layer = FusedQKVParallelLinear(8, 2, 4, tp=TensorParallelGroup(1, 2))
    with pytest.raises(ValueError, match=r"expected shape \(24, 8\), got \(12, 8\)"):
        layer.weight_loader(layer.weight, torch.randn(12, 8))  # a rank's rows, not the whole
    with pytest.raises(ValueError, match=r"expected shape \(24,\), got \(24, 1\)"):
        layer.weight_loader(layer.bias, torch.randn(24, 1))
    with pytest.raises(ValueError, match="not shard 'q_proj'"):
        layer.weight_loader(layer.weight, torch.randn(24, 8), "q_proj")


def test_pyvlms_loader_reads_each_blocks_slice_from_the_safetensors(tmp_path):
    """Through the model loader's path: the fused tensor is one checkpoint
    name (no q/k/v shard routing), read as an unread safetensors entry of
    which each block's rank rows are narrowed."""
    from safetensors.torch import save_file

    weight, bias = (t.float() for t in fused_weights(6, 2, 4, 4))
    save_file({"attn.qkv.weight": weight, "attn.qkv.bias": bias},
              str(tmp_path / "model.safetensors"))
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.qkv = FusedQKVParallelLinear(6, 2, 4, tp=TensorParallelGroup(1, 2))
    load_weights(model, iter_safetensors([tmp_path / "model.safetensors"], unread=True),
                 rename=lambda name: name)
    rows = torch.cat([torch.arange(4, 8), torch.arange(12, 16), torch.arange(20, 24)])
    assert torch.equal(model.attn.qkv.weight, weight[rows])
    assert torch.equal(model.attn.qkv.bias, bias[rows])
