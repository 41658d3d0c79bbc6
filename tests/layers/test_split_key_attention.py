"""Attention split along the keys equals the attention over all keys: the
plan's chunks (chunk-major, per segment), the merge by log-sum-exps, and
the rows of key/value it gathers; on CPU through a float64 attention that
returns its log-sum-exp, on CUDA through FlashAttention."""

import pytest
import torch

from pyvlm.layers import split_key_attention as split
from pyvlm.layers.packed_attention import packed_attention, takes_torch_flash


def reference_attention_with_lse(query, key, value, cu_q, cu_k, max_q, max_k, scale):
    """Non-causal varlen attention in float64 -> (out, lse [heads, rows])."""
    out = torch.empty(query.shape, dtype=torch.float64)
    lse = torch.empty(query.shape[1], query.shape[0], dtype=torch.float64)
    for i in range(len(cu_q) - 1):
        q = query[cu_q[i]:cu_q[i + 1]].double().transpose(0, 1)  # [heads, rows, dim]
        k = key[cu_k[i]:cu_k[i + 1]].double().transpose(0, 1)
        v = value[cu_k[i]:cu_k[i + 1]].double().transpose(0, 1)
        scores = q @ k.transpose(1, 2) * scale
        out[cu_q[i]:cu_q[i + 1]] = (torch.softmax(scores, -1) @ v).transpose(0, 1)
        lse[:, cu_q[i]:cu_q[i + 1]] = torch.logsumexp(scores, -1)
    return out, lse


def segments(num_queries, num_keys, heads=3, dim=16, device="cpu", dtype=torch.float64):
    """Random query rows (segments in order), a key/value pool of rows in
    random order and each segment's key rows within it."""
    total_keys = sum(num_keys) + 7  # rows no segment reads
    order = torch.randperm(total_keys)
    bounds = torch.tensor([0, *num_keys]).cumsum(0)
    key_rows = [order[bounds[i]:bounds[i + 1]].sort().values for i in range(len(num_keys))]
    make = lambda rows: torch.randn(rows, heads, dim, dtype=torch.float64).to(device, dtype)  # noqa: E731
    return make(sum(num_queries)), make(total_keys), make(total_keys), key_rows


def unsplit(query, key, value, num_queries, key_rows, attend):
    rows = torch.cat(key_rows)
    cu_q = torch.tensor([0, *num_queries]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *map(len, key_rows)]).cumsum(0).to(torch.int32)
    return attend(query, key[rows.to(key.device)], value[rows.to(key.device)],
                  cu_q.to(query.device), cu_k.to(query.device),
                  max(num_queries), max(map(len, key_rows)), 0.25)


@pytest.mark.parametrize("num_queries,num_keys", [([5], [600]), ([3, 9, 1], [700, 1300, 520]),
                                                  ([0, 4], [900, 2000])])
