"""Tensor-parallel layers over real ranks: 2 spawned processes joined by
torch.distributed (gloo), each building the layers under its group
(building_with) and loading the same full weights through the layers'
weight loaders. Every rank's result must be its exact share of the unsplit
layer's (column outputs: its slice; reduced and gathered outputs: the whole
result), so a wrong split fails, not only a crash. Sizes, weights and
inputs are fresh every run; the ranks start once for the module.
"""

import random

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyvlm.layers.linear import (ColumnParallelLinear, KVParallelLinear,
                                 MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                 num_local_kv_heads)
from pyvlm.layers.mlp import GatedMLP
from pyvlm.layers.tensor_parallel import (SINGLE_RANK, TensorParallelGroup, building_with,
                                          current_group, replicated)
from pyvlm.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from tests.tp_ranks import Ranks

TP_SIZE = 2


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # The split matmuls sum in another order than the whole one.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ranks():
    ranks = Ranks(TP_SIZE)
    yield ranks
    ranks.close()


def random_size(multiple_of: int) -> int:
    return multiple_of * random.randint(1, 8)


def rows(in_features: int) -> torch.Tensor:
    return torch.randn(random.randint(1, 7), in_features)


def load(param: nn.Parameter, tensor: torch.Tensor, *shard_name: str) -> None:
    with torch.no_grad():
        param.weight_loader(param, tensor, *shard_name)


# ---- the group and its collectives ---------------------------------------------


def _collectives(group, parts):
    mine = parts[group.rank].clone()
    gathered = group.all_gather_last_dim(mine)
    return group.all_reduce(mine), gathered, mine


def test_all_reduce_sums_and_all_gather_concatenates_in_rank_order(ranks):
    width = random_size(1)
    parts = [torch.randn(3, width) for _ in range(TP_SIZE)]
    for reduced, gathered, in_place in ranks.run(_collectives, parts):
        assert_same(reduced, parts[0] + parts[1])
        assert torch.equal(in_place, reduced)  # all_reduce overwrites its input
        assert torch.equal(gathered, torch.cat(parts, dim=-1))


def test_layers_take_the_current_group_unless_given_one():
    group = TensorParallelGroup(1, 2)
    assert current_group() is SINGLE_RANK
    with building_with(group):
        layers = [ColumnParallelLinear(4, 8), RowParallelLinear(4, 8),
                  QKVParallelLinear(8, 2, 4, 2), KVParallelLinear(8, 2, 2),
                  VocabParallelEmbedding(10, 4)]
        mlp = GatedMLP(4, 8)
        with replicated():
            whole = ColumnParallelLinear(4, 8)
        given = ColumnParallelLinear(4, 8, tp=SINGLE_RANK)
    assert current_group() is SINGLE_RANK
    assert all(layer.tp is group for layer in layers)
    assert mlp.gate_up_proj.tp is group and mlp.down_proj.tp is group
    assert whole.tp is SINGLE_RANK and whole.weight.shape == (8, 4)
    assert given.tp is SINGLE_RANK
    assert num_local_kv_heads(2, group) == 1 and num_local_kv_heads(1, group) == 1


# ---- parallel linear layers ------------------------------------------------------


def _linear_layers(group, full, x, head_dim, num_heads, num_kv_heads):
    """Every parallel layer built under the current group and loaded from
    the full tensors; their outputs on x (column: the rank's slice; row and
    MLP: reduced) and the local shapes."""
    hidden, inter = x.shape[1], full["up"].shape[0]
    column = ColumnParallelLinear(hidden, inter)
    load(column.weight, full["up"])
    load(column.bias, full["up_bias"])
    merged = MergedColumnParallelLinear(hidden, {"gate_proj": inter, "up_proj": inter})
    for name, key in (("gate_proj", "gate"), ("up_proj", "up")):
        load(merged.weight, full[key], name)
        load(merged.bias, full[key + "_bias"], name)
    row = RowParallelLinear(inter, hidden)
    load(row.weight, full["down"])
    load(row.bias, full["down_bias"])
    qkv = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads)
    for name in ("q_proj", "k_proj", "v_proj"):
        load(qkv.weight, full[name], name)
        load(qkv.bias, full[name + "_bias"], name)
    key_only = KVParallelLinear(hidden, head_dim, num_kv_heads, bias=False)
    load(key_only.weight, full["k_proj"])
    mlp = GatedMLP(hidden, inter, bias=True)
    for name, key in (("gate_proj", "gate"), ("up_proj", "up")):
        load(mlp.gate_up_proj.weight, full[key], name)
        load(mlp.gate_up_proj.bias, full[key + "_bias"], name)
    load(mlp.down_proj.weight, full["down"])
    load(mlp.down_proj.bias, full["down_bias"])
    # The row layer takes the rank's columns of its input (a column layer's output).
    local_inter = inter // group.size
    h = full["row_input"][:, group.rank * local_inter:(group.rank + 1) * local_inter]
    with torch.no_grad():
        return dict(column=column(x), merged=merged(x), row=row(h), qkv=qkv(x),
                    key_only=key_only(x), mlp=mlp(x), qkv_heads=(qkv.num_heads, qkv.num_kv_heads),
                    key_only_heads=key_only.num_kv_heads)


