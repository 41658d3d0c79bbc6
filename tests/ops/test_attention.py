import math

import pytest
import torch

from pyvlm import ops
from pyvlm.ops import reference

from .conftest import assert_close, poisoned, run_cuda_child

# A block-table entry no sequence uses; the kernels must never read it.
UNUSED_PAGE = 10**6


def random_cache(num_pages, page_size, num_kv_heads, head_dim, dtype, device):
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    return (torch.randn(shape, device=device).to(dtype),
            torch.randn(shape, device=device).to(dtype))


def random_block_tables(seq_lens, page_size, extra_pages=3, device="cpu"):
    """Distinct random pages per sequence, unused entries set to UNUSED_PAGE."""
    pages_needed = [(n + page_size - 1) // page_size for n in seq_lens]
    max_pages = max(pages_needed + [0]) + 1
    num_pages = sum(pages_needed) + extra_pages
    perm = torch.randperm(num_pages).tolist()
    table = torch.full((len(seq_lens), max_pages), UNUSED_PAGE, dtype=torch.int32)
    for s, n in enumerate(pages_needed):
        table[s, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    return table.to(device), num_pages


def ragged_lengths(num_seqs, page_size):
    """Lengths that end mid-page, on a page boundary and one past it."""
    if num_seqs == 1:
        return [3 * page_size + 5]
    fixed = [1, 2 * page_size, 2 * page_size + 1]
    rand = torch.randint(1, 70, (max(0, num_seqs - len(fixed)),)).tolist()
    return (fixed + rand)[:num_seqs]


def run_decode(num_seqs, num_heads, num_kv_heads, head_dim, page_size, dtype, device,
               seq_lens=None, scale=None):
    """Runs the op and the float64 reference on fresh random inputs."""
    seq_lens = seq_lens if seq_lens is not None else ragged_lengths(num_seqs, page_size)
    table, num_pages = random_block_tables(seq_lens, page_size, device=device)
    key_cache, value_cache = random_cache(num_pages, page_size, num_kv_heads, head_dim,
                                          dtype, device)
    query = torch.randn(num_seqs, num_heads, head_dim, device=device).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = poisoned(num_seqs, num_heads, head_dim, dtype=dtype, device=device)
    ops.paged_attention_decode(query, key_cache, value_cache, table, lens, scale, out=out)
    ref = reference.paged_attention_decode(query.double(), key_cache.double(),
                                           value_cache.double(), table, lens, scale)
    return out, ref


# ---- paged_attention_decode ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("group", [1, 4, 7])
def test_decode_matches_reference(device, group, head_dim, page_size, dtype):
    out, ref = run_decode(5, 2 * group, 2, head_dim, page_size, dtype, device)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("head_dim", [40, 72])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_other_head_dims_and_fp16(device, head_dim, dtype):
    out, ref = run_decode(4, 8, 2, head_dim, 16, dtype, device)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("head_dim", [1, 36])
def test_decode_cpu_any_head_dim(head_dim):
    out, ref = run_decode(3, 6, 3, head_dim, 4, torch.float32, "cpu")
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_batch_of_one(device, page_size):
    out, ref = run_decode(1, 8, 2, 64, page_size, torch.float32, device)
    assert_close(out, ref, torch.float32)


def test_decode_zero_length_gives_zeros(device):
    out, ref = run_decode(3, 4, 1, 64, 16, torch.float32, device, seq_lens=[0, 17, 0],
                          scale=0.3)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert_close(out, ref, torch.float32)


def test_decode_empty_batch(device):
    key_cache, value_cache = random_cache(4, 16, 2, 64, torch.float32, device)
    query = torch.randn(0, 4, 64, device=device)
    table = torch.zeros(0, 3, dtype=torch.int32, device=device)
    lens = torch.zeros(0, dtype=torch.int32, device=device)
    out = ops.paged_attention_decode(query, key_cache, value_cache, table, lens)
    assert out.shape == (0, 4, 64)


def test_decode_strided_query_and_block_table(device):
    """query as a view of a fused qkv tensor, block_tables as a column slice."""
    seq_lens = [9, 40]
    table, num_pages = random_block_tables(seq_lens, 8, device=device)
    wide = torch.full((2, table.shape[1] + 5), UNUSED_PAGE, dtype=torch.int32, device=device)
    wide[:, : table.shape[1]] = table
    key_cache, value_cache = random_cache(num_pages, 8, 2, 64, torch.float32, device)
    qkv = torch.randn(2, (8 + 4) * 64, device=device)
    query = qkv[:, : 8 * 64].view(2, 8, 64)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    out = ops.paged_attention_decode(query, key_cache, value_cache, wide[:, : table.shape[1]],
                                     lens)
    ref = reference.paged_attention_decode(query.double(), key_cache.double(),
                                           value_cache.double(), table, lens, 1 / 8)
    assert_close(out, ref, torch.float32)


# ---- reshape_and_cache ---------------------------------------------------


def qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device):
    """key and value as strided views of one fused qkv projection output."""
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim,
                      device=device).to(dtype)
    k0, v0 = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    key = qkv[:, k0:v0].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, v0:].view(num_tokens, num_kv_heads, head_dim)
    return key, value


