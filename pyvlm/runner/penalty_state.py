"""Repetition, presence and frequency penalties from state kept on the
device (SGLang's penalizer orchestrator): per request, a row of output-token
counts and a row marking its prompt's tokens, [rows, vocab] each. A row is
filled once from the request's ids (its first sampled step, or after it was
evicted or preempted) and then grows by the token each step samples, added
on the device: a step's host work is constant per request, not its context.

The arithmetic is the extension's apply_penalties (pyvlm/ops/sampling.py),
term by term in float32 with the same rounding: the repetition penalty on
every prompt or output token (l > 0 -> l / r, else l * r), then minus the
presence penalty where the count is > 0 and minus frequency x count.

A row belongs to a request while its recorded step is the request's: a
chunk whose step differs (a new request reusing an id, a recomputed one)
refills it. Rows of requests not seen for longest are reused first.
"""

from typing import Dict, List, Sequence, Tuple

import torch

from pyvlm.ops.host_upload import HostUpload
from pyvlm.scheduling.types import SequenceChunk


def needs_penalties(chunk: SequenceChunk) -> bool:
    """Whether a chunk's request has a repetition, presence or frequency penalty."""
    s = chunk.sampling
    return s.presence_penalty != 0.0 or s.frequency_penalty != 0.0 or s.repetition_penalty != 1.0


class PenaltyState:
    """Device rows of output counts and prompt membership, by request id."""

    def __init__(self, initial_rows: int = 8):
        self.counts = self.in_prompt = None  # [rows, vocab], made at the first use
        self._num_rows = initial_rows
        self._rows: Dict[str, int] = {}  # rid -> row
        self._steps: Dict[str, int] = {}  # rid -> the step whose tokens the row counts up to
        self._last_used: Dict[int, int] = {}  # row -> clock
        self._clock = 0

    def stage(self, chunks: Sequence[SequenceChunk], batch_rows: Sequence[int],
              upload: HostUpload) -> "StagedPenalties":
        """Plans the penalties of `chunks` (all penalized; batch_rows[i] is
        chunk i's row in the step's logits) and adds their lists to upload."""
        self._clock += 1
        in_use = {self._rows[c.rid] for c in chunks if c.rid in self._rows}
        rows, refills = [], []
        for c in chunks:
            row = self._rows.get(c.rid)
            if row is None or self._steps.get(c.rid) != c.step:
                row = row if row is not None else self._free_row(in_use)
                in_use.add(row)
                self._rows[c.rid] = row
                refills.append((row, c))
            rows.append(row)
            self._last_used[row] = self._clock
            self._steps[c.rid] = c.step + 1  # after this step samples its token
        return StagedPenalties(self, chunks, rows, batch_rows, refills, upload)

    def _free_row(self, in_use) -> int:
        """A row no request of this step holds: never used, else least recently used."""
        used = set(self._rows.values())
        fresh = [r for r in range(self._num_rows) if r not in used]
        if fresh:
            return fresh[0]
        stale = [r for r in used if r not in in_use]
        if not stale:
            self._grow()
            return self._free_row(in_use)
        row = min(stale, key=lambda r: self._last_used.get(r, 0))
        for rid in [rid for rid, r in self._rows.items() if r == row]:
            del self._rows[rid], self._steps[rid]
        return row

    def _grow(self) -> None:
        self._num_rows *= 2
        if self.counts is not None:
            self.counts = _grown(self.counts, self._num_rows)
            self.in_prompt = _grown(self.in_prompt, self._num_rows)

    def ensure_vocab(self, vocab: int, device: torch.device) -> None:
        """Allocates the rows at the first use: one column per logit and a
        last one where prompt ids past the LM head land (an image
        placeholder a tokenizer added), which no logit reads."""
        if self.counts is None:
            shape = (self._num_rows, vocab + 1)
            self.counts = torch.zeros(shape, dtype=torch.int32, device=device)
            self.in_prompt = torch.zeros(shape, dtype=torch.bool, device=device)
        elif self.counts.shape[1] != vocab + 1:
            raise ValueError(f"logits of {vocab} tokens after {self.counts.shape[1] - 1}")


