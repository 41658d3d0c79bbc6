"""paged_attention_decode and reshape_and_cache against what a user would
write in torch: SDPA on contiguous KV (the speed of light for unpaged
attention), SDPA after gathering the pages, and index_copy_ into the cache.

pyvlm's times include the adapters' index-range checks (on CUDA one small
kernel and a device-to-host sync per call); run with PYVLM_CHECK_INDICES=0,
as engines do on the hot path, to time the kernels alone."""

import math

import torch
import torch.nn.functional as F

from pyvlm import ops

from .harness import Row, time_us


def _paged_inputs(batch, context, num_heads, num_kv_heads, head_dim, page_size, dtype, device):
    """Equal-length sequences on randomly placed pages, plus the same KV contiguous."""
    pages_per_seq = context // page_size
    num_pages = batch * pages_per_seq
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, device=device, dtype=dtype)
    value_cache = torch.randn(shape, device=device, dtype=dtype)
    table = torch.randperm(num_pages, device=device).to(torch.int32).view(batch, pages_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, num_heads, head_dim, device=device, dtype=dtype)
    return query, key_cache, value_cache, table, lens


def _gather(cache, table):
    """[batch, num_kv_heads, context, head_dim] copy of each sequence's pages."""
    batch, pages = table.shape
    rows = cache[table.long()].view(batch, pages * cache.shape[1], *cache.shape[2:])
    return rows.transpose(1, 2)


def _sdpa(query, key, value, scale):
    out = F.scaled_dot_product_attention(query.unsqueeze(2), key, value, scale=scale,
                                         enable_gqa=True)
    return out.squeeze(2)


def _decode_rows(device, batch, context, dtype, num_heads=32, num_kv_heads=8, head_dim=128,
                 page_size=16):
    query, key_cache, value_cache, table, lens = _paged_inputs(
        batch, context, num_heads, num_kv_heads, head_dim, page_size, dtype, device)
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.empty_like(query)
    key, value = _gather(key_cache, table).contiguous(), _gather(value_cache, table).contiguous()
    ours = time_us(lambda: ops.paged_attention_decode(query, key_cache, value_cache, table, lens,
                                                      scale, out=out), device)
    contiguous = time_us(lambda: _sdpa(query, key, value, scale), device)
    del key, value
    gathered = time_us(lambda: _sdpa(query, _gather(key_cache, table), _gather(value_cache, table),
                                     scale), device)
    elt = key_cache.element_size()
    nbytes = 2 * batch * context * num_kv_heads * head_dim * elt + 2 * query.numel() * elt
    case = (f"b={batch} ctx={context} h={num_heads}/{num_kv_heads} d={head_dim} "
            f"page={page_size} {str(dtype)[6:]}")
    return [
        Row("paged_attention_decode", case, device, ours, "SDPA, contiguous KV", contiguous,
            nbytes),
        Row("paged_attention_decode", case, device, ours, "gather pages + SDPA", gathered, nbytes),
    ]


def _cache_write_row(device, num_tokens, dtype, num_kv_heads=8, head_dim=128, page_size=16):
    num_pages = max(64, 2 * num_tokens // page_size)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    key_cache = torch.zeros(shape, device=device, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=device, dtype=dtype)
    value = torch.randn_like(key)
    slots = torch.randperm(num_pages * page_size, device=device)[:num_tokens]
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)

    def torch_version():
        flat_k.index_copy_(0, slots, key)
        flat_v.index_copy_(0, slots, value)

    ours = time_us(lambda: ops.reshape_and_cache(key, value, key_cache, value_cache, slots),
                   device)
    base = time_us(torch_version, device)
    nbytes = 4 * key.numel() * key.element_size() + slots.numel() * 8
    case = f"t={num_tokens} h={num_kv_heads} d={head_dim} {str(dtype)[6:]}"
    return Row("reshape_and_cache", case, device, ours, "index_copy_", base, nbytes)


def run(device: str):
    if device.startswith("cuda"):
        dtype = torch.bfloat16
        rows = _decode_rows(device, 64, 4096, dtype)
        rows += _decode_rows(device, 1, 32768, dtype)
        rows += [_cache_write_row(device, 64, dtype), _cache_write_row(device, 8192, dtype)]
        return rows
    dtype = torch.float32
    rows = _decode_rows(device, 8, 1024, dtype)
    rows += _decode_rows(device, 1, 4096, dtype)
    rows += [_cache_write_row(device, 64, dtype), _cache_write_row(device, 2048, dtype)]
    return rows
