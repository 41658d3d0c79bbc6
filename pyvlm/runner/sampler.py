"""Turns a batch's last-token logits into SampleResults with the extension's
penalty and sampling kernels (seeded per request: the token drawn at output
step n depends only on the seed, n and the logits)."""

from collections import Counter
from typing import Callable, List, Sequence

import torch

from pyvlm import ops
from pyvlm.ops.host_upload import HostUpload, to_host
from pyvlm.scheduling.types import SampleResult, SequenceChunk


def _needs_penalties(chunk: SequenceChunk) -> bool:
    s = chunk.sampling
    return (s.presence_penalty != 0.0 or s.frequency_penalty != 0.0
            or s.repetition_penalty != 1.0 or bool(s.logit_bias))


def _penalty_rows(chunks: Sequence[SequenceChunk]):
    """CSR rows of (distinct token ids, output counts) per chunk."""
    ids, counts, offsets = [], [], [0]
    for chunk in chunks:
        out_counts = Counter(chunk.output_ids)
        row = dict.fromkeys(list(chunk.prompt_ids) + list(chunk.output_ids))
        ids.extend(row)
        counts.extend(out_counts.get(t, 0) for t in row)
        offsets.append(len(ids))
    return ids, counts, offsets


def _bias_rows(chunks: Sequence[SequenceChunk]):
    ids, values, offsets = [], [], [0]
    for chunk in chunks:
        bias = dict(chunk.sampling.logit_bias)
        ids.extend(bias)
        values.extend(bias.values())
        offsets.append(len(ids))
    return ids, values, offsets


def apply_penalties(logits: torch.Tensor, chunks: Sequence[SequenceChunk]) -> None:
    """Repetition/presence/frequency penalties and logit bias, in place."""
    if not any(_needs_penalties(c) for c in chunks):
        return
    dev = logits.device
    ids, counts, offsets = _penalty_rows(chunks)
    bias_ids, bias_values, bias_offsets = _bias_rows(chunks)

    def f32(values):
        return torch.tensor(values, dtype=torch.float32, device=dev)

    ops.apply_penalties(
        logits,
        torch.tensor(ids, dtype=torch.int64, device=dev),
        torch.tensor(counts, dtype=torch.int32, device=dev),
        torch.tensor(offsets, dtype=torch.int32, device=dev),
        f32([c.sampling.presence_penalty for c in chunks]),
        f32([c.sampling.frequency_penalty for c in chunks]),
        f32([c.sampling.repetition_penalty for c in chunks]),
        torch.tensor(bias_ids, dtype=torch.int64, device=dev),
        f32(bias_values),
        torch.tensor(bias_offsets, dtype=torch.int32, device=dev),
    )


def sample(logits: torch.Tensor, chunks: Sequence[SequenceChunk]) -> List[SampleResult]:
    """One SampleResult per row of logits [len(chunks), vocab] (float32)."""
    upload = HostUpload()
    draw = stage(chunks, upload)
    upload.to(logits.device)
    return draw(logits)


def stage(chunks: Sequence[SequenceChunk],
          upload: HostUpload) -> Callable[[torch.Tensor], List[SampleResult]]:
    """Adds the chunks' sampling parameters to `upload` (moved with the rest
    of the step); the returned callable samples float32 logits [len(chunks),
    vocab] after upload.to(), reading the results back with one wait."""
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

    def draw(logits: torch.Tensor) -> List[SampleResult]:
        apply_penalties(logits, chunks)
        tokens, logprobs, top_ids, top_lps = ops.sample(
            logits, *(p.tensor for p in params), num_top=num_top)
        wanted = [tokens, logprobs] + ([top_ids, top_lps] if num_top else [])
        host = [t.tolist() for t in to_host(wanted)]
        if not num_top:
            host += [[[]] * len(chunks)] * 2
        return _to_results(chunks, *host)

    return draw


def _to_results(chunks, tokens, logprobs, top_ids, top_lps) -> List[SampleResult]:
    results = []
    for i, chunk in enumerate(chunks):
        n = chunk.sampling.top_logprobs
        top = tuple(zip(top_ids[i][:n], top_lps[i][:n]))
        results.append(SampleResult(tokens[i], logprobs[i], top))
    return results
