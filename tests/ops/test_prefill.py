import math

import pytest
import torch

from pyvlm import ops
from pyvlm.ops import reference

from .conftest import assert_close, poisoned, run_cuda_child

# (prefix_lens, new_lens): a single sequence, and a batch with prefixes that
# end mid-page and on page boundaries, a one-token extend, and an empty span.
BATCHES = {
    "single": ([0], [37]),
    "single_prefix": ([29], [70]),
    "batch": ([0, 15, 16, 33, 5, 0], [1, 70, 17, 0, 9, 48]),
}
HEADS = [(4, 4), (8, 2), (14, 2)]  # GQA ratios 1, 4, 7


def cu_seqlens(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens, dtype=torch.long).cumsum(0)),
                        dtype=torch.int32, device=device)


def paged_case(prefixes, new_lens, heads, head_dim, page_size, dtype, device):
    """Random query and paged caches; unused block-table entries are garbage."""
    num_heads, num_kv_heads = heads
    totals = [p + n for p, n in zip(prefixes, new_lens)]
    pages = [math.ceil(t / page_size) for t in totals]
    num_pages = sum(pages) + 3
    max_pages = max(pages, default=0) + 1
    perm = torch.randperm(num_pages).tolist()
    block_tables = torch.full((len(prefixes), max_pages), num_pages + 100, dtype=torch.int32)
    for s, n in enumerate(pages):
        block_tables[s, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    return dict(
        query=torch.randn(sum(new_lens), num_heads, head_dim, device=device).to(dtype),
        key_cache=torch.randn(shape, device=device).to(dtype),
        value_cache=torch.randn(shape, device=device).to(dtype),
        block_tables=block_tables.to(device),
        cu_seqlens_q=cu_seqlens(new_lens, device),
        prefix_lens=torch.tensor(prefixes, dtype=torch.int32, device=device),
        max_seqlen_q=max(new_lens, default=0),
        scale=head_dim ** -0.5,
    )


def as_double(case):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in case.items()}


def run_paged(case):
    out = poisoned(*case["query"].shape, dtype=case["query"].dtype, device=case["query"].device)
    ops.paged_attention_prefill(**case, out=out)
    return out


def check_paged(case, dtype):
    assert_close(run_paged(case), reference.paged_attention_prefill(**as_double(case)), dtype)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_prefill_matches_reference(device, batch, page_size, heads, dtype):
    prefixes, new_lens = BATCHES[batch]
    check_paged(paged_case(prefixes, new_lens, heads, 64, page_size, dtype, device), dtype)