def skipped_tokens(num_tokens):
    """A random ~30% of the tokens, but always one written token and, from
    two tokens on, one skipped token."""
    skip = torch.rand(num_tokens) < 0.3
    order = torch.randperm(num_tokens)
    if num_tokens >= 1:
        skip[order[0]] = False
    if num_tokens >= 2:
        skip[order[1]] = True
    return skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("num_tokens", [0, 1, 37])
@pytest.mark.parametrize("strided", [False, True])
def test_reshape_and_cache_scatters_and_skips_negative(device, dtype, page_size, num_tokens,
                                                        strided):
    num_kv_heads, head_dim, num_pages = 2, 64, 64 // page_size
    if strided:
        key, value = qkv_views(num_tokens, 4, num_kv_heads, head_dim, dtype, device)
        assert num_tokens < 2 or not key.is_contiguous()
    else:
        key = torch.randn(num_tokens, num_kv_heads, head_dim, device=device).to(dtype)
        value = torch.randn_like(key)
    # Whatever the cache held must survive everywhere no token is written.
    key_cache, value_cache = random_cache(num_pages, page_size, num_kv_heads, head_dim, dtype,
                                          device)
    slots = torch.randperm(num_pages * page_size, device=device)[:num_tokens]
    slots[skipped_tokens(num_tokens).to(device)] = -1
    ref_k, ref_v = reference.reshape_and_cache(key, value, key_cache, value_cache, slots)
    ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, ref_k)
    assert torch.equal(value_cache, ref_v)


def test_reshape_and_cache_then_decode(device):
    """Tokens written by reshape_and_cache are what decode attends to."""
    num_tokens, num_kv_heads, head_dim, page_size = 21, 2, 64, 4
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=device)
    value = torch.randn_like(key)
    key_cache = torch.zeros(8, page_size, num_kv_heads, head_dim, device=device)
    value_cache = torch.zeros_like(key_cache)
    pages = torch.randperm(8)[:6].to(torch.int32)
    slots = (pages.long()[torch.arange(num_tokens) // page_size] * page_size
             + torch.arange(num_tokens) % page_size).to(device)
    ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    query = torch.randn(1, 4, head_dim, device=device)
    lens = torch.tensor([num_tokens], dtype=torch.int32, device=device)
    out = ops.paged_attention_decode(query, key_cache, value_cache, pages[None].to(device), lens)
    k = key.repeat_interleave(2, dim=1).double()
    v = value.repeat_interleave(2, dim=1).double()
    scores = torch.einsum("hd,thd->ht", query[0].double(), k) / math.sqrt(head_dim)
    ref = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
    assert_close(out[0], ref, torch.float32)


# ---- opcheck and bad inputs ------------------------------------------------


def test_opcheck(device):
    key_cache, value_cache = random_cache(6, 4, 2, 16, torch.float32, device)
    key = torch.randn(5, 2, 16, device=device)
    slots = torch.tensor([0, 3, -1, 9, 23], device=device)
    torch.library.opcheck(torch.ops.pyvlm.reshape_and_cache.default,
                          (key, torch.randn_like(key), key_cache, value_cache, slots))
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=device)
    lens = torch.tensor([7, 12], dtype=torch.int32, device=device)
    query = torch.randn(2, 4, 16, device=device)
    out = torch.empty_like(query)
    torch.library.opcheck(torch.ops.pyvlm.paged_attention_decode.default,
                          (out, query, key_cache, value_cache, table, lens, 0.25))


def decode_inputs():
    key_cache, value_cache = random_cache(6, 4, 2, 16, torch.float32, "cpu")
    table = torch.tensor([[0, 1, 2], [3, 4, UNUSED_PAGE]], dtype=torch.int32)
    lens = torch.tensor([9, 8], dtype=torch.int32)
    return torch.randn(2, 4, 16), key_cache, value_cache, table, lens


