"""RMS norms, LayerNorms and rotary embeddings against the eager torch code a
user would write (Hugging Face's module formulas, torch's F.layer_norm)."""

import torch
from torch.nn import functional as F

from pyvlm import ops
from pyvlm.layers.rotary import cos_sin_cache, default_inv_freq
from pyvlm.ops.reference.layers import mrope_cos_sin

from .harness import Row, time_us


# Norms and rotaries take microseconds, less than their host launch: timed
# as 20 back-to-back calls per sample (both sides alike), index checks off
# as in the engine's steps (the checks read positions back to the host).
CALLS_PER_SAMPLE = 20


def device_us(fn, device) -> float:
    return time_us(fn, device, calls_per_sample=CALLS_PER_SAMPLE)


def hf_rms_norm(x, weight, eps):
    """LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def eager_rotary(q, k, cos, sin, head_size):
    """HF's apply_rotary_pos_emb on [T, H * D] views; cos/sin [T, D / 2]."""
    cos = torch.cat((cos, cos), dim=-1)[:, None, :].to(q.dtype)
    sin = torch.cat((sin, sin), dim=-1)[:, None, :].to(q.dtype)
    q = q.view(q.shape[0], -1, head_size)
    k = k.view(k.shape[0], -1, head_size)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def norm_rows(device, tokens, hidden, dtype):
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    w = torch.randn(hidden, device=device, dtype=dtype)
    out = torch.empty_like(x)
    case = f"t={tokens} h={hidden} {str(dtype)[6:]}"
    nbytes = x.numel() * x.element_size()
    ours = device_us(lambda: ops.rms_norm(x, w, 1e-6, out=out), device)
    base = device_us(lambda: hf_rms_norm(x, w, 1e-6), device)
    rows = [Row("rms_norm", case, device, ours, "HF LlamaRMSNorm formula", base, 2 * nbytes)]

    def eager_fused():
        r = x + residual
        return hf_rms_norm(r, w, 1e-6), r

    ours = device_us(lambda: ops.fused_add_rms_norm(x, residual, w, 1e-6), device)
    base = device_us(eager_fused, device)
    rows.append(Row("fused_add_rms_norm", case, device, ours, "x + r, HF RMSNorm", base, 4 * nbytes))
    return rows


def layer_norm_rows(device, tokens, hidden, dtype):
    """The vision towers' norms (Qwen2-VL: 1280 wide, a row per patch)."""
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    w, b = torch.randn(hidden, device=device, dtype=dtype), torch.randn(hidden, device=device, dtype=dtype)
    out = torch.empty_like(x)
    case = f"t={tokens} h={hidden} {str(dtype)[6:]}"
    nbytes = x.numel() * x.element_size()
    ours = device_us(lambda: ops.layer_norm(x, w, b, 1e-6, out=out), device)
    base = device_us(lambda: F.layer_norm(x, (hidden,), w, b, 1e-6), device)
    rows = [Row("layer_norm", case, device, ours, "F.layer_norm", base, 2 * nbytes)]

    def eager_fused():
        r = residual + x
        return F.layer_norm(r, (hidden,), w, b, 1e-6), r

    ours = device_us(lambda: ops.fused_add_layer_norm(x, residual, w, b, 1e-6), device)
    base = device_us(eager_fused, device)
    rows.append(Row("fused_add_layer_norm", case, device, ours, "r + x, F.layer_norm", base,
                    4 * nbytes))
    return rows


def rotary_rows(device, tokens, dtype, heads=28, kv_heads=4, head_size=128, section=(16, 24, 24)):
    """rotary_embedding and mrope over q/k views of one fused qkv projection;
    section: mrope's (Qwen2-VL's decoder: 16/24/24; its vision tower's 2-D
    rotary: two sections of head_size / 4)."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, device=device, dtype=dtype)
    q, k, _ = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
    cache = cos_sin_cache(default_inv_freq(head_size, 1e6, device), 32768)
    pos = torch.randint(0, 32768, (tokens,), device=device)
    mpos = torch.randint(0, 32768, (3, tokens), device=device)
    half = head_size // 2
    case = f"t={tokens} h={heads}/{kv_heads} d={head_size} {str(dtype)[6:]}"
    qk_bytes = 2 * tokens * (heads + kv_heads) * head_size * qkv.element_size()
    ours = device_us(lambda: ops.rotary_embedding(pos, q, k, head_size, cache), device)
    base = device_us(lambda: eager_rotary(q, k, cache[pos, :half], cache[pos, half:], head_size), device)
    rows = [Row("rotary_embedding", case, device, ours, "HF rotate_half on gathered cos/sin", base,
                qk_bytes + tokens * (8 + head_size * 4))]

    def eager_mrope():
        cos, sin = mrope_cos_sin(mpos, cache, list(section))
        return eager_rotary(q, k, cos, sin, head_size)

    ours = device_us(lambda: ops.mrope(mpos, q, k, head_size, cache, list(section)), device)
    base = device_us(eager_mrope, device)
    rows.append(Row("mrope", f"{case} sections {'/'.join(map(str, section))}", device, ours,
                    "HF mrope recompose + rotate_half", base,
                    qk_bytes + tokens * 3 * (8 + head_size * 4)))
    return rows


# (tokens, heads, kv_heads, head_size, mrope sections) on the GPU: a decode
# batch below and at the rows kernel's threshold (64), a Qwen2-VL-7B image
# prompt's prefill, its tower's patches (16 heads of 80, q and k alike), and
# long prefills.
CUDA_ROTARY_CASES = [
    (32, 28, 4, 128, (16, 24, 24)),
    (64, 28, 4, 128, (16, 24, 24)),
    (411, 28, 4, 128, (16, 24, 24)),
    (1564, 16, 16, 80, (20, 20)),
    (6256, 16, 16, 80, (20, 20)),
    (4096, 28, 4, 128, (16, 24, 24)),
    (8192, 28, 4, 128, (16, 24, 24)),
]


def run(device: str):
    if device.startswith("cuda"):
        return cuda_rows(device)
    return (norm_rows(device, 256, 3584, torch.float32) + norm_rows(device, 256, 3584, torch.bfloat16)
            + layer_norm_rows(device, 256, 1280, torch.float32)
            + layer_norm_rows(device, 256, 1280, torch.bfloat16)
            + rotary_rows(device, 256, torch.float32) + rotary_rows(device, 256, torch.bfloat16))


def cuda_rows(device: str):
    rows = []
    with ops.index_checks(False):
        for tokens, hidden in [(4096, 3584), (8192, 4096)]:
            rows += norm_rows(device, tokens, hidden, torch.bfloat16)
        for tokens, hidden in [(1564, 1280), (6256, 1280), (4096, 1152)]:
            rows += layer_norm_rows(device, tokens, hidden, torch.bfloat16)
        for tokens, heads, kv_heads, head_size, section in CUDA_ROTARY_CASES:
            rows += rotary_rows(device, tokens, torch.bfloat16, heads, kv_heads, head_size, section)
    return rows