@pytest.mark.parametrize("head_dim", [40, 64, 72, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_prefill_head_dims(device, head_dim, dtype):
    prefixes, new_lens = BATCHES["batch"]
    check_paged(paged_case(prefixes, new_lens, (8, 2), head_dim, 16, dtype, device), dtype)


def test_paged_prefill_odd_head_dim_on_cpu():
    prefixes, new_lens = BATCHES["batch"]
    check_paged(paged_case(prefixes, new_lens, (7, 7), 36, 4, torch.float32, "cpu"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_prefill_strided_query(device, dtype):
    case = paged_case([5, 20], [30, 3], (8, 2), 64, 16, dtype, device)
    wide = torch.randn(33, 8, 3 * 64, device=device).to(dtype)
    case["query"] = wide[:, :, 64:128]  # a view into a fused projection
    check_paged(case, dtype)


def test_paged_prefill_empty_batch(device):
    case = paged_case([], [], (4, 2), 64, 16, torch.float32, device)
    assert run_paged(case).shape == (0, 4, 64)
    case = paged_case([3, 0], [0, 0], (4, 2), 64, 16, torch.float32, device)
    assert run_paged(case).shape == (0, 4, 64)


def write_sequence(keys, values, page_size, num_kv_heads, head_dim, dtype, device):
    """A cache holding one sequence's K/V, written by slot index assignment."""
    total = keys.shape[0]
    num_pages = math.ceil(total / page_size) + 2
    table = torch.randperm(num_pages)[: math.ceil(total / page_size)]
    key_cache = torch.zeros(num_pages * page_size, num_kv_heads, head_dim, dtype=dtype,
                            device=device)
    value_cache = torch.zeros_like(key_cache)
    pos = torch.arange(total)
    slots = (table[pos // page_size] * page_size + pos % page_size).to(device)
    key_cache[slots] = keys
    value_cache[slots] = values
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    return key_cache.view(shape), value_cache.view(shape), table.to(torch.int32).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_equals_one_shot(device, dtype):
    total, heads, kv_heads, head_dim, page_size = 150, 8, 2, 64, 16
    keys = torch.randn(total, kv_heads, head_dim, device=device).to(dtype)
    values = torch.randn(total, kv_heads, head_dim, device=device).to(dtype)
    query = torch.randn(total, heads, head_dim, device=device).to(dtype)
    key_cache, value_cache, table = write_sequence(keys, values, page_size, kv_heads, head_dim,
                                                   dtype, device)

    def prefill(start, end):
        return ops.paged_attention_prefill(
            query[start:end], key_cache, value_cache, table[None], cu_seqlens([end - start], device),
            torch.tensor([start], dtype=torch.int32, device=device), end - start, head_dim ** -0.5)

    one_shot = prefill(0, total)
    chunked = torch.cat([prefill(0, 37), prefill(37, 101), prefill(101, total)])
    assert_close(chunked, one_shot.double(), dtype)
    ref = reference.paged_attention_prefill(
        query.double(), key_cache.double(), value_cache.double(), table[None],
        cu_seqlens([total], device), torch.zeros(1, dtype=torch.int32, device=device), total,
        head_dim ** -0.5)
    assert_close(one_shot, ref, dtype)


# ---- varlen_attention ---------------------------------------------------------

def varlen_case(q_lens, k_lens, heads, head_dim, dtype, device, fused=True):
    """Query, key and value as views into fused projections (strided rows)."""
    num_heads, num_kv_heads = heads
    total_q, total_k = sum(q_lens), sum(k_lens)
    if fused and q_lens == k_lens:
        width = num_heads + 2 * num_kv_heads
        qkv = torch.randn(total_q, width, head_dim, device=device).to(dtype)
        query, key, value = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    else:
        query = torch.randn(total_q, num_heads, head_dim, device=device).to(dtype)
        kv = torch.randn(total_k, 2, num_kv_heads, head_dim, device=device).to(dtype)
        key, value = kv[:, 0], kv[:, 1]
    return dict(query=query, key=key, value=value, cu_seqlens_q=cu_seqlens(q_lens, device),
                cu_seqlens_k=cu_seqlens(k_lens, device), max_seqlen_q=max(q_lens, default=0),
                max_seqlen_k=max(k_lens, default=0), scale=0.7 * head_dim ** -0.5)


def run_varlen(case):
    q = case["query"]
    out = poisoned(*q.shape, dtype=q.dtype, device=q.device)
    ops.varlen_attention(**case, out=out)
    return out


def check_varlen(case, dtype):
    assert_close(run_varlen(case), reference.varlen_attention(**as_double(case)), dtype)


VARLEN_LENS = {
    "self": ([16, 100, 1, 64], [16, 100, 1, 64]),
    "cross": ([5, 0, 33, 64, 9], [7, 3, 0, 50, 130]),  # no queries; no keys
}


@pytest.mark.parametrize("lens", list(VARLEN_LENS))
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_varlen_matches_reference(device, lens, heads, dtype):
    q_lens, k_lens = VARLEN_LENS[lens]
    check_varlen(varlen_case(q_lens, k_lens, heads, 64, dtype, device), dtype)


@pytest.mark.parametrize("head_dim", [40, 72, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_head_dims(device, head_dim, dtype):
    q_lens, k_lens = VARLEN_LENS["self"]
    check_varlen(varlen_case(q_lens, k_lens, (16, 16), head_dim, dtype, device), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_long_images_on_cuda(head_dim, dtype):
    """Many whole key tiles (the unmasked path) and a ragged last one: a
    Qwen2-VL 644x476 image's 1,564 rows next to a 300-row one."""
    lens = [1564, 300]
    check_varlen(varlen_case(lens, lens, (16, 16), head_dim, dtype, "cuda"), dtype)


def test_varlen_contiguous_and_odd_head_dim_on_cpu():
    q_lens, k_lens = VARLEN_LENS["cross"]
    check_varlen(varlen_case(q_lens, k_lens, (6, 3), 20, torch.float32, "cpu", fused=False),
                 torch.float32)


def test_varlen_no_keys_gives_zeros(device):
    case = varlen_case([3, 4], [0, 0], (4, 2), 64, torch.float32, device)
    assert torch.equal(run_varlen(case), torch.zeros(7, 4, 64, device=device))


def test_varlen_empty_batch(device):
    case = varlen_case([], [], (4, 2), 64, torch.float32, device)
    assert run_varlen(case).shape == (0, 4, 64)


def test_opcheck(device):
    case = paged_case([3, 16], [5, 20], (4, 2), 64, 16, torch.float32, device)
    out = torch.empty_like(case["query"])
    torch.library.opcheck(torch.ops.pyvlm.paged_attention_prefill.default,
                          (out, *case.values()))
    case = varlen_case([5, 9], [7, 9], (4, 2), 64, torch.float32, device, fused=False)
    out = torch.empty_like(case["query"])
    torch.library.opcheck(torch.ops.pyvlm.varlen_attention.default, (out, *case.values()))


# ---- bad inputs ------------------------------------------------------------------

def _with(case, **changes):
    return {**case, **changes}


def _paged_bad_cases():
    c = paged_case([3, 16], [5, 20], (4, 2), 64, 16, torch.float32, "cpu")
    bt = c["block_tables"].clone()
    bt[1, 0] = 10_000
    return [
        (_with(c, query=c["query"].int()), ValueError, "query must be float32"),
        (_with(c, query=c["query"][..., :32].contiguous()), ValueError,
         "key_cache head_dim must equal"),
        (_with(c, query=torch.randn(25, 4, 128)[..., ::2]), ValueError,
         "query's last dimension must be contiguous"),
        (_with(c, key_cache=c["key_cache"].half()), ValueError, "key_cache must have dtype"),
        (_with(c, key_cache=c["key_cache"][0]), ValueError, "key_cache must have 4 dimensions"),
        (_with(c, value_cache=c["value_cache"][:-1]), ValueError, "value_cache must have shape"),
        (_with(c, query=torch.randn(25, 3, 64)), ValueError, "must be a positive multiple"),
        (_with(c, block_tables=c["block_tables"].long()), ValueError,
         "block_tables must have dtype"),
        (_with(c, cu_seqlens_q=c["cu_seqlens_q"][:2]), ValueError, r"cu_seqlens_q.size\(0\)"),
        (_with(c, prefix_lens=c["prefix_lens"].long()), ValueError, "prefix_lens must have dtype"),
        (_with(c, cu_seqlens_q=torch.tensor([0, 30, 25], dtype=torch.int32)), ValueError,
         "cu_seqlens_q must be non-decreasing"),
        (_with(c, cu_seqlens_q=torch.tensor([0, 5, 24], dtype=torch.int32)), ValueError,
         r"cu_seqlens_q\[-1\] must equal"),
        (_with(c, cu_seqlens_q=torch.tensor([1, 5, 25], dtype=torch.int32)), ValueError,
         r"cu_seqlens_q\[0\] must be 0"),
        (_with(c, max_seqlen_q=19), ValueError, "max_seqlen_q"),
        (_with(c, max_seqlen_q=-1), ValueError, "max_seqlen_q must be >= 0"),
        (_with(c, prefix_lens=torch.tensor([-1, 16], dtype=torch.int32)), ValueError,
         "prefix_lens must be >= 0"),
        (_with(c, prefix_lens=torch.tensor([3, 60], dtype=torch.int32)), ValueError,
         "must fit block_tables"),
        (_with(c, block_tables=bt), IndexError, "block_tables values in use"),
    ]


@pytest.mark.parametrize("index", range(18))
def test_paged_prefill_bad_inputs_raise_naming_argument(index):
    case, exc, match = _paged_bad_cases()[index]
    with pytest.raises(exc, match=match):
        ops.paged_attention_prefill(**case)


def test_paged_prefill_bad_out():
    c = paged_case([3], [5], (4, 2), 64, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="out must have shape"):
        ops.paged_attention_prefill(**c, out=torch.empty(5, 4, 32))
    with pytest.raises(ValueError, match="out must be contiguous"):
        ops.paged_attention_prefill(**c, out=torch.empty(4, 5, 64).transpose(0, 1))
    with pytest.raises(ValueError, match="out must have dtype"):
        ops.paged_attention_prefill(**c, out=torch.empty(5, 4, 64, dtype=torch.float16))


def _varlen_bad_cases():
    c = varlen_case([5, 9], [7, 9], (4, 2), 64, torch.float32, "cpu", fused=False)
    return [
        (_with(c, key=c["key"][..., :32], value=c["value"][..., :32]), ValueError, "key head_dim must equal"),
        (_with(c, value=c["value"][:-1]), ValueError, "value must have shape"),
        (_with(c, key=c["key"].double()), ValueError, "key must have dtype"),
        (_with(c, key=torch.randn(16, 2, 128)[..., ::2]), ValueError,
         "key's last dimension must be contiguous"),
        (_with(c, cu_seqlens_k=c["cu_seqlens_k"][:2]), ValueError, r"cu_seqlens_k.size\(0\)"),
        (_with(c, cu_seqlens_k=c["cu_seqlens_k"].long()), ValueError,
         "cu_seqlens_k must have dtype"),
        (_with(c, cu_seqlens_k=torch.tensor([0, 7, 15], dtype=torch.int32)), ValueError,
         r"cu_seqlens_k\[-1\] must equal"),
        (_with(c, cu_seqlens_q=torch.tensor([0, 15, 14], dtype=torch.int32)), ValueError,
         "cu_seqlens_q must be non-decreasing"),
        (_with(c, max_seqlen_k=8), ValueError, "max_seqlen_k"),
        (_with(c, max_seqlen_q=8), ValueError, "max_seqlen_q"),
    ]


@pytest.mark.parametrize("index", range(10))
def test_varlen_bad_inputs_raise_naming_argument(index):
    case, exc, match = _varlen_bad_cases()[index]
    with pytest.raises(exc, match=match):
        ops.varlen_attention(**case)


# ---- CUDA only ------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("prefix", [0, 1024])
def test_cuda_long_prefill_matches_cpu_and_reference(prefix):
    case = paged_case([prefix, 7], [2048, 300], (28, 4), 128, 16, torch.bfloat16, "cuda")
    gpu = run_paged(case)
    assert_close(gpu, reference.paged_attention_prefill(**as_double(case)), torch.bfloat16)
    cpu = run_paged({k: v.cpu() if torch.is_tensor(v) else v for k, v in case.items()})
    assert_close(gpu, cpu.double(), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_vision_varlen_matches_cpu_and_reference(dtype):
    case = varlen_case([1024] * 4, [1024] * 4, (16, 16), 80, dtype, "cuda")
    gpu = run_varlen(case)
    assert_close(gpu, reference.varlen_attention(**as_double(case)), dtype)
    cpu = run_varlen({k: v.cpu() if torch.is_tensor(v) else v for k, v in case.items()})
    assert_close(gpu, cpu.double(), dtype)


# Both CUDA kernels of varlen_attention on a Hopper card: the wgmma one
# (csrc/kernels/cuda/attention_sm90.cuh) in each of the forms
# PYVLM_SM90_ATTENTION names, and the mma.sync one it keeps when 0 (or
# unset, as in this process); each child checks against the float64
# reference. Elsewhere every child runs the mma.sync kernel.
KERNEL_CHOICE_SCRIPT = """
import torch
from pyvlm import ops
from pyvlm.ops import reference
from tests.ops.test_prefill import as_double, varlen_case
from tests.ops.conftest import assert_close, poisoned
cases = [
    ([6432], [6432], (16, 16), 80, True),              # one Llama-3.2-Vision image, 4 tiles
    ([577] * 5, [577] * 5, (16, 16), 64, True),        # CLIP tiles
    ([729, 729], [729, 729], (16, 16), 72, False),     # SigLIP crops (head size padded to 80)
    ([1, 17, 130, 255, 300], [3, 140, 17, 0, 300], (8, 2), 128, False),  # ragged, GQA, no keys
    ([300, 64], [300, 64], (4, 4), 40, False),         # a head size under 64
]
for dtype in (torch.bfloat16, torch.float16):
    for q_lens, k_lens, heads, head_dim, fused in cases:
        case = varlen_case(q_lens, k_lens, heads, head_dim, dtype, "cuda", fused=fused)
        out = poisoned(*case["query"].shape, dtype=dtype, device="cuda")
        ops.varlen_attention(**case, out=out)
        assert_close(out, reference.varlen_attention(**as_double(case)), dtype)
print("ok")
"""


@pytest.mark.cuda
@pytest.mark.parametrize("sm90_attention",
                         ["1", "bn64", "bn64-overlap", "bn128-overlap", "bn64-x2", "0"])
def test_cuda_varlen_kernels_match_reference(sm90_attention):
    result = run_cuda_child(KERNEL_CHOICE_SCRIPT, PYVLM_SM90_ATTENTION=sm90_attention)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.cuda
def test_cuda_unknown_sm90_form_is_a_clear_error():
    """Read at the first 16-bit call on an sm_90 device; elsewhere unused."""
    result = run_cuda_child(KERNEL_CHOICE_SCRIPT, PYVLM_SM90_ATTENTION="bn32")
    if torch.cuda.get_device_capability() != (9, 0):
        assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
        return
    assert result.returncode != 0 and "PYVLM_SM90_ATTENTION must be" in result.stderr


@pytest.mark.cuda
def test_cuda_unaligned_views_use_scalar_loads():
    # A query view starting 8 bytes into its storage: no 16-byte cp.async.
    case = varlen_case([40, 70], [40, 70], (4, 4), 64, torch.float16, "cuda", fused=False)
    case["query"] = torch.randn(110, 4, 68, device="cuda").half()[..., 4:]
    check_varlen(case, torch.float16)


@pytest.mark.cuda
def test_cuda_rejects_head_dim_not_multiple_of_8():
    case = paged_case([0], [4], (2, 2), 36, 16, torch.float32, "cuda")
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.paged_attention_prefill(**case)


SKIPPED_CHECKS_SCRIPT = """
import torch
from pyvlm import ops
q = torch.randn(10, 4, 64, device="cuda", dtype=torch.bfloat16)
cache = torch.randn(4, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
bt = torch.tensor([[0, 10**6], [-5, 3]], dtype=torch.int32, device="cuda")
cu = torch.tensor([0, 4, 10**6], dtype=torch.int32, device="cuda")
prefix = torch.tensor([20, 1000], dtype=torch.int32, device="cuda")
kv = torch.randn(5, 2, 64, device="cuda", dtype=torch.bfloat16)
cu_k = torch.tensor([-3, 2, 99], dtype=torch.int32, device="cuda")
calls = (lambda: ops.paged_attention_prefill(q, cache, cache, bt, cu, prefix, 64, 0.1),
         lambda: ops.varlen_attention(q, kv, kv, cu, cu_k, 64, 64, 0.1))
with ops.index_checks(False):
    for call in calls:
        call()
    torch.cuda.synchronize()
# Out of the scope this thread checks again, before any launch.
assert_checked_again(calls, ValueError, "cu_seqlens_q[-1] must equal")
print("ok")
"""


@pytest.mark.cuda
def test_cuda_kernels_skip_invalid_indices_when_checks_are_off():
    """In a child process: a fault would poison this one's CUDA context."""
    result = run_cuda_child(SKIPPED_CHECKS_SCRIPT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
