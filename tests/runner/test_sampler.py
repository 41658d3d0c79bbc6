"""The runner's sampler: SequenceChunks -> extension op arguments."""

import itertools

import torch

from pyvlm.scheduling.types import SamplingParams, SequenceChunk
from pyvlm.ops.reference import apply_penalties as apply_penalties_reference
from pyvlm.runner import sampler

_rids = itertools.count()


def _chunk(sampling: SamplingParams, prompt=(), output=(), seed=0, step=0,
           rid=None) -> SequenceChunk:
    return SequenceChunk(rid=rid or f"r{next(_rids)}", token_ids=[1], start_pos=0, positions=[[0]], page_table=[0],
                         mm_items=[], sample=True, sampling=sampling, seed=seed, step=step,
                         prompt_ids=list(prompt), output_ids=list(output))


def test_greedy_rows_take_the_argmax_and_report_logprobs():
    logits = torch.randn(5, 300)
    chunks = [_chunk(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3))
              for _ in range(5)]
    results = sampler.sample(logits.clone(), chunks)
    log_softmax = logits.log_softmax(-1)
    for row, result in enumerate(results):
        assert result.token_id == int(logits[row].argmax())
        assert abs(result.logprob - float(log_softmax[row, result.token_id])) < 1e-5
        top = log_softmax[row].topk(3)
        assert [t for t, _ in result.top_logprobs] == top.indices.tolist()


def test_top_k_one_is_greedy_even_with_a_temperature():
    logits = torch.randn(3, 100)
    chunks = [_chunk(SamplingParams(temperature=1.5, top_k=1), seed=s) for s in range(3)]
    assert [r.token_id for r in sampler.sample(logits.clone(), chunks)] == \
        logits.argmax(-1).tolist()


def test_seeded_draws_depend_on_seed_and_step_only():
    logits = torch.randn(1, 500)
    params = SamplingParams(temperature=1.0, seed=7)
    alone = sampler.sample(logits.clone(), [_chunk(params, seed=7, step=3)])[0].token_id
    batch = torch.cat([torch.randn(2, 500), logits])
    chunks = [_chunk(params, seed=1), _chunk(params, seed=2), _chunk(params, seed=7, step=3)]
    assert sampler.sample(batch, chunks)[2].token_id == alone


def penalty_rows(chunks):
    """The extension op's CSR rows: distinct prompt/output ids, output counts."""
    ids, counts, offsets = [], [], [0]
    for chunk in chunks:
        row = dict.fromkeys(list(chunk.prompt_ids) + list(chunk.output_ids))
        ids.extend(row)
        counts.extend(list(chunk.output_ids).count(t) for t in row)
        offsets.append(len(ids))
    return ids, counts, offsets


def test_penalties_match_the_reference():
    vocab = 64
    logits = torch.randn(2, vocab)
    prompts = [torch.randint(0, vocab, (10,)).tolist() for _ in range(2)]
    outputs = [torch.randint(0, vocab, (6,)).tolist() for _ in range(2)]
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5,
                             frequency_penalty=0.25, logit_bias=((3, 2.0), (5, -1.0))),
              SamplingParams(repetition_penalty=0.8)]
    chunks = [_chunk(p, prompt, out) for p, prompt, out in zip(params, prompts, outputs)]
    got = logits.clone()
    sampler.apply_penalties(got, chunks)
    ids, counts, offsets = penalty_rows(chunks)
    bias_ids, bias_values, bias_offsets = sampler._bias_rows(chunks)
    expected = apply_penalties_reference(
        logits.clone(), torch.tensor(ids), torch.tensor(counts, dtype=torch.int32),
        torch.tensor(offsets, dtype=torch.int32),
        torch.tensor([0.5, 0.0]), torch.tensor([0.25, 0.0]), torch.tensor([1.3, 0.8]),
        torch.tensor(bias_ids), torch.tensor(bias_values),
        torch.tensor(bias_offsets, dtype=torch.int32))
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
    # The CSR rows list each distinct prompt/output token once with its output count.
    assert sorted(ids[offsets[0]:offsets[1]]) == sorted(set(prompts[0] + outputs[0]))
    for token, count in zip(ids[offsets[0]:offsets[1]], counts[offsets[0]:offsets[1]]):
        assert count == outputs[0].count(token)


def test_no_penalty_leaves_logits_untouched():
    logits = torch.randn(2, 50)
    before = logits.clone()
    sampler.apply_penalties(logits, [_chunk(SamplingParams()), _chunk(SamplingParams())])
    assert torch.equal(logits, before)
