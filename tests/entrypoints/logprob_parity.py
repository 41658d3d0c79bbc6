"""The engine's per-step log-probabilities against transformers',
teacher-forced on the engine's own tokens: transformers predicts each step
from the prompt and the tokens the engine chose before it. Unlike comparing
two free-running greedy generations, a rounding flip between two near-tied
tokens cannot make the rest of the comparison meaningless (or fail it)."""

from typing import Mapping, Optional, Sequence

import torch

from tests.hf_reference import prefill_logits


def teacher_forced_logprobs(hf_model, image_processor, prompt_ids: Sequence[int], images,
                            output_ids: Sequence[int],
                            logit_bias: Optional[Mapping[int, float]] = None) -> torch.Tensor:
    """transformers' float64 log-probabilities [len(output_ids), vocab]: row j
    is what it predicts after prompt_ids and output_ids[:j], with the same
    logit bias the engine was given."""
    ids = list(prompt_ids) + list(output_ids[:-1])
    logits = prefill_logits(hf_model, image_processor, ids, images)[len(prompt_ids) - 1:]
    logits = logits.double().cpu()
    for token_id, bias in (logit_bias or {}).items():
        logits[:, token_id] += bias
    return logits.log_softmax(-1)


def assert_logprobs_near(result: dict, expected: torch.Tensor, tolerance: float,
                         num_top: int) -> None:
    """Each step's top-num_top log-probabilities (result from Engine.generate
    with logprobs and top_logprobs=num_top) are within tolerance of
    transformers' at the same ids, and each greedy token is transformers'
    best up to the rounding of two logits."""
    output_ids, tops = result["output_ids"], result["meta_info"]["output_top_logprobs"]
    assert len(tops) == len(output_ids) == expected.shape[0]
    for step, (token, top) in enumerate(zip(output_ids, tops)):
        row = expected[step]
        assert len(top) == num_top
        error = max(abs(logprob - row[token_id].item()) for token_id, logprob in top)
        assert error <= tolerance, f"step {step}: log-probabilities differ by {error:.3g}"
        assert row[token] >= row.max() - 2 * tolerance, f"step {step}: token {token} is not greedy"