def _grown(t: torch.Tensor, num_rows: int) -> torch.Tensor:
    out = torch.zeros((num_rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:t.shape[0]] = t
    return out


class StagedPenalties:
    """One step's penalties: apply(logits) before sampling, record(tokens) after."""

    def __init__(self, state: PenaltyState, chunks: Sequence[SequenceChunk], rows: List[int],
                 batch_rows: Sequence[int], refills: List[Tuple[int, SequenceChunk]],
                 upload: HostUpload):
        self.state = state
        self.has_refills = bool(refills)
        self.rows = upload.add(rows, torch.int64)
        self.batch_rows = upload.add(list(batch_rows), torch.int64)
        self.refill_rows = upload.add([row for row, _ in refills], torch.int64)
        prompt_rows, prompt_ids, output_rows, output_ids = [], [], [], []
        for row, c in refills:
            prompt_rows.extend([row] * len(c.prompt_ids))
            prompt_ids.extend(c.prompt_ids)
            output_rows.extend([row] * len(c.output_ids))
            output_ids.extend(c.output_ids)
        self.prompt = (upload.add(prompt_rows, torch.int64), upload.add(prompt_ids, torch.int64))
        self.output = (upload.add(output_rows, torch.int64), upload.add(output_ids, torch.int64))
        self.repetition = upload.add([c.sampling.repetition_penalty for c in chunks],
                                     torch.float32)
        self.presence = upload.add([c.sampling.presence_penalty for c in chunks], torch.float32)
        self.frequency = upload.add([c.sampling.frequency_penalty for c in chunks],
                                    torch.float32)

    def apply(self, logits: torch.Tensor) -> None:
        """Penalizes the chunks' rows of float32 logits [batch, vocab] in place."""
        state = self.state
        state.ensure_vocab(logits.shape[1], logits.device)
        if self.has_refills:
            self._refill()
        rows, batch_rows, vocab = self.rows.tensor, self.batch_rows.tensor, logits.shape[1]
        counts = state.counts.index_select(0, rows)[:, :vocab]
        seen = state.in_prompt.index_select(0, rows)[:, :vocab] | (counts > 0)
        x = logits.index_select(0, batch_rows)
        r = self.repetition.tensor[:, None]
        x = torch.where(seen & (r != 1.0), torch.where(x > 0, x / r, x * r), x)
        x = torch.where(counts > 0, x - self.presence.tensor[:, None], x)
        x = torch.where(seen, x - self.frequency.tensor[:, None] * counts.float(), x)
        logits.index_copy_(0, batch_rows, x)

    def record(self, tokens: torch.Tensor) -> None:
        """Counts the tokens just sampled (tokens: int64 [batch], the step's rows)."""
        sampled = tokens.index_select(0, self.batch_rows.tensor)
        ones = torch.ones_like(sampled, dtype=torch.int32)
        self.state.counts.index_put_((self.rows.tensor, sampled), ones, accumulate=True)

    def _refill(self) -> None:
        state, refill = self.state, self.refill_rows.tensor
        state.counts.index_fill_(0, refill, 0)
        state.in_prompt.index_fill_(0, refill, False)
        trash = state.counts.shape[1] - 1  # ids past the LM head
        prompt_rows, prompt_ids = self.prompt[0].tensor, self.prompt[1].tensor.clamp(0, trash)
        state.in_prompt.index_put_((prompt_rows, prompt_ids),
                                   torch.ones_like(prompt_ids, dtype=torch.bool))
        output_rows, output_ids = self.output[0].tensor, self.output[1].tensor.clamp(0, trash)
        state.counts.index_put_((output_rows, output_ids),
                                torch.ones_like(output_ids, dtype=torch.int32), accumulate=True)
