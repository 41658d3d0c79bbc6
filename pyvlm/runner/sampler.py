"""Turns a batch's last-token logits into SampleResults: penalties from the
runner's device state (pyvlm.runner.penalty_state), the logit bias and the
sampling kernel of the extension (seeded per request: the token drawn at
output step n depends only on the seed, n and the logits)."""

from typing import Callable, List, Optional, Sequence

import torch

from pyvlm import ops
from pyvlm.ops.host_upload import HostCopies, HostUpload
from pyvlm.runner.penalty_state import PenaltyState, StagedPenalties, needs_penalties
from pyvlm.scheduling.types import SampleResult, SequenceChunk


def _bias_rows(chunks: Sequence[SequenceChunk]):
    ids, values, offsets = [], [], [0]
    for chunk in chunks:
        bias = dict(chunk.sampling.logit_bias)
        ids.extend(bias)
        values.extend(bias.values())
        offsets.append(len(ids))
    return ids, values, offsets


def apply_penalties(logits: torch.Tensor, chunks: Sequence[SequenceChunk]) -> None:
    """Repetition/presence/frequency penalties and logit bias, in place
    (from scratch: the runner keeps a PenaltyState across steps instead)."""
    upload = HostUpload()
    penalize = _stage_penalties(chunks, upload, PenaltyState())
    upload.to(logits.device)
    penalize(logits)


def _stage_penalties(chunks: Sequence[SequenceChunk], upload: HostUpload,
                     state: PenaltyState) -> Callable[[torch.Tensor], Optional[StagedPenalties]]:
    """Adds the penalty and bias lists of the step to upload; the callable
    applies them to the logits and returns what must record the sampled tokens."""
    penalized = [i for i, c in enumerate(chunks) if needs_penalties(c)]
    staged = state.stage([chunks[i] for i in penalized], penalized, upload) if penalized else None
    bias = None
    if any(c.sampling.logit_bias for c in chunks):
        ids, values, offsets = _bias_rows(chunks)
        bias = (upload.add(ids, torch.int64), upload.add(values, torch.float32),
                upload.add(offsets, torch.int32), upload.add([0] * len(offsets), torch.int32),
                upload.add([0.0] * len(chunks), torch.float32))

    def penalize(logits: torch.Tensor) -> Optional[StagedPenalties]:
        if staged is not None:
            staged.apply(logits)
        if bias is not None:  # the extension's op with no penalized tokens: bias alone
            ids, values, offsets, no_rows, zeros = (p.tensor for p in bias)
            empty = ids[:0]
            ops.apply_penalties(logits, empty, no_rows[:0], no_rows, zeros, zeros,
                                zeros + 1.0, ids, values, offsets)
        return staged

    return penalize


def sample(logits: torch.Tensor, chunks: Sequence[SequenceChunk]) -> List[SampleResult]:
    """One SampleResult per row of logits [len(chunks), vocab] (float32)."""
    upload = HostUpload()
    draw = stage(chunks, upload, PenaltyState())
    upload.to(logits.device)
    return draw(logits).results()


def stage(chunks: Sequence[SequenceChunk], upload: HostUpload,
          penalties: PenaltyState) -> Callable[[torch.Tensor], "DrawnSamples"]:
    """Adds the chunks' sampling parameters to `upload` (moved with the rest
    of the step); the returned callable samples float32 logits [len(chunks),
    vocab] after upload.to() and starts copying the results to the host.
    penalties: the runner's device state of penalized requests."""
    penalize = _stage_penalties(chunks, upload, penalties)
    num_top = max((c.sampling.top_logprobs for c in chunks), default=0)
    params = [
        upload.add([0.0 if c.sampling.is_greedy else c.sampling.temperature for c in chunks],
                   torch.float32),
        # top_k beyond the vocabulary keeps every token; capped, it fits the kernel's int32.
        upload.add([min(max(c.sampling.top_k, 0), 1 << 30) for c in chunks], torch.int32),
        upload.add([c.sampling.top_p for c in chunks], torch.float32),
        upload.add([c.sampling.min_p for c in chunks], torch.float32),
        upload.add([c.seed for c in chunks], torch.int64),
        upload.add([c.step for c in chunks], torch.int64),
    ]

    def draw(logits: torch.Tensor) -> DrawnSamples:
        staged_penalties = penalize(logits)
        tokens, logprobs, top_ids, top_lps = ops.sample(
            logits, *(p.tensor for p in params), num_top=num_top)
        if staged_penalties is not None:
            staged_penalties.record(tokens)
        return DrawnSamples(chunks, tokens, HostCopies(
            [tokens, logprobs] + ([top_ids, top_lps] if num_top else [])))

    return draw


class DrawnSamples:
    """A step's sampled tokens: on the device (`tokens`, what the next
    launched step may feed back) and on their way to the host (results())."""

    def __init__(self, chunks: Sequence[SequenceChunk], tokens: torch.Tensor,
                 copies: HostCopies):
        self.chunks, self.tokens, self._copies = chunks, tokens, copies

    def results(self) -> List[SampleResult]:
        """Waits for the copies (the step's one host sync) and builds results."""
        host = [t.tolist() for t in self._copies.wait()]
        if len(host) == 2:  # no top logprobs asked for
            host += [[[]] * len(self.chunks)] * 2
        return _to_results(self.chunks, *host)


def _to_results(chunks, tokens, logprobs, top_ids, top_lps) -> List[SampleResult]:
    results = []
    for i, chunk in enumerate(chunks):
        n = chunk.sampling.top_logprobs
        top = tuple(zip(top_ids[i][:n], top_lps[i][:n]))
        results.append(SampleResult(tokens[i], logprobs[i], top))
    return results
