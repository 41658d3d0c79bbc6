"""packed_attention (the vision towers' attention) against the float64
reference: pyvlm's kernel on the CPU and for float32, torch's FlashAttention
for 16-bit CUDA inputs where this torch has it, cuDNN for segments of one
length, on views into a fused QKV projection as the towers pass them."""

import os
import subprocess
import sys

import pytest
import torch

from pyvlm.layers import packed_attention as packed
from pyvlm.ops import reference
from tests.ops.conftest import assert_close, run_cuda_child

# Two small images and one of Qwen2-VL's 644x476 photo (1,564 patch rows).
IMAGE_ROWS = [37, 256, 1564]


def fused_case(rows, heads, head_dim, dtype, device):
    total = sum(rows)
    qkv = torch.randn(total, 3, heads, head_dim, device=device).to(dtype)
    query, key, value = qkv.unbind(1)
    cu = torch.tensor([0] + torch.tensor(rows).cumsum(0).tolist(), dtype=torch.int32,
                      device=device)
    return (query, key, value, cu, cu, max(rows), max(rows), 0.9 * head_dim ** -0.5)


def as_double(case):
    return tuple(t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in case)


def check(case, dtype):
    out = packed.packed_attention(*case)
    assert out.shape == case[0].shape and out.dtype == dtype
    assert_close(out, reference.varlen_attention(*as_double(case)), dtype)


def test_cpu_runs_pyvlm_kernel():
    case = fused_case([5, 40], 4, 80, torch.float32, "cpu")
    assert not packed.takes_torch_flash(*case[:3])
    check(case, torch.float32)


