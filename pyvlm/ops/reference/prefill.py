"""Pure-torch references for paged_attention_prefill and varlen_attention:
per sequence, gather the keys and values and run a plain masked softmax."""

import torch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            mask: torch.Tensor) -> torch.Tensor:
    """q [n, h, d], k/v [m, kvh, d], mask [n, m] (True = visible) -> [n, h, d]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without keys -> 0
    return torch.einsum("hnm,mhd->nhd", probs, v)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first num_tokens positions of one sequence: [num_tokens, kvh, d]."""
    page_size = cache.shape[1]
    pages = block_table[: (num_tokens + page_size - 1) // page_size].long()
    return cache[pages].flatten(0, 1)[:num_tokens]


def paged_attention_prefill(query, key_cache, value_cache, block_tables, cu_seqlens_q,
                            prefix_lens, max_seqlen_q, scale):
    out = torch.zeros_like(query)
    cu = cu_seqlens_q.tolist()
    for s, prefix in enumerate(prefix_lens.tolist()):
        q = query[cu[s]:cu[s + 1]]
        n = q.shape[0]
        k = gather_pages(key_cache, block_tables[s], prefix + n)
        v = gather_pages(value_cache, block_tables[s], prefix + n)
        key_pos = torch.arange(prefix + n, device=query.device)
        query_pos = prefix + torch.arange(n, device=query.device)
        out[cu[s]:cu[s + 1]] = _attend(q, k, v, scale, key_pos[None, :] <= query_pos[:, None])
    return out


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     scale):
    out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        q, k, v = query[cq[s]:cq[s + 1]], key[ck[s]:ck[s + 1]], value[ck[s]:ck[s + 1]]
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=query.device)
        out[cq[s]:cq[s + 1]] = _attend(q, k, v, scale, mask)
    return out
