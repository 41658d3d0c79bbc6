"""OpenAI request fields shared by /v1/chat/completions and /v1/completions
-> the engine's sampling_params dict plus how to answer (n, stream, ...)."""

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from pyvlm.server import fields
from pyvlm.server.errors import invalid, unsupported_field

MAX_N = 128

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


# Sampling fields with the same name in the API and the engine, passed on as sent.
PASSED_THROUGH = ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                  "frequency_penalty", "repetition_penalty")


def sampling_params(body: Mapping, max_tokens: Optional[int], context_length: int,
                    vocab_size: int, template_stop: Tuple[str, ...] = ()) -> dict:
    """The engine's sampling_params for an OpenAI body (values checked
    against pyvlm.scheduling.sampling_ranges). Fields the client left out are
    left out, so the engine applies the checkpoint's generation_config
    defaults (vLLM's behaviour) and then its own."""
    bias = fields.get_logit_bias(body)
    if any(token_id >= vocab_size for token_id in bias):
        raise invalid(f"'logit_bias' has a token id outside the vocabulary (size {vocab_size})",
                      "logit_bias")
    stop = fields.get_stop(body)
    params = {name: value for name in PASSED_THROUGH
              for value in [fields.get_sampling(body, name)] if value is not None}
    return dict(params,
                max_new_tokens=max_tokens if max_tokens is not None else context_length,
                stop=stop + [s for s in template_stop if s not in stop],
                stop_token_ids=fields.get_token_ids(body, "stop_token_ids"),
                logit_bias=bias,
                ignore_eos=fields.get_bool(body, "ignore_eos", False),
                skip_special_tokens=fields.get_bool(body, "skip_special_tokens", True))


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
                      seed=fields.get_sampling(body, "seed"))


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
