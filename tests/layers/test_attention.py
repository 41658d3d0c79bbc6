"""AttentionMetadata.build and PagedAttention against a plain causal
attention over the whole sequences (float64 torch reference)."""

import random

import pytest
import torch

from pyvlm.layers.attention import AttentionMetadata, PagedAttention, slots_of


def test_build_prefill_metadata():
    chunks = [(0, 3, [5, 2]), (4, 2, [1, 7, 3])]
    attn = AttentionMetadata.build(chunks, page_size=2, is_decode=False)
    # token i lives in page_table[i // 2] * 2 + i % 2
    assert attn.slot_mapping.tolist() == [10, 11, 4, 6, 7]
    assert attn.slot_mapping.dtype == torch.int64
    assert attn.block_tables.tolist() == [[5, 2, 0], [1, 7, 3]]
    assert attn.block_tables.dtype == torch.int32
    assert attn.cu_seqlens_q.tolist() == [0, 3, 5] and attn.prefix_lens.tolist() == [0, 4]
    assert attn.max_seqlen_q == 3 and attn.seq_lens is None and not attn.is_decode


def test_build_decode_metadata():
    attn = AttentionMetadata.build([(4, 1, [3, 9, 8]), (0, 1, [6])], page_size=4,
                                   is_decode=True)
    assert attn.slot_mapping.tolist() == [36, 24]
    assert attn.seq_lens.tolist() == [5, 1] and attn.seq_lens.dtype == torch.int32
    assert attn.is_decode and attn.cu_seqlens_q is None


def test_mixed_step_gives_its_single_token_tail_to_the_decode_kernel():
    """A prefill step ending in single-token chunks (a mixed step's decodes)
    keeps prefill metadata for the leading chunks only; the tail gets decode
    metadata. A single token before a longer chunk stays a prefill row."""
    chunks = [(6, 1, [4, 3, 8, 9]), (0, 3, [5, 2]), (4, 1, [1, 7, 3]), (2, 1, [6, 8])]
    attn = AttentionMetadata.build(chunks, page_size=2, is_decode=False)
    assert attn.slot_mapping.tolist() == [18, 10, 11, 4, 6, 16]  # every token's slot
    assert attn.num_prefill_tokens == 4
    assert attn.block_tables.tolist() == [[4, 3, 8, 9], [5, 2, 0, 0]]
    assert attn.cu_seqlens_q.tolist() == [0, 1, 4] and attn.prefix_lens.tolist() == [6, 0]
    assert attn.decode_block_tables.tolist() == [[1, 7, 3], [6, 8, 0]]
    assert attn.decode_seq_lens.tolist() == [5, 3]
    only_singles = AttentionMetadata.build([(4, 1, [1, 7, 3]), (2, 1, [6, 8])], 2,
                                           is_decode=False)
    assert only_singles.num_prefill_tokens is None and only_singles.decode_seq_lens is None
    assert only_singles.cu_seqlens_q.tolist() == [0, 1, 2]


def test_decode_rejects_more_than_one_token():
    with pytest.raises(ValueError, match="one new token"):
        AttentionMetadata.build([(3, 2, [0])], page_size=4, is_decode=True)


