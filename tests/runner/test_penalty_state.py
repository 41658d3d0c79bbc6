"""Penalties from the runner's device state equal, at every step, the
extension's apply_penalties op fed the whole token lists (bit for bit) and
its float64 reference, while requests join, leave, come back recomputed
and outnumber the state's first rows."""

import random

import torch

from pyvlm import ops
from pyvlm.ops.host_upload import HostUpload
from pyvlm.ops.reference import apply_penalties as reference_penalties
from pyvlm.runner.penalty_state import PenaltyState
from pyvlm.scheduling.types import SamplingParams, SequenceChunk
from tests.runner.test_sampler import penalty_rows

VOCAB = 50


def chunk(rid, params, prompt, output) -> SequenceChunk:
    return SequenceChunk(rid=rid, token_ids=[1], start_pos=0, positions=[[0]], page_table=[0],
                         mm_items=[], sample=True, sampling=params, seed=0, step=len(output),
                         prompt_ids=list(prompt), output_ids=list(output))


def from_scratch(logits, chunks, op=ops.apply_penalties):
    """The op on each chunk's whole prompt and output lists (ids past the
    vocabulary have no logit to penalize: left out)."""
    chunks = [chunk(c.rid, c.sampling, [t for t in c.prompt_ids if t < VOCAB], c.output_ids)
              for c in chunks]
    ids, counts, offsets = penalty_rows(chunks)
    f32 = lambda values: torch.tensor(values, dtype=torch.float32)  # noqa: E731
    no_bias = torch.zeros(len(chunks) + 1, dtype=torch.int32)
    return op(
        logits.clone(), torch.tensor(ids, dtype=torch.int64),
        torch.tensor(counts, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int32),
        f32([c.sampling.presence_penalty for c in chunks]),
        f32([c.sampling.frequency_penalty for c in chunks]),
        f32([c.sampling.repetition_penalty for c in chunks]),
        torch.empty(0, dtype=torch.int64), torch.empty(0), no_bias).float()


def random_params(rng) -> SamplingParams:
    return SamplingParams(repetition_penalty=rng.choice([1.0, 1.3, 0.7]),
                          presence_penalty=rng.choice([0.0, 0.5, -0.4]),
                          frequency_penalty=rng.choice([0.25, 0.0, -0.1]))


def test_incremental_state_equals_the_reference_every_step():
    rng = random.Random()
    state = PenaltyState(initial_rows=2)
    requests = {}  # rid -> (params, prompt, outputs)
    next_id = 0
    for step in range(40):
        if len(requests) < 6 and rng.random() < 0.4:  # an arrival (prompt ids may pass the vocab)
            requests[f"r{next_id}"] = (random_params(rng),
                                       [rng.randrange(VOCAB + 3) for _ in range(rng.randint(1, 12))],
                                       [])
            next_id += 1
        if requests and rng.random() < 0.15:  # a request finishes
            del requests[rng.choice(sorted(requests))]
        if not requests:
            continue
        if rng.random() < 0.1:  # a preempted request recomputed: its step comes again
            rid = rng.choice(sorted(requests))
            params, prompt, outputs = requests[rid]
            if outputs:
                outputs.pop()
        running = sorted(requests)
        rng.shuffle(running)
        batch = [chunk(rid, *requests[rid]) for rid in running]
        logits = torch.randn(len(batch) + 1, VOCAB)  # one row unpenalized (not staged)
        upload = HostUpload()
        staged = state.stage(batch, list(range(1, len(batch) + 1)), upload)
        upload.to("cpu")
        got = logits.clone()
        staged.apply(got)
        expected = torch.cat([logits[:1], from_scratch(logits[1:], batch)])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        reference = torch.cat([logits[:1], from_scratch(logits[1:], batch, reference_penalties)])
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
        tokens = torch.randint(0, VOCAB, (len(batch) + 1,))
        staged.record(tokens)
        for rid, token in zip(running, tokens[1:].tolist()):
            requests[rid][2].append(token)
    assert state.counts.shape[0] > 2  # it grew past its first rows


def test_a_row_no_request_of_the_step_holds_is_reused():
    state = PenaltyState(initial_rows=2)
    params = SamplingParams(repetition_penalty=1.5)
    for rids in (["a", "b"], ["c"], ["d", "c"]):
        upload = HostUpload()
        staged = state.stage([chunk(rid, params, [1, 2], []) for rid in rids],
                             list(range(len(rids))), upload)
        upload.to("cpu")
        staged.apply(torch.randn(len(rids), VOCAB))
    assert state.counts.shape[0] == 2  # "c" and "d" took the rows of "a" and "b"
