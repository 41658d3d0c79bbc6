"""RMS norms, LayerNorms, rotary embeddings (plain and mrope) and the multimodal merge
against float64 references, transformers' own modules, and CUDA vs CPU."""

import math

import pytest
import torch
from torch.nn import functional as F

from pyvlm import ops
from pyvlm.layers.rotary import cos_sin_cache, default_inv_freq
from pyvlm.ops import reference

from .conftest import assert_close, poisoned, run_cuda_child

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NORM_SHAPES = [(0, 64), (1, 64), (7, 100), (33, 3584), (4, 4096), (2, 3, 128)]


def random_weight(hidden, dtype, device):
    return (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype)


# ---- rms_norm / fused_add_rms_norm ------------------------------------------


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(device, shape, dtype):
    x = (3 * torch.randn(*shape, device=device)).to(dtype)
    w = random_weight(shape[-1], dtype, device)
    out = poisoned(*shape, dtype=dtype, device=device)
    ops.rms_norm(x, w, 1e-6, out=out)
    assert_close(out, reference.rms_norm(x.double(), w.double(), 1e-6), dtype)


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_reference(device, shape, dtype):
    x = (3 * torch.randn(*shape, device=device)).to(dtype)
    residual = torch.randn(*shape, device=device).to(dtype)
    w = random_weight(shape[-1], dtype, device)
    ref_out, ref_residual = reference.fused_add_rms_norm(x.double(), residual.double(), w.double(), 1e-5)
    ops.fused_add_rms_norm(x, residual, w, 1e-5)
    assert_close(residual, ref_residual, dtype)
    assert_close(x, ref_out, dtype)


def hf_rms_norm(x, weight, epsilon):
    """transformers' LlamaRMSNorm (= Qwen2RMSNorm) run in the model dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = LlamaRMSNorm(x.shape[-1], eps=epsilon).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        return module(x)


def assert_matches_hf_bits(out, ref):
    """Equal bits, but for rare 1-ulp flips where a float32 sum of squares
    added in another order than torch's lands a value on the other side of a
    rounding boundary (measured ~5e-5 of the elements; rounding once instead
    of HF's twice differs in ~26%)."""
    differ = out != ref
    assert differ.float().mean().item() <= 1e-3, f"{differ.sum().item()} of {out.numel()} differ"
    # A 1-ulp flip of x * rsqrt(...) moves weight * it by about one ulp more.
    two_ulps = 2 * torch.finfo(out.dtype).eps * ref.abs().float()
    assert ((out.float() - ref.float()).abs() <= two_ulps)[differ].all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 3584, 4096])
