"""Pure-torch references for sampling and penalties.

`sample` is the sort-based sampler a user would write (softmax, sort, cumsum
for top-p, top-k and min-p masks, torch.multinomial); `kept_distribution`
gives the exact per-row distribution the op samples from (float64), with the
op's tie-inclusive filter semantics (see pyvlm.ops.sampling).
"""

import torch


def _per_row(x, batch, dtype, device):
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.full((batch,), x, dtype=dtype, device=device)


def kept_distribution(logits, temperatures, top_ks=0, top_ps=1.0, min_ps=0.0) -> torch.Tensor:
    """float64 [batch, vocab]: the filtered, renormalised probabilities (one-hot argmax for T <= 0)."""
    l = logits.double()
    batch, vocab = l.shape
    t = _per_row(temperatures, batch, torch.float64, l.device)[:, None]
    k = _per_row(top_ks, batch, torch.int64, l.device)[:, None]
    p_top = _per_row(top_ps, batch, torch.float64, l.device)[:, None]
    p_min = _per_row(min_ps, batch, torch.float64, l.device)[:, None]
    greedy = t <= 0
    probs = torch.softmax(l / torch.where(greedy, 1.0, t), dim=-1)
    # For each token: how many tokens, and how much probability, lie strictly above it.
    order = torch.argsort(l, dim=-1, descending=True, stable=True)
    sorted_l = l.gather(-1, order)
    sorted_p = probs.gather(-1, order)
    first = torch.searchsorted(-sorted_l, -sorted_l, side="left")  # index of the first equal value
    above_p = torch.cat([torch.zeros_like(sorted_p[:, :1]), sorted_p.cumsum(-1)], -1).gather(-1, first)
    keep_sorted = torch.ones_like(sorted_p, dtype=torch.bool)
    keep_sorted &= (k <= 0) | (k >= vocab) | (first < k)
    keep_sorted &= (p_top >= 1) | (above_p < p_top)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    keep &= probs >= p_min * probs.max(-1, keepdim=True).values
    dist = torch.where(keep, probs, 0.0)
    dist = dist / dist.sum(-1, keepdim=True)
    onehot = torch.zeros_like(dist).scatter(-1, l.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy, onehot, dist)


def sample(logits, temperatures, top_ks=0, top_ps=1.0, min_ps=0.0, generator=None) -> torch.Tensor:
    """The sort-based torch sampler (SGLang/vLLM style, ties broken by sort order): int64 [batch]."""
    batch, vocab = logits.shape
    t = _per_row(temperatures, batch, torch.float32, logits.device)[:, None]
    k = _per_row(top_ks, batch, torch.int64, logits.device)[:, None]
    p_top = _per_row(top_ps, batch, torch.float32, logits.device)[:, None]
    p_min = _per_row(min_ps, batch, torch.float32, logits.device)[:, None]
    probs = torch.softmax(logits.float() / torch.where(t > 0, t, 1.0), dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    rank = torch.arange(vocab, device=logits.device)[None]
    drop = (cum - sorted_p) >= p_top
    drop |= (k > 0) & (rank >= k)
    drop |= sorted_p < p_min * sorted_p[:, :1]
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    tokens = order.gather(-1, choice).squeeze(-1)
    return torch.where(t.squeeze(-1) > 0, tokens, logits.argmax(-1))


def logprobs(logits, tokens, num_top: int):
    """(log_softmax(logits)[token], top num_top values, their ids) in float64."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    top = lp.topk(num_top, dim=-1, sorted=True) if num_top else None
    chosen = lp.gather(-1, tokens[:, None]).squeeze(-1)
    if top is None:
        empty = lp[:, :0]
        return chosen, empty, empty.long()
    return chosen, top.values, top.indices


def apply_penalties(logits, token_ids, output_counts, cu_token_rows, presence_penalties,
                    frequency_penalties, repetition_penalties, bias_token_ids=None,
                    bias_values=None, cu_bias_rows=None) -> torch.Tensor:
    """Returns the penalised logits in float64 (no rounding between the steps)."""
    out = logits.double().clone()
    rows = torch.repeat_interleave(torch.arange(out.shape[0], device=out.device),
                                   cu_token_rows.diff().long())
    vals = out[rows, token_ids]
    rep = repetition_penalties.double()[rows]
    vals = torch.where(vals > 0, vals / rep, vals * rep)
    counts = output_counts.double()
    vals = vals - presence_penalties.double()[rows] * (counts > 0) - frequency_penalties.double()[rows] * counts
    out[rows, token_ids] = vals
    if bias_token_ids is not None and bias_token_ids.numel():
        brows = torch.repeat_interleave(torch.arange(out.shape[0], device=out.device),
                                        cu_bias_rows.diff().long())
        out.index_put_((brows, bias_token_ids), bias_values.double(), accumulate=True)
    return out
