"""Token sampling (temperature, top-k, top-p, min-p; seeded) and logit penalties.

Sampling semantics, per row of logits `l` (shape [vocab]):

* ``temperature <= 0``: greedy, the argmax of ``l`` (lowest index on ties).
* otherwise ``p = softmax(l / temperature)`` and token ``i`` is *kept* iff all of
  - top-k (``0 < k < vocab``, else off): fewer than ``k`` tokens have a strictly
    larger logit (so ties at the k-th value are all kept);
  - top-p (``top_p < 1``, else off): the total ``p`` of the tokens with a strictly
    larger logit is ``< top_p``;
  - min-p (``min_p > 0``, else off): ``p_i >= min_p * max(p)``;
  all evaluated on the same unrenormalised ``p``. The token is drawn from the kept
  tokens with probability proportional to ``p`` (Gumbel-max: the argmax over kept
  ``i`` of ``l_i / T + g_i``, ``g_i = -log(-log(u_i))``, ``u_i`` the top 24 bits
  of Philox4x32-10 keyed by the row's seed, counter ``(i // 4, 0, step)``, word
  ``i % 4``). A seeded request therefore gets the same token whatever its batch
  neighbours and row index; engines pass the number of tokens generated so far
  as the step.
* ``logprobs`` is ``log_softmax(l)[token]`` of the logits as given (no
  temperature, no filters); ``top_logprobs``/``top_ids`` are the ``num_top``
  largest ``log_softmax(l)`` values, descending, lower index first on ties.

Logits must not contain NaN or +inf, and each row needs a finite value.
Parameter ranges (temperatures finite, top_ps in (0, 1], min_ps in [0, 1]) are
checked on CPU; on CUDA they are not (that would need a host sync) and the
kernel clamps them instead.
"""

from typing import Optional, Tuple

import torch

from ._library import ops


def _row_param(x, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.full((batch,), x, dtype=dtype, device=device)


def sample(
    logits: torch.Tensor,
    temperatures,
    top_ks=0,
    top_ps=1.0,
    min_ps=0.0,
    seeds=0,
    steps=0,
    num_top: int = 0,
    out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples one token per row of ``logits`` [batch, vocab] (see the module docstring).

    Per-row parameters are tensors of shape [batch] or Python scalars applied to
    every row: temperatures (float32), top_ks (int32), top_ps and min_ps
    (float32), seeds and steps (int64). Returns ``(tokens int64 [batch],
    logprobs float32 [batch], top_ids int64 [batch, num_top], top_logprobs
    float32 [batch, num_top])``, written into ``out`` when given.
    """
    batch, dev = logits.shape[0], logits.device
    if out is None:
        out = (
            torch.empty(batch, dtype=torch.int64, device=dev),
            torch.empty(batch, dtype=torch.float32, device=dev),
            torch.empty(batch, num_top, dtype=torch.int64, device=dev),
            torch.empty(batch, num_top, dtype=torch.float32, device=dev),
        )
    ops.sample(
        *out,
        logits,
        _row_param(temperatures, batch, torch.float32, dev),
        _row_param(top_ks, batch, torch.int32, dev),
        _row_param(top_ps, batch, torch.float32, dev),
        _row_param(min_ps, batch, torch.float32, dev),
        _row_param(seeds, batch, torch.int64, dev),
        _row_param(steps, batch, torch.int64, dev),
    )
    return out


def apply_penalties(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    output_counts: torch.Tensor,
    cu_token_rows: torch.Tensor,
    presence_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    repetition_penalties: torch.Tensor,
    bias_token_ids: Optional[torch.Tensor] = None,
    bias_values: Optional[torch.Tensor] = None,
    cu_bias_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Applies sampling penalties to ``logits`` [batch, vocab] in place and returns it.

    Row ``r`` lists its tokens ``token_ids[cu_token_rows[r]:cu_token_rows[r+1]]``
    (int64, distinct within the row: prompt and output tokens so far) with
    ``output_counts`` (int32, occurrences in the output; 0 = prompt only).
    In order, computed in float32: the repetition penalty on every listed
    token (HF/CTRL: ``l > 0 -> l / r`` else ``l * r``; 1 = off), then
    ``l -= presence`` if the count is > 0 and ``l -= frequency * count``
    (OpenAI), stored in the logits' dtype; then the logit bias
    (``bias_token_ids``/``bias_values``, a second CSR by ``cu_bias_rows``,
    distinct ids within a row) is added. Offsets are int32 [batch + 1];
    penalties float32 [batch].
    """
    if bias_token_ids is None:
        bias_token_ids = torch.empty(0, dtype=torch.int64, device=logits.device)
        bias_values = torch.empty(0, dtype=torch.float32, device=logits.device)
        cu_bias_rows = torch.zeros(logits.shape[0] + 1, dtype=torch.int32, device=logits.device)
    ops.apply_penalties(
        logits, token_ids, output_counts, cu_token_rows, presence_penalties,
        frequency_penalties, repetition_penalties, bias_token_ids, bias_values, cu_bias_rows,
    )
    return logits


@torch.library.register_fake("pyvlm::sample")
def _sample_fake(out_tokens, out_logprobs, out_top_ids, out_top_logprobs, logits,
                 temperatures, top_ks, top_ps, min_ps, seeds, steps):
    return None


@torch.library.register_fake("pyvlm::apply_penalties")
def _apply_penalties_fake(logits, token_ids, output_counts, cu_token_rows, presence_penalties,
                          frequency_penalties, repetition_penalties, bias_token_ids,
                          bias_values, cu_bias_rows):
    return None