def test_rms_norm_rounds_like_transformers(device, dtype, hidden):
    x = (3 * torch.randn(256, hidden, device=device)).to(dtype)
    w = random_weight(hidden, dtype, device)
    assert_matches_hf_bits(ops.rms_norm(x, w, 1e-6), hf_rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_add_rms_norm_rounds_like_transformers(device, dtype):
    x = (3 * torch.randn(256, 3584, device=device)).to(dtype)
    residual = (3 * torch.randn(256, 3584, device=device)).to(dtype)
    w = random_weight(3584, dtype, device)
    hf_residual = residual + x  # HF decoder layers add in the model dtype
    hf_out = hf_rms_norm(hf_residual, w, 1e-6)
    ops.fused_add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(residual, hf_residual)
    assert_matches_hf_bits(x, hf_out)


def test_rms_norm_out_may_alias_input():
    x = torch.randn(5, 256).bfloat16()
    w = random_weight(256, torch.bfloat16, "cpu")
    expected = ops.rms_norm(x, w, 1e-6)
    ops.rms_norm(x, w, 1e-6, out=x)
    assert torch.equal(x, expected)


# ---- layer_norm / fused_add_layer_norm ------------------------------------------

# 1280: Qwen2-VL's tower; 1281 and 9001: odd widths (the CUDA scalar path,
# 9001 past its registers); 70000: past the registers of the 16-byte path.
LAYER_NORM_SHAPES = [(0, 64), (1, 64), (7, 1280), (5, 1281), (33, 3584), (2, 3, 128),
                     (3, 16384), (2, 9001), (1, 70000)]


def layer_norm_inputs(shape, dtype, device, has_bias):
    """x off-centre (a mean to subtract), weight and an optional bias."""
    x = (3 * torch.randn(*shape, device=device) + 2).to(dtype)
    w = random_weight(shape[-1], dtype, device)
    bias = torch.randn(shape[-1], device=device).to(dtype) if has_bias else None
    return x, w, bias


def as_double(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("shape", LAYER_NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_matches_reference(device, shape, dtype, has_bias):
    x, w, bias = layer_norm_inputs(shape, dtype, device, has_bias)
    out = poisoned(*shape, dtype=dtype, device=device)
    ops.layer_norm(x, w, bias, 1e-6, out=out)
    assert_close(out, reference.layer_norm(x.double(), w.double(), as_double(bias), 1e-6), dtype)


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("shape", LAYER_NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_layer_norm_matches_reference(device, shape, dtype, has_bias):
    x, w, bias = layer_norm_inputs(shape, dtype, device, has_bias)
    residual = torch.randn(*shape, device=device).to(dtype)
    torch_sum = x + residual  # torch's add in the dtype: the residual the op must leave
    ref_out, ref_residual = reference.fused_add_layer_norm(
        x.double(), residual.double(), w.double(), as_double(bias), 1e-5)
    ops.fused_add_layer_norm(x, residual, w, bias, 1e-5)
    assert torch.equal(residual, torch_sum)
    assert_close(residual, ref_residual, dtype)
    assert_close(x, ref_out, dtype)
    # The statistics are those of the rounded sum.
    assert_close(x, reference.layer_norm(torch_sum.double(), w.double(), as_double(bias), 1e-5),
                 dtype)


def assert_matches_torch_layer_norm(out, ref, bias):
    """float32 within a few ulps; 16-bit: equal bits but for rare 1-ulp flips
    where torch's float32 intermediates (another summation order, x * rstd -
    mean * rstd) land a value on the other side of a rounding boundary
    (measured on the CPU: ~5e-4 of the elements in float16, ~7e-5 in
    bfloat16). An ulp is counted at the scale of the bias too: an output
    near zero is a difference of two larger terms."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
        return
    differ = out != ref
    assert differ.float().mean().item() <= 2e-3, f"{differ.sum().item()} of {out.numel()} differ"
    one_ulp = torch.finfo(out.dtype).eps * (ref.abs().float() + bias.abs().float())
    assert ((out.float() - ref.float()).abs() <= one_ulp)[differ].all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1280, 1281, 4096])
def test_layer_norm_rounds_like_torch(device, dtype, hidden):
    x, w, bias = layer_norm_inputs((256, hidden), dtype, device, True)
    residual = (3 * torch.randn(256, hidden, device=device)).to(dtype)
    assert_matches_torch_layer_norm(ops.layer_norm(x, w, bias, 1e-6),
                                    F.layer_norm(x, (hidden,), w, bias, 1e-6), bias)
    torch_sum = x + residual
    ops.fused_add_layer_norm(x, residual, w, bias, 1e-6)
    assert_matches_torch_layer_norm(x, F.layer_norm(torch_sum, (hidden,), w, bias, 1e-6), bias)


def test_layer_norm_out_may_alias_input():
    x, w, bias = layer_norm_inputs((5, 256), torch.bfloat16, "cpu", True)
    expected = ops.layer_norm(x, w, bias, 1e-6)
    ops.layer_norm(x, w, bias, 1e-6, out=x)
    assert torch.equal(x, expected)


# ---- rotary_embedding / mrope -------------------------------------------------

# (num_tokens, num_heads, num_kv_heads, head_size, rotary_dim)
ROTARY_SHAPES = [
    (0, 4, 2, 64, 64),
    (1, 2, 1, 64, 64),
    (9, 28, 4, 128, 128),
    (17, 16, 16, 80, 80),
    (6, 8, 2, 128, 64),  # partial rotary: the last 64 of each head stay
    (5, 3, 1, 96, 32),
    # 64 tokens or more take the CUDA rows kernel (vectors of several pairs):
    (100, 16, 16, 80, 80),  # Qwen2-VL's vision heads
    (70, 8, 2, 128, 64),
    (65, 3, 1, 10, 6),  # 3 pairs a head: no vector fits, the pair kernel runs
]


def heads_of(x, head_size):
    return math.prod(x.shape[1:]) // head_size


def make_cache(max_position, rotary_dim, dtype, device, base=10000.0):
    return cos_sin_cache(default_inv_freq(rotary_dim, base, device), max_position).to(dtype)


def make_qk(shape, dtype, device, layout):
    """query/key as 2D, 3D or strided views of one fused qkv projection."""
    tokens, heads, kv_heads, head_size, _ = shape
    if layout == "qkv_view":
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, device=device).to(dtype)
        q, k, _ = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
        return q, k
    q = torch.randn(tokens, heads * head_size, device=device).to(dtype)
    k = torch.randn(tokens, kv_heads * head_size, device=device).to(dtype)
    if layout == "3d":
        return q.view(tokens, heads, head_size), k.view(tokens, kv_heads, head_size)
    return q, k


@pytest.mark.parametrize("shape", ROTARY_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("layout", ["2d", "3d", "qkv_view"])
def test_rotary_embedding_matches_reference(device, shape, dtype, is_neox, layout):
    head_size, rotary_dim = shape[3], shape[4]
    cache_dtype = torch.float32 if layout != "3d" else dtype
    cache = make_cache(4096, rotary_dim, cache_dtype, device)
    positions = torch.randint(0, 4096, (shape[0],), device=device)
    q, k = make_qk(shape, dtype, device, layout)
    ref_q, ref_k = reference.rotary_embedding(
        positions, q.double(), k.double(), head_size, cache.double(), is_neox
    )
    ops.rotary_embedding(positions, q, k, head_size, cache, is_neox)
    assert_close(q, ref_q, dtype)
    assert_close(k, ref_k, dtype)
    # The part of each head past rotary_dim is untouched, exactly.
    tail = lambda t: t.reshape(t.shape[0], heads_of(t, head_size), head_size)[..., rotary_dim:]  # noqa: E731
    assert torch.equal(tail(q).double(), tail(ref_q))


def test_rotary_leaves_value_of_fused_qkv_untouched():
    tokens, heads, kv_heads, head_size = 7, 4, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size)
    before = qkv.clone()
    q, k, v = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
    cache = make_cache(16, head_size, torch.float32, "cpu")
    ops.rotary_embedding(torch.arange(tokens), q, k, head_size, cache)
    assert torch.equal(v, before[:, (heads + kv_heads) * head_size :])
    assert not torch.equal(q[1:], before[1:, : heads * head_size])  # position 0 is the identity


def test_rotary_on_padded_heads(device):
    """3D views whose heads are further apart than head_size (a slice of wider rows)."""
    wide_q = torch.randn(6, 4, 96, device=device)
    wide_k = torch.randn(6, 2, 96, device=device)
    q, k = wide_q[..., :64], wide_k[..., :64]
    padding = wide_q[..., 64:].clone()
    cache = make_cache(64, 64, torch.float32, device)
    pos = torch.randint(0, 64, (6,), device=device)
    ref_q, ref_k = reference.rotary_embedding(pos, q.double(), k.double(), 64, cache.double(), False)
    ops.rotary_embedding(pos, q, k, 64, cache, is_neox=False)
    assert_close(q, ref_q, torch.float32)
    assert_close(k, ref_k, torch.float32)
    assert torch.equal(wide_q[..., 64:], padding)


MROPE_CASES = [  # (num_tokens, heads, kv_heads, head_size, mrope_section)
    (0, 4, 2, 128, [16, 24, 24]),
    (1, 4, 2, 128, [16, 24, 24]),
    (23, 28, 4, 128, [16, 24, 24]),
    (11, 3, 1, 16, [2, 3, 3]),
    (8, 2, 2, 64, [8, 0, 12, 4, 4, 4]),  # longer lists cycle through t, h, w
    (150, 16, 16, 80, [20, 20]),  # the vision towers' 2-D rotary (CUDA rows kernel)
    (96, 28, 4, 128, [16, 24, 24]),
    (80, 4, 2, 64, [5, 9, 18]),  # sections that split a vector of frequencies
]


def mrope_positions(num_tokens, device):
    return torch.randint(0, 2048, (3, num_tokens), device=device)


@pytest.mark.parametrize("case", MROPE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_mrope_matches_reference(device, case, dtype, is_neox):
    tokens, heads, kv_heads, head_size, section = case
    cache = make_cache(2048, head_size, torch.float32, device)
    positions = mrope_positions(tokens, device)
    q, k = make_qk((tokens, heads, kv_heads, head_size, head_size), dtype, device, "qkv_view")
    ref_q, ref_k = reference.mrope(
        positions, q.double(), k.double(), head_size, cache.double(), section, is_neox
    )
    ops.mrope(positions, q, k, head_size, cache, section, is_neox)
    assert_close(q, ref_q, dtype)
    assert_close(k, ref_k, dtype)


def test_mrope_positions_may_be_a_slice_of_a_wider_buffer(device):
    buffer = torch.randint(0, 256, (3, 40), device=device)
    positions = buffer[:, :9]  # row stride 40, as an engine's persistent buffer
    q, k = make_qk((9, 4, 2, 64, 64), torch.float32, device, "2d")
    cache = make_cache(256, 64, torch.float32, device)
    ref_q, ref_k = reference.mrope(positions, q.double(), k.double(), 64, cache.double(), [8, 12, 12])
    ops.mrope(positions, q, k, 64, cache, [8, 12, 12])
    assert_close(q, ref_q, torch.float32)
    assert_close(k, ref_k, torch.float32)


def test_mrope_with_equal_rows_is_rotary_embedding(device):
    q, k = make_qk((13, 8, 2, 128, 128), torch.bfloat16, device, "2d")
    cache = make_cache(512, 128, torch.bfloat16, device)
    pos = torch.randint(0, 512, (13,), device=device)
    q2, k2 = q.clone(), k.clone()
    ops.mrope(pos.expand(3, -1), q, k, 128, cache, [16, 24, 24])
    ops.rotary_embedding(pos, q2, k2, 128, cache)
    assert torch.equal(q, q2) and torch.equal(k, k2)


def transformers_mrope(q, k, positions, head_size, section, theta):
    """transformers' Qwen2-VL text rotary embedding applied to q, k [T, H, D]."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

    config = Qwen2VLTextConfig(
        hidden_size=head_size * 4,
        num_attention_heads=4,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section},
    )
    rotary = qwen2_vl.Qwen2VLRotaryEmbedding(config).to(q.device)
    cos, sin = rotary(q, positions[:, None, :])  # [1, T, D]
    q_hf, k_hf = qwen2_vl.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1)


@pytest.mark.parametrize("head_size,section", [(128, [16, 24, 24]), (16, [2, 3, 3])])
def test_mrope_matches_transformers_qwen2_vl(device, head_size, section):
    theta, tokens = 1000000.0, 37
    positions = mrope_positions(tokens, device)
    q = torch.randn(tokens, 4, head_size, device=device)
    k = torch.randn(tokens, 2, head_size, device=device)
    q_hf, k_hf = transformers_mrope(q, k, positions, head_size, section, theta)
    cache = make_cache(4096, head_size, torch.float32, device, base=theta)
    ops.mrope(positions, q, k, head_size, cache, section, is_neox=True)
    assert_close(q, q_hf, torch.float32)
    assert_close(k, k_hf, torch.float32)


# ---- merge_multimodal_embeddings ------------------------------------------------


@pytest.mark.parametrize("num_tokens,num_mm,hidden", [(0, 0, 64), (5, 0, 64), (9, 4, 3584), (40, 40, 100)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_multimodal_embeddings(device, num_tokens, num_mm, hidden, dtype):
    inputs = poisoned(num_tokens, hidden, dtype=dtype, device=device)
    mm = torch.randn(num_mm, hidden, device=device).to(dtype)
    positions = torch.randperm(num_tokens, device=device)[:num_mm]
    ops.merge_multimodal_embeddings(inputs, mm, positions)
    assert torch.equal(inputs[positions], mm)
    untouched = torch.ones(num_tokens, dtype=torch.bool, device=device)
    untouched[positions] = False
    assert inputs[untouched].isnan().all()  # rows outside positions keep their poison


def test_merge_by_placeholder_token(device):
    input_ids = torch.tensor([1, 7, 7, 2, 7, 3], device=device)
    inputs = torch.zeros(6, 16, device=device)
    mm = torch.randn(3, 16, device=device)
    ops.merge_multimodal_embeddings(inputs, mm, input_ids=input_ids, placeholder_token_id=7)
    expected = reference.merge_multimodal_embeddings(torch.zeros(6, 16, device=device), mm,
                                                     torch.tensor([1, 2, 4], device=device))
    assert torch.equal(inputs, expected)
    with pytest.raises(ValueError, match="3 placeholder tokens .* mm_embeds has 2 rows"):
        ops.merge_multimodal_embeddings(inputs, mm[:2], input_ids=input_ids, placeholder_token_id=7)


def test_merge_into_strided_rows():
    inputs = torch.zeros(6, 32)[:, :16]
    mm = torch.randn(2, 16)
    ops.merge_multimodal_embeddings(inputs, mm, torch.tensor([5, 0]))
    assert torch.equal(inputs[5], mm[0]) and torch.equal(inputs[0], mm[1])
    assert inputs[1:5].eq(0).all()


# ---- opcheck and bad inputs --------------------------------------------------------


def test_opcheck(device):
    x = torch.randn(5, 64, device=device)
    w = torch.randn(64, device=device)
    torch.library.opcheck(torch.ops.pyvlm.rms_norm.default, (torch.empty_like(x), x, w, 1e-6))
    torch.library.opcheck(torch.ops.pyvlm.fused_add_rms_norm.default, (x.clone(), x.clone(), w, 1e-6))
    for bias in (torch.randn(64, device=device), None):
        torch.library.opcheck(torch.ops.pyvlm.layer_norm.default, (torch.empty_like(x), x, w, bias, 1e-6))
        torch.library.opcheck(torch.ops.pyvlm.fused_add_layer_norm.default,
                              (x.clone(), x.clone(), w, bias, 1e-6))
    cache = make_cache(32, 64, torch.float32, device)
    q, k = torch.randn(5, 2 * 64, device=device), torch.randn(5, 64, device=device)
    pos = torch.randint(0, 32, (5,), device=device)
    torch.library.opcheck(torch.ops.pyvlm.rotary_embedding.default, (pos, q, k, 64, cache, True))
    torch.library.opcheck(torch.ops.pyvlm.mrope.default,
                          (torch.randint(0, 32, (3, 5), device=device), q, k, 64, cache, [8, 12, 12], True))
    torch.library.opcheck(torch.ops.pyvlm.merge_multimodal_embeddings.default,
                          (x.clone(), torch.randn(2, 64, device=device), torch.tensor([3, 1], device=device)))


def test_norm_bad_inputs_raise_naming_argument():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="weight must have shape \\[8\\]"):
        ops.rms_norm(x, torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="weight must have dtype"):
        ops.rms_norm(x, w.half(), 1e-6)
    with pytest.raises(ValueError, match="out must have shape"):
        ops.rms_norm(x, w, 1e-6, out=torch.empty(4, 9))
    with pytest.raises(ValueError, match="input must be contiguous"):
        ops.rms_norm(torch.randn(8, 4).t(), torch.randn(4), 1e-6)
    with pytest.raises(ValueError, match="input must be float32"):
        ops.rms_norm(torch.ones(4, 8, dtype=torch.int32), w, 1e-6)
    with pytest.raises(ValueError, match="epsilon must be"):
        ops.rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.fused_add_rms_norm(x, torch.randn(4, 9), w, 1e-6)
    with pytest.raises(ValueError, match="residual must have dtype"):
        ops.fused_add_rms_norm(x, torch.randn(4, 8).half(), w, 1e-6)
    with pytest.raises(ValueError, match="residual must not be the same tensor"):
        ops.fused_add_rms_norm(x, x, w, 1e-6)


def test_layer_norm_bad_inputs_raise_naming_argument():
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    with pytest.raises(ValueError, match="bias must have shape \\[8\\]"):
        ops.layer_norm(x, w, torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="bias must have dtype"):
        ops.layer_norm(x, w, b.half(), 1e-6)
    with pytest.raises(ValueError, match="bias must be contiguous"):
        ops.layer_norm(x, w, torch.randn(16)[::2], 1e-6)
    with pytest.raises(ValueError, match="weight must have shape \\[8\\]"):
        ops.layer_norm(x, torch.randn(7), b, 1e-6)
    with pytest.raises(ValueError, match="out must have shape"):
        ops.layer_norm(x, w, b, 1e-6, out=torch.empty(4, 9))
    with pytest.raises(ValueError, match="input must be contiguous"):
        ops.layer_norm(torch.randn(8, 4).t(), torch.randn(4), None, 1e-6)
    with pytest.raises(ValueError, match="epsilon must be"):
        ops.layer_norm(x, w, b, float("nan"))
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.fused_add_layer_norm(x, torch.randn(4, 9), w, b, 1e-6)
    with pytest.raises(ValueError, match="residual must not be the same tensor"):
        ops.fused_add_layer_norm(x, x, w, b, 1e-6)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.fused_add_layer_norm(x, x.clone(), w, torch.randn(9), 1e-6)


def test_rotary_bad_inputs_raise_naming_argument():
    cache = make_cache(16, 64, torch.float32, "cpu")
    q, k, pos = torch.randn(3, 128), torch.randn(3, 64), torch.tensor([0, 5, 15])
    with pytest.raises(IndexError, match="positions values must be in \\[0, 16\\)"):
        ops.rotary_embedding(torch.tensor([0, 16, 1]), q, k, 64, cache)
    with pytest.raises(IndexError, match="positions"):
        ops.rotary_embedding(torch.tensor([0, -1, 1]), q, k, 64, cache)
    with pytest.raises(ValueError, match="positions must have dtype"):
        ops.rotary_embedding(pos.int(), q, k, 64, cache)
    with pytest.raises(ValueError, match="positions.size\\(0\\) must be 3"):
        ops.rotary_embedding(pos[:2], q, k, 64, cache)
    with pytest.raises(ValueError, match="query.size\\(1\\) must be a multiple of head_size"):
        ops.rotary_embedding(pos, torch.randn(3, 100), k, 64, cache)
    with pytest.raises(ValueError, match="key.size\\(0\\) must be 3"):
        ops.rotary_embedding(pos, q, torch.randn(2, 64), 64, cache)
    with pytest.raises(ValueError, match="key must have dtype"):
        ops.rotary_embedding(pos, q, k.half(), 64, cache)
    with pytest.raises(ValueError, match="query must have a contiguous last dimension"):
        ops.rotary_embedding(pos, torch.randn(3, 2, 64).transpose(1, 2), k, 64, cache)
    with pytest.raises(ValueError, match="rotary_dim"):
        ops.rotary_embedding(pos, q, k, 32, cache)
    with pytest.raises(ValueError, match="cos_sin_cache must be float32 or query's dtype"):
        ops.rotary_embedding(pos, q.half(), k.half(), 64, cache.bfloat16())
    with pytest.raises(ValueError, match="head_size must be positive"):
        ops.rotary_embedding(pos, q, k, 0, cache)


def test_mrope_bad_inputs_raise_naming_argument():
    cache = make_cache(16, 64, torch.float32, "cpu")
    q, k, pos = torch.randn(3, 128), torch.randn(3, 64), torch.randint(0, 16, (3, 3))
    with pytest.raises(ValueError, match="mrope_section must sum to rotary_dim / 2 = 32"):
        ops.mrope(pos, q, k, 64, cache, [8, 8, 8])
    with pytest.raises(ValueError, match="mrope_section entries must be non-negative"):
        ops.mrope(pos, q, k, 64, cache, [40, -4, -4])
    with pytest.raises(ValueError, match="positions.size\\(0\\) must be 3"):
        ops.mrope(pos[:2], q, k, 64, cache, [8, 12, 12])
    with pytest.raises(ValueError, match="positions must have 2 dimensions"):
        ops.mrope(pos[0], q, k, 64, cache, [8, 12, 12])
    with pytest.raises(IndexError, match="positions values must be in"):
        ops.mrope(pos + 16, q, k, 64, cache, [8, 12, 12])


def test_merge_bad_inputs_raise_naming_argument():
    inputs, mm = torch.zeros(4, 8), torch.randn(2, 8)
    with pytest.raises(IndexError, match="positions values must be in \\[0, 4\\)"):
        ops.merge_multimodal_embeddings(inputs, mm, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="positions.size\\(0\\) must be 2"):
        ops.merge_multimodal_embeddings(inputs, mm, torch.tensor([1]))
    with pytest.raises(ValueError, match="mm_embeds must have dtype"):
        ops.merge_multimodal_embeddings(inputs, mm.half(), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="mm_embeds must have 8 columns"):
        ops.merge_multimodal_embeddings(inputs, torch.randn(2, 7), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="positions must have dtype"):
        ops.merge_multimodal_embeddings(inputs, mm, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="give either positions"):
        ops.merge_multimodal_embeddings(inputs, mm)
    assert inputs.eq(0).all()


# ---- CUDA vs CPU ------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [100, 3584, 8192])
def test_cuda_norms_match_cpu(dtype, hidden):
    x = (3 * torch.randn(300, hidden)).to(dtype)
    residual = torch.randn(300, hidden).to(dtype)
    w = random_weight(hidden, dtype, "cpu")
    assert_close(ops.rms_norm(x.cuda(), w.cuda(), 1e-6), ops.rms_norm(x, w, 1e-6).double(), dtype)
    gx, gr = x.cuda(), residual.cuda()
    ops.fused_add_rms_norm(gx, gr, w.cuda(), 1e-6)
    ops.fused_add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(gr.cpu(), residual)  # one rounded add: identical on both devices
    assert_close(gx, x.double(), dtype)


@pytest.mark.cuda
def test_cuda_norm_unaligned_rows_use_the_scalar_path():
    x = torch.randn(3 * 4096 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(3, 4096)
    w = random_weight(4096, torch.bfloat16, "cuda")
    assert_close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x.double(), w.double(), 1e-6), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [1, 2, 4])
@pytest.mark.parametrize("is_neox", [True, False])
def test_cuda_rotary_of_many_tokens_on_misaligned_heads(offset, is_neox):
    """Heads that start off a 16-byte boundary take narrower vectors (or
    single pairs) in the rows kernel, never a misaligned access."""
    tokens, heads, head_size = 96, 4, 64
    buffer = torch.randn(tokens * heads * head_size + offset, device="cuda").to(torch.bfloat16)
    q = buffer[offset:].view(tokens, heads * head_size)
    k = torch.randn(tokens, heads * head_size, device="cuda").to(torch.bfloat16)
    cache = make_cache(512, head_size, torch.float32, "cuda")
    pos = torch.randint(0, 512, (tokens,), device="cuda")
    ref_q, ref_k = reference.rotary_embedding(pos, q.double(), k.double(), head_size,
                                              cache.double(), is_neox)
    ops.rotary_embedding(pos, q, k, head_size, cache, is_neox)
    assert_close(q, ref_q, torch.bfloat16)
    assert_close(k, ref_k, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [100, 1280, 1281, 8192, 9001, 70000])
def test_cuda_layer_norms_match_cpu(dtype, hidden, has_bias):
    x, w, bias = layer_norm_inputs((300, hidden), dtype, "cpu", has_bias)
    residual = torch.randn(300, hidden).to(dtype)
    gbias = None if bias is None else bias.cuda()
    out = poisoned(300, hidden, dtype=dtype, device="cuda")
    ops.layer_norm(x.cuda(), w.cuda(), gbias, 1e-6, out=out)
    assert_close(out, ops.layer_norm(x, w, bias, 1e-6).double(), dtype)
    gx, gr = x.cuda(), residual.cuda()
    ops.fused_add_layer_norm(gx, gr, w.cuda(), gbias, 1e-6)
    ops.fused_add_layer_norm(x, residual, w, bias, 1e-6)
    assert torch.equal(gr.cpu(), residual)  # one rounded add: identical on both devices
    assert_close(gx, x.double(), dtype)


@pytest.mark.cuda
def test_cuda_layer_norm_unaligned_rows_use_the_scalar_path():
    x = torch.randn(3 * 1280 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(3, 1280)
    r = torch.randn(3 * 1280 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(3, 1280)
    w, bias = random_weight(1280, torch.bfloat16, "cuda"), torch.randn(1280, device="cuda").bfloat16()
    assert_close(ops.layer_norm(x, w, bias, 1e-6),
                 reference.layer_norm(x.double(), w.double(), bias.double(), 1e-6), torch.bfloat16)
    torch_sum = x + r
    ops.fused_add_layer_norm(x, r, w, bias, 1e-6)
    assert torch.equal(r, torch_sum)
    assert_close(x, reference.layer_norm(torch_sum.double(), w.double(), bias.double(), 1e-6),
                 torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_rotary_and_mrope_match_cpu(is_neox, dtype):
    shape = (257, 28, 4, 128, 128)
    q, k = make_qk(shape, dtype, "cpu", "qkv_view")
    cache = make_cache(4096, 128, torch.float32, "cpu")
    pos = torch.randint(0, 4096, (257,))
    gq, gk = q.cuda(), k.cuda()
    ops.rotary_embedding(pos.cuda(), gq, gk, 128, cache.cuda(), is_neox)
    ops.rotary_embedding(pos, q, k, 128, cache, is_neox)
    assert_close(gq, q.double(), dtype)
    assert_close(gk, k.double(), dtype)
    mpos = torch.randint(0, 4096, (3, 257))
    ops.mrope(mpos.cuda(), gq, gk, 128, cache.cuda(), [16, 24, 24], is_neox)
    ops.mrope(mpos, q, k, 128, cache, [16, 24, 24], is_neox)
    assert_close(gq, q.double(), dtype)
    assert_close(gk, k.double(), dtype)


SKIPPED_INDICES_SCRIPT = """
import torch
from pyvlm import ops
from pyvlm.layers.rotary import cos_sin_cache, default_inv_freq
cache = cos_sin_cache(default_inv_freq(64, 10000.0, "cuda"), 8)
q = torch.randn(2, 64, device="cuda"); k = q.clone(); q0 = q.clone()
positions = torch.tensor([1, 99], device="cuda")
x = torch.zeros(4, 8, device="cuda")
ones, rows = torch.ones(2, 8, device="cuda"), torch.tensor([1, 9], device="cuda")
with ops.index_checks(False):
    ops.rotary_embedding(positions, q, k, 64, cache)
    torch.cuda.synchronize()
    assert torch.equal(q[1], q0[1]) and not torch.equal(q[0], q0[0])
    ops.merge_multimodal_embeddings(x, ones, rows)
    torch.cuda.synchronize()
    assert x.sum().item() == 8
    many = torch.randn(100, 64, device="cuda"); many0 = many.clone()  # the rows kernel
    bad = torch.arange(100, device="cuda") % 8; bad[50] = 99
    ops.rotary_embedding(bad, many, many.clone(), 64, cache)
    torch.cuda.synchronize()
    assert torch.equal(many[50], many0[50]) and not torch.equal(many[51], many0[51])
# Out of the scope this thread checks again, before any launch.
assert_checked_again((lambda: ops.rotary_embedding(positions, q, k, 64, cache),
                      lambda: ops.merge_multimodal_embeddings(x, ones, rows)),
                     IndexError, "positions values must be in")
print("ok")
"""


@pytest.mark.cuda
def test_cuda_kernels_skip_invalid_indices_without_checks():
    """With index checks off, rows with bad positions are left alone (in a
    child process: a fault would poison this one's CUDA context)."""
    result = run_cuda_child(SKIPPED_INDICES_SCRIPT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_rms_norm_rounds_like_transformers_on_cuda(dtype):
    x = (3 * torch.randn(512, 3584, device="cuda")).to(dtype)
    w = random_weight(3584, dtype, "cuda")
    assert_matches_hf_bits(ops.rms_norm(x, w, 1e-6), hf_rms_norm(x, w, 1e-6))