@pytest.mark.parametrize("head_dim", [64, 72, 80])
def test_cpu_bfloat16(head_dim):
    check(fused_case([9, 70], 4, head_dim, torch.bfloat16, "cpu"), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 72, 80])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_16bit_matches_reference(head_dim, dtype):
    case = fused_case(IMAGE_ROWS, 16, head_dim, dtype, "cuda")
    if packed._FLASH_AVAILABLE:  # this torch has FlashAttention varlen with a scale
        assert packed.takes_torch_flash(*case[:3])
    check(case, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("segments, rows", [(1, 1564), (4, 1608), (3, 729), (1, 6432)])
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_equal_lengths_run_cudnn_as_a_dense_batch(segments, rows, head_dim, dtype):
    case = fused_case([rows] * segments, 16, head_dim, dtype, "cuda")
    expected = reference.varlen_attention(*as_double(case))
    out = packed.packed_attention(*case, equal_lengths=True)
    assert out.shape == case[0].shape and out.dtype == dtype
    assert_close(out, expected, dtype)
    kind = (case[0].device.index, dtype, head_dim)
    if packed.takes_cudnn(*case[:3]) or packed._cudnn_runs.get(kind) is False:
        # cuDNN ran it, or refused once and the kind went back to FlashAttention
        assert kind in packed._cudnn_runs
    # The same call without the promise runs FlashAttention (varlen).
    assert_close(packed.packed_attention(*case), expected, dtype)


def test_cpu_never_takes_cudnn_and_unequal_lengths_stay_varlen():
    case = fused_case([5, 5], 4, 80, torch.float32, "cpu")
    assert not packed.takes_cudnn(*case[:3])
    check(case, torch.float32)
    torch.testing.assert_close(packed.packed_attention(*case, equal_lengths=True),
                               packed.packed_attention(*case), rtol=0, atol=0)


def test_wgmma_mode_is_opt_in_and_needs_cuda(monkeypatch):
    case = fused_case([5, 40], 4, 80, torch.bfloat16, "cpu")
    assert not packed.takes_pyvlm_wgmma(*case[:3])  # not asked for
    monkeypatch.setattr(packed, "_FORCED", "wgmma")
    assert not packed.takes_pyvlm_wgmma(*case[:3])  # asked for, but CPU tensors
    check(case, torch.bfloat16)


SM90_FORM_SCRIPT = (
    "import os, pyvlm.layers.packed_attention\n"
    "print(os.environ.get('PYVLM_SM90_ATTENTION'))\n")


@pytest.mark.parametrize("env, form", [
    ({"PYVLM_PACKED_ATTENTION": "wgmma"}, "1"),  # the mode turns the op's kernel on
    ({"PYVLM_PACKED_ATTENTION": "wgmma", "PYVLM_SM90_ATTENTION": "bn64-overlap"}, "bn64-overlap"),
    ({}, "None"),  # neither asked for: the op keeps its mma.sync kernel
])
def test_wgmma_mode_turns_the_ops_kernel_on(env, form):
    """PYVLM_PACKED_ATTENTION=wgmma sets the op's PYVLM_SM90_ATTENTION when
    unset, at import, for this process and the engine processes it starts."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("PYVLM_PACKED_ATTENTION", "PYVLM_SM90_ATTENTION")}
    result = subprocess.run([sys.executable, "-c", SM90_FORM_SCRIPT], env={**base, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [form]


WGMMA_MODE_SCRIPT = """
import torch
from pyvlm.layers import packed_attention as packed
from pyvlm.ops import reference
from tests.layers.test_packed_attention import as_double, fused_case
from tests.ops.conftest import assert_close
for rows in ([37, 256, 1564], [6432], [577] * 4):
    for head_dim in (64, 72, 80):
        for dtype in (torch.float16, torch.bfloat16):
            case = fused_case(rows, 16, head_dim, dtype, "cuda")
            assert packed.takes_pyvlm_wgmma(*case[:3])
            expected = reference.varlen_attention(*as_double(case))
            for equal_lengths in {False, len(set(rows)) == 1}:
                out = packed.packed_attention(*case, equal_lengths=equal_lengths)
                assert out.shape == case[0].shape and out.dtype == dtype
                assert_close(out, expected, dtype)
print("ok")
"""


@pytest.mark.cuda
def test_cuda_wgmma_mode_matches_reference():
    """PYVLM_PACKED_ATTENTION=wgmma (in a child: the op reads its kernel
    choice once): the towers' calls go to pyvlm's op and its wgmma kernel
    on an sm_90 card, unequal and equal lengths alike."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("pyvlm's wgmma kernel needs an sm_90 card (H100, H200)")
    result = run_cuda_child(WGMMA_MODE_SCRIPT, PYVLM_PACKED_ATTENTION="wgmma")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.cuda
def test_cuda_float32_runs_pyvlm_kernel():
    case = fused_case(IMAGE_ROWS, 16, 80, torch.float32, "cuda")
    assert not packed.takes_torch_flash(*case[:3])
    check(case, torch.float32)


def causal_reference(query, key, value, lens, scale):
    """Causal GQA attention of each packed prompt over its own rows, float64."""
    outs, start = [], 0
    group = query.shape[1] // key.shape[1]
    for n in lens:
        q, k, v = (t[start:start + n].double() for t in (query, key, value))
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        outs.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf"))
                                 .softmax(-1), v))
        start += n
    return torch.cat(outs)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_fresh_causal_attention_with_gqa(dtype):
    """Qwen2-7B's heads (28 query, 4 key/value, d 128) over prompts of 450
    and 1,100 rows, key/value as views into a fused projection."""
    if not packed._FLASH_AVAILABLE:
        pytest.skip("this torch has no FlashAttention varlen (CUDA build without it, or < 2.9)")
    lens, heads, kv_heads, head_dim = [450, 1100], 28, 4, 128
    qkv = torch.randn(sum(lens), heads + 2 * kv_heads, head_dim, device="cuda").to(dtype)
    query, key, value = qkv.split([heads, kv_heads, kv_heads], dim=1)
    assert packed.takes_torch_flash(query, key, value)
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device="cuda")
    scale = head_dim ** -0.5
    out = packed.causal_attention(query, key, value, cu, cu, max(lens), max(lens), scale)
    assert_close(out, causal_reference(query, key, value, lens, scale), dtype)