def reference_attention(q, k, v, num_kv_heads):
    """Causal softmax attention of one whole sequence in float64 (GQA)."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).float()


# step 1: seq 0 tokens [0, 4), seq 1 tokens [0, 5); step 2: seq 0 [4, 10);
# then one decode step for both. MIXED: step 2 also runs seq 1's token 5 as a
# single-token tail (the decode kernel inside a prefill step).
STEPS = {"separate": [([(0, 0, 4), (1, 0, 5)], False), ([(0, 4, 6)], False),
                      ([(0, 10, 1), (1, 5, 1)], True)],
         "mixed": [([(0, 0, 4), (1, 0, 5)], False), ([(0, 4, 6), (1, 5, 1)], False),
                   ([(0, 10, 1)], True)]}


# LONG: a 1,000-token prompt in two chunks, the second (700 rows over a
# 300-row cached prefix) with the other sequence's decode as its tail.
STEPS["long"] = [([(0, 0, 300), (1, 0, 40)], False), ([(0, 300, 700), (1, 40, 1)], False),
                 ([(0, 1000, 1), (1, 41, 1)], True)]
# FRESH_MIXED: step 2 runs seq 0's whole prompt (nothing cached: the
# fresh-prefill path) with seq 1's token 5 as its single-token tail.
STEPS["fresh_mixed"] = [([(1, 0, 5)], False), ([(0, 0, 10), (1, 5, 1)], False),
                        ([(0, 10, 1)], True)]


def run_schedule(schedule, page_size, heads, head_dim, dtype=torch.float32, device="cpu"):
    """Runs STEPS[schedule] through PagedAttention; returns (per-sequence
    outputs, float64 references)."""
    num_heads, num_kv_heads = heads
    layer = PagedAttention(num_heads, num_kv_heads, head_dim, scale=head_dim ** -0.5)
    steps = STEPS[schedule]
    lengths = [max(start + n for spans, _ in steps for s, start, n in spans if s == seq)
               for seq in range(2)]
    num_pages = 2 * -(-max(lengths) // page_size) + 2
    q, k, v = ([torch.randn(n, h, head_dim).to(device, dtype) for n in lengths]
               for h in (num_heads, num_kv_heads, num_kv_heads))
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    cache = tuple(torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(2))
    free = random.sample(range(num_pages), num_pages)
    tables = [[free.pop() for _ in range(-(-n // page_size))] for n in lengths]
    outs = [[None] * n for n in lengths]
    for spans, is_decode in steps:
        attn = AttentionMetadata.build([(start, n, tables[s]) for s, start, n in spans],
                                       page_size, is_decode, device=device)
        cat = [torch.cat([t[s][start:start + n] for s, start, n in spans]) for t in (q, k, v)]
        flat = [t.reshape(t.shape[0], -1) for t in cat]
        out = layer(*flat, cache, attn).view(-1, num_heads, head_dim)
        for (s, start, n), rows in zip(spans, out.split([n for _, _, n in spans])):
            outs[s][start:start + n] = list(rows)
    refs = [reference_attention(q[s].cpu(), k[s].cpu(), v[s].cpu(), num_kv_heads)
            for s in range(len(lengths))]
    return [torch.stack(o).cpu().float() for o in outs], refs


@pytest.mark.parametrize("schedule", list(STEPS))
@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_chunks_then_decode_match_whole_sequence_attention(page_size, schedule):
    outs, refs = run_schedule(schedule, page_size, (4, 2), 8)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fresh_prefill_marks_steps_with_no_cached_prefix():
    """fresh_prefill: every prefill chunk starts at 0 (a decode tail may follow)."""
    build = AttentionMetadata.build
    assert build([(0, 3, [5, 2]), (0, 2, [1])], 2, is_decode=False).fresh_prefill
    assert build([(0, 3, [5, 2]), (4, 1, [1, 7, 3])], 2, is_decode=False).fresh_prefill
    assert not build([(0, 3, [5, 2]), (4, 2, [1, 7, 3])], 2, is_decode=False).fresh_prefill
    assert not build([(4, 1, [1, 7, 3])], 2, is_decode=True).fresh_prefill


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_prefill_keys_gather_every_key_of_the_prefill_sequences(page_size):
    """PrefillKeys (built on the device from the block tables) lists each
    prefill sequence's whole keys, cached prefix first, as slots_of does on
    the host; a mixed step's decode tail is not among them."""
    num_pages = 40
    pages = random.sample(range(num_pages), num_pages)
    spans = [(0, 5), (2 * page_size + 1, 4), (7, 2 * page_size), (9, 1)]  # last: decode tail
    tables = [[pages.pop() for _ in range(-(-(start + n) // page_size))] for start, n in spans]
    attn = AttentionMetadata.build([(start, n, table) for (start, n), table in zip(spans, tables)],
                                   page_size, is_decode=False)
    assert attn.num_prefill_tokens == sum(n for _, n in spans[:3]) and not attn.fresh_prefill
    keys = attn.prefill_keys()
    expected = [slot for (start, n), table in zip(spans[:3], tables)
                for slot in slots_of(0, start + n, table, page_size)]
    assert keys.slots.tolist() == expected
    assert keys.cu_seqlens_k.tolist() == [0, 5, 5 + 2 * page_size + 5, len(expected)]
    assert attn.max_seqlen_k == max(start + n for start, n in spans[:3])
    assert attn.prefill_keys() is keys  # built once per step
    cache = torch.randn(num_pages, page_size, 2, 4)
    assert torch.equal(keys.gather(cache), cache.flatten(0, 1)[expected])


@pytest.mark.cuda
@pytest.mark.parametrize("schedule", list(STEPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_16bit_schedules_match_whole_sequence_attention(schedule, dtype):
    """On CUDA with 16-bit K/V, prefills take torch's FlashAttention (fresh
    ones over their own rows, the rest over keys gathered from the cache)
    and decodes pyvlm's paged kernel: every row still equals whole-sequence
    attention."""
    outs, refs = run_schedule(schedule, 16, (8, 2), 64, dtype, "cuda")
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def bottom_right_causal(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, scale):
    """FlashAttention's causal contract in float64: query row i of a
    sequence with q rows and k keys sees keys [0, k - q + i] (GQA)."""
    out = torch.empty_like(query)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    group = query.shape[1] // key.shape[1]
    for s in range(len(cq) - 1):
        q = query[cq[s]:cq[s + 1]].double()
        k = key[ck[s]:ck[s + 1]].double().repeat_interleave(group, 1)
        v = value[ck[s]:ck[s + 1]].double().repeat_interleave(group, 1)
        assert q.shape[0] <= max_seqlen_q and k.shape[0] <= max_seqlen_k
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[cq[s]:cq[s + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


@pytest.mark.parametrize("schedule", list(STEPS))
@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_flash_route_feeds_whole_keys_in_order(monkeypatch, page_size, schedule):
    """The FlashAttention route's plumbing on the CPU: with FlashAttention
    stood in for by its contract (bottom-right causal over packed keys), the
    fresh rows or the keys PrefillKeys gathers give whole-sequence attention."""
    import pyvlm.layers.attention as attention

    calls = []

    def flash_contract(*args):
        calls.append(args[4].shape[0] - 1)
        return bottom_right_causal(*args)

    monkeypatch.setattr(attention, "takes_torch_flash", lambda *a, **k: True)
    monkeypatch.setattr(attention, "causal_attention", flash_contract)
    outs, refs = run_schedule(schedule, page_size, (4, 2), 8)
    assert calls  # every schedule has a prefill step
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