@pytest.mark.parametrize("case, error, match", [
    ("seq_len_too_long", IndexError, "seq_lens values must be in"),
    ("seq_len_negative", IndexError, "seq_lens values must be in"),
    ("page_out_of_range", IndexError, "block_tables entries used"),
    ("page_negative", IndexError, "block_tables entries used"),
    ("heads_not_multiple", ValueError, "num_heads .* must be a multiple"),
    ("table_int64", ValueError, "block_tables must have dtype"),
    ("lens_wrong_size", ValueError, "seq_lens.size"),
    ("head_dim_mismatch", ValueError, "key_cache.size\\(3\\)"),
    ("value_cache_shape", ValueError, "value_cache must have the shape of key_cache"),
    ("cache_dtype", ValueError, "key_cache must have dtype"),
    ("out_shape", ValueError, "out must have the shape of query"),
    ("query_last_dim_strided", ValueError, "query's last dimension must be contiguous"),
])
def test_decode_bad_inputs_raise_naming_argument(case, error, match):
    query, key_cache, value_cache, table, lens = decode_inputs()
    out = None
    if case == "seq_len_too_long":
        lens[0] = 13
    elif case == "seq_len_negative":
        lens[1] = -1
    elif case == "page_out_of_range":
        table[1, 1] = 6
    elif case == "page_negative":
        table[0, 2] = -1
    elif case == "heads_not_multiple":
        query = torch.randn(2, 3, 16)
    elif case == "table_int64":
        table = table.long()
    elif case == "lens_wrong_size":
        lens = torch.tensor([9], dtype=torch.int32)
    elif case == "head_dim_mismatch":
        query = torch.randn(2, 4, 8)
    elif case == "value_cache_shape":
        value_cache = value_cache[:5]
    elif case == "cache_dtype":
        key_cache = key_cache.double()
    elif case == "out_shape":
        out = torch.empty(2, 4, 8)
    elif case == "query_last_dim_strided":
        query = torch.randn(2, 4, 32)[:, :, ::2]
    with pytest.raises(error, match=match):
        ops.paged_attention_decode(query, key_cache, value_cache, table, lens, out=out)


@pytest.mark.parametrize("case, error, match", [
    ("slot_too_large", IndexError, "slot_mapping values must be <"),
    ("slot_int32", ValueError, "slot_mapping must have dtype"),
    ("slot_wrong_size", ValueError, "slot_mapping.size"),
    ("key_last_dim_strided", ValueError, "key's last dimension must be contiguous"),
    ("value_shape", ValueError, "value must have the shape of key"),
    ("cache_heads", ValueError, "key_cache.size\\(2\\)"),
    ("cache_dtype", ValueError, "value_cache must have dtype"),
    ("cache_not_contiguous", ValueError, "key_cache must be contiguous"),
])
def test_reshape_and_cache_bad_inputs_raise_naming_argument(case, error, match):
    key, value = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    key_cache, value_cache = random_cache(4, 4, 2, 16, torch.float32, "cpu")
    slots = torch.tensor([0, 5, -1])
    if case == "slot_too_large":
        slots[1] = 16
    elif case == "slot_int32":
        slots = slots.int()
    elif case == "slot_wrong_size":
        slots = slots[:2]
    elif case == "key_last_dim_strided":
        key = torch.randn(3, 2, 32)[:, :, ::2]
    elif case == "value_shape":
        value = torch.randn(3, 2, 8)
    elif case == "cache_heads":
        key_cache, value_cache = random_cache(4, 4, 3, 16, torch.float32, "cpu")
    elif case == "cache_dtype":
        value_cache = value_cache.half()
    elif case == "cache_not_contiguous":
        key_cache = torch.randn(4, 2, 4, 16).transpose(1, 2)
    with pytest.raises(error, match=match):
        ops.reshape_and_cache(key, value, key_cache, value_cache, slots)


def test_bad_slot_leaves_cache_untouched():
    key_cache, value_cache = random_cache(2, 4, 1, 8, torch.float32, "cpu")
    before = key_cache.clone()
    with pytest.raises(IndexError, match="slot_mapping"):
        ops.reshape_and_cache(torch.randn(2, 1, 8), torch.randn(2, 1, 8), key_cache, value_cache,
                              torch.tensor([1, 8]))
    assert torch.equal(key_cache, before)


# ---- CUDA against CPU and the reference -----------------------------------


