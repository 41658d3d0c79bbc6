"""paged_attention_prefill and varlen_attention against torch SDPA.

Prefill baseline: gather each sequence's pages, then SDPA with a causal mask
(is_causal when there is no prefix, else a bottom-right aligned attn_mask) and
enable_gqa. Varlen baselines: SDPA per image in a loop, and one SDPA call over
all images with a block-diagonal mask. On CUDA both also run against
torch's bundled FlashAttention, the path the engine takes for 16-bit inputs:
varlen_attn for the towers (and, for segments of one length, cuDNN's
attention as a dense batch, packed_attention's equal_lengths path); for
prefill each sequence's keys gathered from the cache (PrefillKeys), then
causal FlashAttention.
"""

import math

import torch
import torch.nn.functional as F

from pyvlm import ops
from pyvlm.layers import packed_attention

from .harness import Row, time_us


def _torch_varlen_attn():
    """torch's FlashAttention varlen entry point, or None where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _flash_prefill_row(c, prefix, new, case, ours, nbytes, device):
    """The engine's CUDA 16-bit path: each sequence's keys gathered from the
    cache (PrefillKeys), then torch's FlashAttention, causal bottom-right."""
    from pyvlm.layers.attention import AttentionMetadata, PrefillKeys
    from pyvlm.layers.packed_attention import causal_attention, takes_torch_flash

    q, kc, vc = c["query"], c["key_cache"], c["value_cache"]
    num_seqs, page_size = c["block_tables"].shape[0], kc.shape[1]
    if not takes_torch_flash(q, kc[0], vc[0]):
        return []
    attn = AttentionMetadata(False, torch.zeros(0, device=device), c["block_tables"],
                             cu_seqlens_q=c["cu_seqlens_q"], prefix_lens=c["prefix_lens"],
                             max_seqlen_q=new, page_size=page_size,
                             num_prefill_keys=num_seqs * (prefix + new),
                             max_seqlen_k=prefix + new)

    def flash():
        if not prefix:  # a fresh prompt: the engine attends over its own rows
            k = kc.flatten(0, 1)[: num_seqs * new]
            return causal_attention(q, k, vc.flatten(0, 1)[: num_seqs * new], c["cu_seqlens_q"],
                                    c["cu_seqlens_q"], new, new, c["scale"])
        keys = PrefillKeys(attn)  # built once per step in the engine, timed here with the layer
        return causal_attention(q, keys.gather(kc), keys.gather(vc), c["cu_seqlens_q"],
                                keys.cu_seqlens_k, new, prefix + new, c["scale"])
    base = time_us(flash, device)
    return [Row("paged_attention_prefill", case, device, ours,
                "engine path: gather + torch flash", base, nbytes)]


def _paged_inputs(num_seqs, prefix, new, heads, kv_heads, head_dim, page_size, dtype, device):
    pages_per_seq = math.ceil((prefix + new) / page_size)
    num_pages = num_seqs * pages_per_seq
    shape = (num_pages, page_size, kv_heads, head_dim)
    return dict(
        query=torch.randn(num_seqs * new, heads, head_dim, device=device, dtype=dtype),
        key_cache=torch.randn(shape, device=device, dtype=dtype),
        value_cache=torch.randn(shape, device=device, dtype=dtype),
        block_tables=torch.randperm(num_pages, device=device).int().view(num_seqs, -1),
        cu_seqlens_q=torch.arange(num_seqs + 1, device=device, dtype=torch.int32) * new,
        prefix_lens=torch.full((num_seqs,), prefix, device=device, dtype=torch.int32),
        max_seqlen_q=new,
        scale=head_dim ** -0.5,
    )