def test_split_attention_equals_the_attention_over_all_keys(num_queries, num_keys):
    query, key, value, key_rows = segments(num_queries, num_keys)
    plan = split.plan_key_splits(num_queries, key_rows, torch.device("cpu"))
    assert plan is not None and plan.num_splits == min(split.MAX_SPLITS, min(num_keys) // 256)
    got = split.split_key_attention(query, key, value, plan, 0.25, reference_attention_with_lse)
    expected, _ = unsplit(query, key, value, num_queries, key_rows, reference_attention_with_lse)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_each_key_row_lands_in_exactly_one_chunk_of_its_segment():
    num_queries, num_keys = [2, 3], [1000, 1500]
    _, _, _, key_rows = segments(num_queries, num_keys)
    plan = split.plan_key_splits(num_queries, key_rows, torch.device("cpu"))
    cu_k = plan.cu_k.tolist()
    for s in range(plan.num_splits):
        for i, rows in enumerate(key_rows):
            b = s * len(key_rows) + i
            chunk = plan.key_rows[cu_k[b]:cu_k[b + 1]]
            assert set(chunk.tolist()) <= set(rows.tolist())
    assert sorted(plan.key_rows.tolist()) == sorted(torch.cat(key_rows).tolist())
    assert plan.cu_q.tolist() == [0, 2, 5] + [5 * s + q for s in range(1, plan.num_splits)
                                              for q in (2, 5)]


@pytest.mark.parametrize("num_queries,num_keys", [([200], [5000]), ([4], [300]), ([4, 4], [5000, 400])])
def test_no_plan_where_splitting_does_not_pay(num_queries, num_keys):
    """Many queries fill the card already; under two chunks' worth of keys
    (in any segment) there is nothing to split."""
    key_rows = [torch.arange(n) for n in num_keys]
    assert split.plan_key_splits(num_queries, key_rows, torch.device("cpu")) is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_split_flash_attention_equals_flash_over_all_keys(dtype):
    """mllama's shape: 28 padding queries over an image's 6,404 real keys,
    16 heads of 80, two images."""
    num_queries, num_keys = [28, 28], [6404, 3203]
    query, key, value, key_rows = segments(num_queries, num_keys, heads=16, dim=80,
                                           device="cuda", dtype=dtype)
    assert takes_torch_flash(query, key, value)
    plan = split.plan_key_splits(num_queries, key_rows, torch.device("cuda"))
    assert plan is not None and plan.num_splits == 3203 // split.MIN_KEYS_PER_SPLIT  # the fewer keys
    got = split.split_key_attention(query, key, value, plan, 0.25)
    whole = unsplit(query, key, value, num_queries, key_rows,
                    lambda *args: (packed_attention(*args), None))[0]
    cpu = [t.cpu() for t in (query, key, value)]
    exact, _ = unsplit(*cpu, num_queries, key_rows, reference_attention_with_lse)
    assert got.dtype == dtype
    # Within one rounding of the 16-bit output, as the unsplit kernel is.
    tolerance = 2 * float(torch.finfo(dtype).eps)
    assert (got.double().cpu() - exact).abs().max() <= tolerance * exact.abs().max() + 1e-3
    assert (whole.double().cpu() - exact).abs().max() <= tolerance * exact.abs().max() + 1e-3


@pytest.mark.parametrize("num_queries,num_keys", [([5], [600]), ([3, 9, 1], [700, 1300, 520])])
def test_packed_split_lists_are_the_plan_over_packed_keys(num_queries, num_keys):
    """Keys packed segment after segment: the host lists are the plan's
    tensors over those rows."""
    starts = torch.tensor([0, *num_keys]).cumsum(0).tolist()
    key_rows = [torch.arange(start, start + n) for start, n in zip(starts, num_keys)]
    plan = split.plan_key_splits(num_queries, key_rows, torch.device("cpu"))
    assert split.key_split_count(num_queries, num_keys) == plan.num_splits
    rows, cu_q, cu_k = split.packed_split_lists(num_queries, num_keys, plan.num_splits)
    assert rows.tolist() == plan.key_rows.tolist()
    assert cu_q == plan.cu_q.tolist() and cu_k == plan.cu_k.tolist()


@pytest.mark.cuda
def test_cuda_split_flash_attention_with_fewer_key_heads():
    """mllama's cross-attention prefill: 40 prompt tokens after an image
    over its 6,404 rows, 32 query heads over 8 key/value heads of 128."""
    num_queries, num_keys = [40], [6404]
    query = torch.randn(40, 32, 128, device="cuda", dtype=torch.bfloat16)
    key, value = (torch.randn(6404, 8, 128, device="cuda", dtype=torch.bfloat16)
                  for _ in range(2))
    num_splits = split.key_split_count(num_queries, num_keys)
    assert num_splits == split.MAX_SPLITS
    rows, cu_q, cu_k = split.packed_split_lists(num_queries, num_keys, num_splits)
    lengths = [b - a for a, b in zip(cu_k, cu_k[1:])]
    plan = split.KeySplits(num_splits, rows.cuda(),
                           torch.tensor(cu_q, dtype=torch.int32, device="cuda"),
                           torch.tensor(cu_k, dtype=torch.int32, device="cuda"), 40, max(lengths))
    got = split.split_key_attention(query, key, value, plan, 0.1)
    grouped = [t.cpu().double().repeat_interleave(4, dim=1) for t in (key, value)]
    exact, _ = reference_attention_with_lse(query.cpu(), *grouped, [0, 40], [0, 6404], 40, 6404,
                                            0.1)
    tolerance = 2 * float(torch.finfo(torch.bfloat16).eps)
    assert (got.double().cpu() - exact).abs().max() <= tolerance * exact.abs().max() + 1e-3