def decode_on_both(num_seqs, num_heads, num_kv_heads, head_dim, page_size, dtype, seq_lens):
    """CUDA output, CPU output and float64 reference on the same inputs."""
    table, num_pages = random_block_tables(seq_lens, page_size)
    key_cache, value_cache = random_cache(num_pages, page_size, num_kv_heads, head_dim, dtype,
                                          "cpu")
    query = torch.randn(num_seqs, num_heads, head_dim).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    args = (query, key_cache, value_cache, table, lens)
    cpu = ops.paged_attention_decode(*args)
    gpu_args = [t.cuda() for t in args]
    out = poisoned(num_seqs, num_heads, head_dim, dtype=dtype, device="cuda")
    ops.paged_attention_decode(*gpu_args, out=out)
    ref = reference.paged_attention_decode(*[t.double() if t.is_floating_point() else t
                                             for t in gpu_args], 1 / math.sqrt(head_dim))
    return out, cpu, ref


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128, 256])
def test_cuda_decode_matches_cpu_and_reference(dtype, head_dim):
    seq_lens = torch.randint(0, 600, (16,)).tolist()
    out, cpu, ref = decode_on_both(16, 32, 8, head_dim, 16, dtype, seq_lens)
    assert_close(out, ref, dtype)
    assert_close(out, cpu.double(), dtype)


@pytest.mark.cuda
def test_cuda_decode_long_context_batch_one_split_k():
    """Batch 1 with a 32k context: split into partitions and merged."""
    out, cpu, ref = decode_on_both(1, 32, 8, 128, 16, torch.bfloat16, [32768])
    assert_close(out, ref, torch.bfloat16)
    assert_close(out, cpu.double(), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16])
def test_cuda_decode_split_k_with_ragged_and_empty(page_size, dtype):
    """Few sequences (so the context splits) where some partitions are empty;
    float32 runs the SIMT kernel, bfloat16 the tensor-core one."""
    out, cpu, ref = decode_on_both(4, 8, 2, 128, page_size, dtype, [0, 5, 3001, 70])
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    assert_close(out, ref, dtype)
    assert_close(out, cpu.double(), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decode_graph_replays_follow_device_lengths(dtype):
    """Captured once at the block tables' full width (so the context splits and
    the merge kernel, on sm_90 a programmatic dependent launch, is in the
    graph), then replayed after seq_lens and the query change in place: the
    kernels size their work from the lengths on the device."""
    num_seqs, num_heads, num_kv_heads, head_dim, page_size, max_pages = 2, 8, 2, 128, 16, 64
    key_cache, value_cache = random_cache(num_seqs * max_pages, page_size, num_kv_heads,
                                          head_dim, dtype, "cuda")
    table = torch.randperm(num_seqs * max_pages, device="cuda").to(torch.int32)
    table = table.view(num_seqs, max_pages)
    query = torch.randn(num_seqs, num_heads, head_dim, device="cuda").to(dtype)
    lens = torch.ones(num_seqs, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)

    def decode():
        ops.paged_attention_decode(query, key_cache, value_cache, table, lens, out=out)

    graph = torch.cuda.CUDAGraph()
    with ops.index_checks(False):  # a check's copy to the host cannot be captured
        warmup = torch.cuda.Stream()
        warmup.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warmup):
            decode()
        torch.cuda.current_stream().wait_stream(warmup)
        with torch.cuda.graph(graph):
            decode()
    for seq_lens in ([0, 17], [1000, 3], [max_pages * page_size, 1]):
        lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
        query.copy_(torch.randn(query.shape).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        ref = reference.paged_attention_decode(query.double(), key_cache.double(),
                                               value_cache.double(), table, lens,
                                               1 / math.sqrt(head_dim))
        assert_close(out, ref, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 8, 32, 48])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [
    (32, 8, 128),   # Llama-3.2-11B
    (28, 4, 128),   # Qwen2-VL-7B, LLaVA-OneVision-7B: group of 7
    (32, 32, 128),  # LLaVA-1.5/NeXT-7B: no GQA
    (64, 1, 64),    # MQA group of 64: four head chunks of 16, head_dim bucket 64
    (12, 2, 80),    # head_dim between the buckets: padded k-steps
])
def test_cuda_tensor_core_decode_pages_and_groups(num_heads, num_kv_heads, head_dim, page_size,
                                                  dtype):
    """The tensor-core kernel's warp chunks against pages smaller than a chunk,
    larger, and of a size that is not a power of two, with lengths that end
    mid-chunk, on a chunk boundary, and zero."""
    seq_lens = [0, 1, 15, 16, 17, 700, 2049]
    out, cpu, ref = decode_on_both(len(seq_lens), num_heads, num_kv_heads, head_dim, page_size,
                                   dtype, seq_lens)
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    assert_close(out, ref, dtype)
    assert_close(out, cpu.double(), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [
    (64, 1, 128),   # MQA group larger than one CTA's heads: head chunks
    (16, 1, 256),   # head_dim 256, fp32 stages over 48 KB of shared memory
    (28, 4, 128),   # Qwen2-VL-7B: group of 7
    (12, 2, 128),   # Qwen2-VL-2B: group of 6
    (4, 4, 8),      # the smallest head_dim
])
def test_cuda_decode_head_layouts(num_heads, num_kv_heads, head_dim):
    seq_lens = [1, 17, 250, 64]
    out, cpu, ref = decode_on_both(4, num_heads, num_kv_heads, head_dim, 16, torch.float32,
                                   seq_lens)
    assert_close(out, ref, torch.float32)
    assert_close(out, cpu.double(), torch.float32)