@pytest.mark.parametrize("num_kv_heads", [4, 1])  # split, and replicated on both ranks
def test_parallel_linears_give_each_rank_its_share(ranks, num_kv_heads):
    hidden, inter, head_dim, num_heads = random_size(1), random_size(TP_SIZE), random_size(2), 4
    full = {key: torch.randn(inter, hidden) for key in ("gate", "up")}
    full |= {key + "_bias": torch.randn(inter) for key in ("gate", "up")}
    full["down"], full["down_bias"] = torch.randn(hidden, inter), torch.randn(hidden)
    sizes = {"q_proj": num_heads, "k_proj": num_kv_heads, "v_proj": num_kv_heads}
    for name, count in sizes.items():
        full[name] = torch.randn(count * head_dim, hidden)
        full[name + "_bias"] = torch.randn(count * head_dim)
    x = rows(hidden)
    full["row_input"] = torch.randn(x.shape[0], inter)
    results = ranks.run(_linear_layers, full, x, head_dim, num_heads, num_kv_heads)

    def ref(key):
        return F.linear(x, full[key], full[key + "_bias"])

    gate, up = ref("gate"), ref("up")
    down = F.linear(full["row_input"], full["down"], full["down_bias"])
    mlp = F.linear(F.silu(gate) * up, full["down"], full["down_bias"])
    n, q_local = inter // TP_SIZE, num_heads // TP_SIZE
    kv_local = max(1, num_kv_heads // TP_SIZE)
    for rank, got in enumerate(results):
        cols = slice(rank * n, (rank + 1) * n)
        assert_same(got["column"], up[:, cols])
        assert_same(got["merged"], torch.cat([gate[:, cols], up[:, cols]], dim=-1))
        assert_same(got["row"], down)
        assert_same(got["mlp"], mlp)
        assert got["qkv_heads"] == (q_local, kv_local) and got["key_only_heads"] == kv_local
        q, k, v = got["qkv"].split([q_local * head_dim, kv_local * head_dim,
                                    kv_local * head_dim], dim=-1)
        heads = slice(rank * q_local * head_dim, (rank + 1) * q_local * head_dim)
        assert_same(q, ref("q_proj")[:, heads])
        # Rank r's kv heads: its slice, or (replicated) the one head of its query heads' group.
        first_kv = rank * q_local // (num_heads // num_kv_heads)
        kv_rows = slice(first_kv * head_dim, (first_kv + kv_local) * head_dim)
        assert_same(k, ref("k_proj")[:, kv_rows])
        assert_same(v, ref("v_proj")[:, kv_rows])
        assert_same(got["key_only"], F.linear(x, full["k_proj"])[:, kv_rows])


# ---- the vocabulary-parallel embedding and LM head -------------------------------


def _vocab_layers(group, table, head, ids, hidden, vocab_size):
    """The embedding (table: vocab + extra rows), the untied head and a head
    tied to the embedding, all loaded from the full tensors."""
    embedding = VocabParallelEmbedding(*table.shape)
    load(embedding.weight, table)
    lm_head = ParallelLMHead(vocab_size, head.shape[1])
    load(lm_head.weight, head)
    tied = ParallelLMHead(vocab_size, table.shape[1], table.shape[0])
    tied.weight = embedding.weight
    with torch.no_grad():
        return dict(embeds=embedding(ids), logits=lm_head(hidden), tied=tied(hidden),
                    local_rows=(embedding.weight.shape[0], lm_head.weight.shape[0]),
                    start=embedding.vocab_start)


@pytest.mark.parametrize("extra_rows", [0, 8, 3])
def test_vocab_parallel_embedding_and_lm_head_equal_the_whole_table(ranks, extra_rows):
    """Odd sizes pad the last rank's slice; ids cover every rank's slice,
    both ends of each, and the extra rows past the vocabulary."""
    vocab_size, dim = random.choice([13, 37, 64]), random_size(2)
    table = torch.randn(vocab_size + extra_rows, dim)
    head, hidden = torch.randn(vocab_size, dim), torch.randn(5, dim)
    per_rank = -(-table.shape[0] // TP_SIZE)
    edges = [0, per_rank - 1, per_rank, table.shape[0] - 1, vocab_size - 1]
    ids = torch.tensor(edges + torch.randint(0, table.shape[0], (9,)).tolist())
    results = ranks.run(_vocab_layers, table, head, ids, hidden, vocab_size)
    for rank, got in enumerate(results):
        assert torch.equal(got["embeds"], F.embedding(ids, table))  # one real row per id
        assert_same(got["logits"], hidden @ head.T)
        assert_same(got["tied"], (hidden @ table.T)[:, :vocab_size])
        assert got["local_rows"] == (per_rank, -(-vocab_size // TP_SIZE))
        assert got["start"] == rank * per_rank


def test_one_rank_embedding_and_head_are_nn_embedding_and_nn_linear():
    table, hidden = torch.randn(11, 6), torch.randn(4, 6)
    embedding, head = VocabParallelEmbedding(11, 6), ParallelLMHead(11, 6)
    load(embedding.weight, table)
    load(head.weight, table)
    ids = torch.randint(0, 11, (7,))
    with torch.no_grad():
        assert torch.equal(embedding(ids), F.embedding(ids, table))
        assert torch.equal(head(hidden), F.linear(hidden, table))
    assert embedding.weight.shape == (11, 6)


def test_padding_rows_load_as_zeros_and_wrong_shapes_are_refused():
    embedding = VocabParallelEmbedding(5, 3, tp=TensorParallelGroup(1, 2))  # rows 3, 4 + 1 pad
    nn.init.normal_(embedding.weight)
    table = torch.randn(5, 3)
    load(embedding.weight, table)
    assert torch.equal(embedding.weight[:2], table[3:]) and not embedding.weight[2].any()
    with pytest.raises(ValueError, match=r"expected shape \(5, 3\), got \(6, 3\)"):
        load(embedding.weight, torch.randn(6, 3))