def _sdpa_prefill(c, prefix, new):
    """What a user would write: gather pages per sequence, then causal SDPA."""
    outs = []
    mask = None
    if prefix:
        mask = torch.ones(new, prefix + new, dtype=torch.bool, device=c["query"].device)
        mask = mask.tril(diagonal=prefix)
    for s in range(c["block_tables"].shape[0]):
        pages = c["block_tables"][s].long()
        k = c["key_cache"][pages].flatten(0, 1)[: prefix + new].transpose(0, 1)
        v = c["value_cache"][pages].flatten(0, 1)[: prefix + new].transpose(0, 1)
        q = c["query"][s * new:(s + 1) * new].transpose(0, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=c["scale"], enable_gqa=True)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def _prefill_rows(device, dtype):
    cuda = device.startswith("cuda")
    num_seqs, new, heads, kv_heads, head_dim = (4, 2048, 28, 4, 128) if cuda else (2, 256, 8, 2, 64)
    rows = []
    for prefix in (0, new // 2):
        c = _paged_inputs(num_seqs, prefix, new, heads, kv_heads, head_dim, 16, dtype, device)
        out = torch.empty_like(c["query"])
        ours = time_us(lambda: ops.paged_attention_prefill(**c, out=out), device)
        base = time_us(lambda: _sdpa_prefill(c, prefix, new), device)
        elem = c["query"].element_size()
        nbytes = elem * (2 * c["query"].numel() + 2 * num_seqs * (prefix + new) * kv_heads * head_dim)
        case = f"b={num_seqs} new={new} prefix={prefix} h={heads}/{kv_heads} d={head_dim} {str(dtype)[6:]}"
        rows.append(Row("paged_attention_prefill", case, device, ours,
                        "gather + SDPA causal (enable_gqa)", base, nbytes))
        if cuda:
            rows += _flash_prefill_row(c, prefix, new, case, ours, nbytes, device)
    return rows


def _varlen_rows(device, dtype):
    cuda = device.startswith("cuda")
    rows = []
    # 8 x 1024: a batch of tower tiles; 1 x 1564: Qwen2-VL's tower on one 644x476 photo;
    # 1 x 6432: one Llama-3.2-Vision image (4 tiles of 1,608 rows, attended jointly).
    for images, tokens in ((8, 1024), (1, 1564), (1, 6432)) if cuda else ((4, 256),):
        rows += _varlen_case(images, tokens, 16, 80, device, dtype)
    return rows


def _varlen_case(images, tokens, heads, head_dim, device, dtype):
    total = images * tokens
    qkv = torch.randn(total, 3, heads, head_dim, device=device, dtype=dtype)
    q, k, v = qkv.unbind(1)
    cu = torch.arange(images + 1, device=device, dtype=torch.int32) * tokens
    out = torch.empty_like(q)
    scale = head_dim ** -0.5
    ours = time_us(lambda: ops.varlen_attention(q, k, v, cu, cu, tokens, tokens, scale, out=out),
                   device)

    def per_image():
        return torch.cat([
            F.scaled_dot_product_attention(
                q[i * tokens:(i + 1) * tokens].transpose(0, 1),
                k[i * tokens:(i + 1) * tokens].transpose(0, 1),
                v[i * tokens:(i + 1) * tokens].transpose(0, 1), scale=scale).transpose(0, 1)
            for i in range(images)])

    seg = torch.arange(total, device=device) // tokens
    mask = seg[:, None] == seg[None, :]

    def block_diagonal():
        return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                              v.transpose(0, 1), attn_mask=mask, scale=scale)

    case = f"{images} imgs x {tokens} h={heads} d={head_dim} {str(dtype)[6:]}"
    nbytes = 4 * q.numel() * q.element_size()
    rows = [
        Row("varlen_attention", case, device, ours, "SDPA per image (loop)",
            time_us(per_image, device), nbytes),
        Row("varlen_attention", case, device, ours, "SDPA block-diagonal mask",
            time_us(block_diagonal, device), nbytes),
    ]
    varlen_attn = _torch_varlen_attn()
    if device.startswith("cuda") and varlen_attn is not None:
        flash = time_us(lambda: varlen_attn(q, k, v, cu, cu, tokens, tokens, scale=scale), device)
        rows.append(Row("varlen_attention", case, device, ours, "torch varlen_attn (flash)", flash,
                        nbytes))
        if packed_attention.takes_cudnn(q, k, v):
            # The towers' path for segments of one length: cuDNN as a dense
            # batch (packed_attention with equal_lengths), against FlashAttention.
            dense = time_us(lambda: packed_attention.packed_attention(
                q, k, v, cu, cu, tokens, tokens, scale, equal_lengths=True), device)
            rows.append(Row("packed_attention equal lengths (cuDNN)", case, device, dense,
                            "torch varlen_attn (flash)", flash, nbytes))
            # pyvlm's op (its wgmma kernel where PYVLM_SM90_ATTENTION turns it on) against
            # the towers' default.
            rows.append(Row("varlen_attention", case, device, ours,
                            "packed_attention equal lengths (cuDNN)", dense, nbytes))
    flops = 4 * images * tokens * tokens * heads * head_dim
    print(f"varlen_attention {case}: pyvlm {flops / (rows[0].ours_us * 1e-6) / 1e12:.0f} TFLOP/s"
          + "".join(f", {r.baseline} {flops / (r.baseline_us * 1e-6) / 1e12:.0f}" for r in rows))
    return rows


def _demo_prefill_rows(device, dtype):
    """The CPU demo model's shapes (SmolLM2-135M: 9/3 heads, d 64), one-shot
    causal prefill of 1,090 tokens, against SDPA is_causal on contiguous
    [batch, heads, tokens, d] tensors (no gather: the best case for SDPA)."""
    new, heads, kv_heads, head_dim = 1090, 9, 3, 64
    rows = []
    for num_seqs in (1, 8):
        c = _paged_inputs(num_seqs, 0, new, heads, kv_heads, head_dim, 16, dtype, device)
        out = torch.empty_like(c["query"])
        ours = time_us(lambda: ops.paged_attention_prefill(**c, out=out), device)
        q = torch.randn(num_seqs, heads, new, head_dim, device=device, dtype=dtype)
        k = torch.randn(num_seqs, kv_heads, new, head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        base = time_us(lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=c["scale"], enable_gqa=True), device)
        nbytes = q.element_size() * (2 * q.numel() + 2 * k.numel())
        case = f"b={num_seqs} new={new} prefix=0 h={heads}/{kv_heads} d={head_dim} {str(dtype)[6:]}"
        rows.append(Row("paged_attention_prefill", case, device, ours,
                        "SDPA is_causal, contiguous (enable_gqa)", base, nbytes))
    return rows


def run(device: str):
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    rows = _prefill_rows(device, dtype) + _varlen_rows(device, dtype)
    if not device.startswith("cuda"):
        rows += _demo_prefill_rows(device, dtype)
    return rows
