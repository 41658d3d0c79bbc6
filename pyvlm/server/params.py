"""OpenAI request fields shared by /v1/chat/completions and /v1/completions
-> the engine's sampling_params dict plus how to answer (n, stream, ...)."""

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from pyvlm.server import fields
from pyvlm.server.errors import invalid, unsupported_field

MAX_N = 128
MAX_TOP_LOGPROBS = 20

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop",
                   "stop_token_ids", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "logit_bias", "stream", "stream_options", "ignore_eos",
                   "skip_special_tokens", "user", "model")


@dataclass(frozen=True)
class AnswerSpec:
    """How to run and answer one request (beyond the sampling params)."""

    n: int
    stream: bool
    include_usage: bool
    num_top_logprobs: Optional[int]  # None: no logprobs
    seed: Optional[int]


def sampling_params(body: Mapping, max_tokens: Optional[int], context_length: int,
                    vocab_size: int, template_stop: Tuple[str, ...] = ()) -> dict:
    """The engine's sampling_params for an OpenAI body (values checked)."""
    bias = fields.get_logit_bias(body)
    if any(token_id >= vocab_size for token_id in bias):
        raise invalid(f"'logit_bias' has a token id outside the vocabulary (size {vocab_size})",
                      "logit_bias")
    stop = fields.get_stop(body)
    return {
        "max_new_tokens": max_tokens if max_tokens is not None else context_length,
        "temperature": fields.get_float(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _top_p(body),
        "top_k": clamp_top_k(fields.get_int(body, "top_k", -1, -1), vocab_size),
        "min_p": fields.get_float(body, "min_p", 0.0, 0.0, 1.0),
        "stop": stop + [s for s in template_stop if s not in stop],
        "stop_token_ids": fields.get_int_list(body, "stop_token_ids"),
        "presence_penalty": fields.get_float(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": fields.get_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "repetition_penalty": _repetition_penalty(body),
        "logit_bias": bias,
        "ignore_eos": fields.get_bool(body, "ignore_eos", False),
        "skip_special_tokens": fields.get_bool(body, "skip_special_tokens", True),
    }


def clamp_top_k(top_k: int, vocab_size: int) -> int:
    """top_k at most the vocabulary size (the same sampling): the engine
    keeps top_k in int32, and 2**31 failed its whole step."""
    return min(top_k, vocab_size)


def _top_p(body: Mapping) -> float:
    value = fields.get_float(body, "top_p", 1.0, 0.0, 1.0)
    if value == 0.0:
        raise invalid("'top_p' must be greater than 0", "top_p")
    return value


def _repetition_penalty(body: Mapping) -> float:
    value = fields.get_float(body, "repetition_penalty", 1.0, 0.0, 2.0)
    if value == 0.0:
        raise invalid("'repetition_penalty' must be greater than 0", "repetition_penalty")
    return value


def answer_spec(body: Mapping, num_top_logprobs: Optional[int]) -> AnswerSpec:
    stream = fields.get_bool(body, "stream", False)
    options = fields.get_object(body, "stream_options")
    if options and not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    for name in options:
        if name != "include_usage":
            raise unsupported_field(f"stream_options.{name}")
    fields.get_str(body, "user")
    return AnswerSpec(n=fields.get_int(body, "n", 1, 1, MAX_N), stream=stream,
                      include_usage=fields.get_bool(options, "include_usage", False),
                      num_top_logprobs=num_top_logprobs,
                      seed=fields.get_int(body, "seed", None, 0, 2**63 - 1))


def choice_sampling(sampling: dict, spec: AnswerSpec, index: int) -> dict:
    """Choice `index`'s params: with a seed, choice i samples with seed + i,
    so n > 1 gives different samples that are still reproducible."""
    params = dict(sampling)
    if spec.seed is not None:
        params["seed"] = (spec.seed + index) % 2**63
    if spec.num_top_logprobs is not None:
        params["logprobs"], params["top_logprobs"] = True, spec.num_top_logprobs
    return params


def check_model(body: Mapping, served_name: str) -> None:
    """`model` must be the served name or "default" (absent is allowed)."""
    from pyvlm.server.errors import ApiError

    name = fields.get_str(body, "model")
    if name is not None and name not in (served_name, "default"):
        raise ApiError(404, f"The model '{name}' does not exist; this server serves "
                            f"'{served_name}'", "model", "model_not_found")
