"""sample and apply_penalties against the pure-torch code a user would write."""

import torch

from pyvlm import ops
from pyvlm.ops import reference

from .harness import Row, time_us


def _penalty_inputs(batch, vocab, device, per_row=256):
    ids = torch.cat([torch.randperm(vocab)[:per_row] for _ in range(batch)]).to(device)
    counts = torch.randint(0, 4, (ids.numel(),), dtype=torch.int32, device=device)
    cu = torch.arange(0, (batch + 1) * per_row, per_row, dtype=torch.int32, device=device)
    pen = [torch.full((batch,), v, device=device) for v in (0.5, 0.1, 1.2)]
    return ids, counts, cu, pen


def _torch_penalties(logits, ids, counts, rows, pres, freq, rep):
    """Gather, penalise, scatter back (as vLLM's sampler does with dense masks)."""
    vals = logits[rows, ids]
    r = rep[rows]
    vals = torch.where(vals > 0, vals / r, vals * r)
    vals = vals - pres[rows] * (counts > 0) - freq[rows] * counts
    logits.index_put_((rows, ids), vals)


def run(device: str):
    cuda = device.startswith("cuda")
    batch, vocab = (256, 152064) if cuda else (16, 152064)
    logits = torch.randn(batch, vocab, device=device) * 3
    nbytes = logits.numel() * logits.element_size()
    case = f"b={batch} v={vocab} f32"
    seeds = torch.arange(batch, device=device)
    t = torch.full((batch,), 0.8, device=device)
    ks = torch.full((batch,), 50, dtype=torch.int32, device=device)
    ps = torch.full((batch,), 0.9, device=device)
    rows = []
    ours = time_us(lambda: ops.sample(logits, t, top_ks=ks, top_ps=ps, seeds=seeds), device)
    base = time_us(lambda: reference.sample(logits, t, top_ks=ks, top_ps=ps), device)
    rows.append(Row("sample top-p 0.9 + top-k 50", case, device, ours,
                    "sort + cumsum + multinomial", base, nbytes))
    # A flat row: the kept set is most of the vocabulary (the CUDA kernel's third pass).
    flat = torch.randn(batch, vocab, device=device) * 0.3
    t_flat = torch.full((batch,), 1.5, device=device)
    ps_flat = torch.full((batch,), 0.95, device=device)
    ours = time_us(lambda: ops.sample(flat, t_flat, top_ps=ps_flat, seeds=seeds), device)
    base = time_us(lambda: reference.sample(flat, t_flat, top_ps=ps_flat), device)
    rows.append(Row("sample top-p 0.95, flat row", case, device, ours,
                    "sort + cumsum + multinomial", base, nbytes))
    ours = time_us(lambda: ops.sample(logits, 0.0), device)
    base = time_us(lambda: logits.argmax(-1), device)
    rows.append(Row("sample greedy", case, device, ours, "torch.argmax", base, nbytes))
    ours = time_us(lambda: ops.sample(logits, 0.0, num_top=20), device)
    base = time_us(lambda: torch.log_softmax(logits, -1).topk(20), device)
    rows.append(Row("sample greedy + 20 logprobs", case, device, ours,
                    "log_softmax + topk", base, nbytes))
    ids, counts, cu, (pres, freq, rep) = _penalty_inputs(batch, vocab, device)
    prow = torch.repeat_interleave(torch.arange(batch, device=device), cu.diff().long())
    work = logits.clone()
    ours = time_us(lambda: ops.apply_penalties(work, ids, counts, cu, pres, freq, rep), device)
    base = time_us(lambda: _torch_penalties(work, ids, counts, prow, pres, freq, rep), device)
    rows.append(Row("apply_penalties", f"b={batch} 256 tokens/row f32", device, ours,
                    "gather + index_put", base, 2 * ids.numel() * 4))
    return rows