@pytest.mark.cuda
def test_cuda_decode_many_sequences_no_split():
    seq_lens = torch.randint(1, 2048, (64,)).tolist()
    out, cpu, ref = decode_on_both(64, 32, 8, 128, 16, torch.bfloat16, seq_lens)
    assert_close(out, ref, torch.bfloat16)
    assert_close(out, cpu.double(), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_reshape_and_cache_matches_cpu(head_dim, dtype):
    """16-byte vector path (64) and the element path (20, unaligned rows)."""
    key, value = qkv_views(50, 4, 2, head_dim, dtype, "cpu")
    key_cache, value_cache = random_cache(10, 16, 2, head_dim, dtype, "cpu")
    slots = torch.randperm(160)[:50]
    slots[::7] = -1
    gk, gv = key_cache.cuda(), value_cache.cuda()
    ops.reshape_and_cache(key.cuda(), value.cuda(), gk, gv, slots.cuda())
    ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(gk.cpu(), key_cache)
    assert torch.equal(gv.cpu(), value_cache)


@pytest.mark.cuda
def test_cuda_decode_rejects_head_dim_not_multiple_of_8():
    key_cache, value_cache = random_cache(2, 4, 1, 36, torch.float32, "cuda")
    table = torch.zeros(1, 2, dtype=torch.int32, device="cuda")
    lens = torch.ones(1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8"):
        ops.paged_attention_decode(torch.randn(1, 2, 36, device="cuda"), key_cache, value_cache,
                                   table, lens)


@pytest.mark.cuda
@pytest.mark.parametrize("case, match", [
    ("seq_len_too_long", "seq_lens values must be in"),
    ("page_out_of_range", "block_tables entries used"),
])
def test_cuda_decode_index_checks(case, match):
    query, key_cache, value_cache, table, lens = decode_inputs()
    if case == "seq_len_too_long":
        lens[0] = 13
    else:
        table[1, 1] = 6
    args = [t.cuda() for t in (query, key_cache, value_cache, table, lens)]
    with pytest.raises(IndexError, match=match):
        ops.paged_attention_decode(*args)


UNCHECKED_SCRIPT = """
import torch
from pyvlm import ops
cache = torch.randn(4, 4, 2, 16, device="cuda")
before = cache.clone()
key = torch.randn(3, 2, 16, device="cuda")
slots = torch.tensor([99, -5, 2**40], device="cuda")
table = torch.tensor([[0, 7, -3], [2**30, 1, 2]], dtype=torch.int32, device="cuda")
lens = torch.tensor([2**30, -4], dtype=torch.int32, device="cuda")
query = torch.randn(2, 4, 16, device="cuda")
with ops.index_checks(False):
    ops.reshape_and_cache(key, key, cache, cache.clone(), slots)
    torch.cuda.synchronize()
    assert torch.equal(cache, before), "out-of-range slots must be skipped"
    ops.paged_attention_decode(query, cache, cache, table, lens)
    half = cache.bfloat16()  # the tensor-core kernel
    ops.paged_attention_decode(query.bfloat16(), half, half, table, lens)
    torch.cuda.synchronize()
# Out of the scope this thread checks again, before any launch.
assert_checked_again((lambda: ops.reshape_and_cache(key, key, cache, cache.clone(), slots),
                      lambda: ops.paged_attention_decode(query, cache, cache, table, lens)),
                     IndexError, "slot_mapping", "seq_lens")
print("ok")
"""


@pytest.mark.cuda
def test_cuda_unchecked_indices_never_fault():
    """With index checks off the kernels skip bad indices instead of faulting
    (in a child process: a fault would poison this one's CUDA context)."""
    result = run_cuda_child(UNCHECKED_SCRIPT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
