"""SGLang-style sampling_params dicts -> validated SamplingParams, with the
checkpoint's generation_config.json supplying the defaults a request leaves
unset (vLLM's behaviour)."""

import logging
from typing import Any, Dict, Mapping, Optional

from pyvlm.engine.sampling_ranges import (BOUNDS, LOGIT_BIAS, SamplingFieldError, check_field,
                                          is_number)
from pyvlm.engine.types import SamplingParams

logger = logging.getLogger("pyvlm.engine")

_FIELDS = set(SamplingParams.__dataclass_fields__)
_ALIASES = {"max_tokens": "max_new_tokens", "sampling_seed": "seed"}
# What generation_config.json may set for requests (vLLM's list).
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                            "max_new_tokens")


_FLAGS = ("ignore_eos", "logprobs", "skip_special_tokens")


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    # Anything but a list is one value, which _check then judges (a float or
    # a dict must be refused, never iterated into something that passes).
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _check(values: Mapping[str, Any]) -> None:
    """Every field's type, and the range of the numeric ones (BOUNDS): what
    reaches the engine can never fail its step."""
    for name, value in values.items():
        if name in BOUNDS:
            check_field(name, value)
        elif name in _FLAGS and not isinstance(value, bool):
            raise SamplingFieldError(f"'{name}' must be a boolean", name)
    stop = values.get("stop", ())
    if not all(isinstance(s, str) and s for s in stop):
        raise SamplingFieldError("'stop' must be a non-empty string or a list of them", "stop")
    if not all(is_number(t) and t == int(t) and t >= 0 for t in values["stop_token_ids"]):
        raise SamplingFieldError("'stop_token_ids' must be a list of token ids", "stop_token_ids")


def _logit_bias(value) -> tuple:
    """{token id (int or its ASCII digits): bias in [-100, 100]} as pairs."""
    if not isinstance(value, Mapping):
        raise SamplingFieldError("'logit_bias' must map token ids to numbers", "logit_bias")
    pairs = []
    for key, bias in value.items():
        is_id = (isinstance(key, int) and not isinstance(key, bool) and key >= 0) or (
            isinstance(key, str) and key.isascii() and key.isdigit())
        if not is_id or not is_number(bias) or not LOGIT_BIAS.contains(bias):
            raise SamplingFieldError("'logit_bias' must map token ids to numbers in "
                                     "[-100, 100]", "logit_bias")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def sampling_params_from(params: Optional[Mapping[str, Any]],
                         defaults: Optional[Mapping[str, Any]] = None) -> SamplingParams:
    """Builds SamplingParams from a dict with SGLang/OpenAI names; raises
    ValueError (SamplingFieldError) naming an unknown field or an
    out-of-range value. defaults (see generation_defaults) fill the fields
    params leaves unset, before SamplingParams' own defaults."""
    values = dict(defaults or {})
    for key, value in (params or {}).items():
        key = _ALIASES.get(key, key)
        if key not in _FIELDS:
            raise SamplingFieldError(f"unknown sampling parameter {key!r}", key)
        if value is not None:
            values[key] = value
    values["stop"] = _as_tuple(values.get("stop"))
    values["stop_token_ids"] = _as_tuple(values.get("stop_token_ids"))
    _check(values)
    values["stop_token_ids"] = tuple(int(t) for t in values["stop_token_ids"])
    values["logit_bias"] = _logit_bias(values.get("logit_bias") or {})
    if values.get("top_k") == 0:
        values["top_k"] = -1
    return SamplingParams(**values)


def generation_defaults(generation_config: Mapping[str, Any]) -> Dict[str, Any]:
    """The request defaults a checkpoint's generation_config.json sets
    (GENERATION_CONFIG_FIELDS); values pyvlm would refuse are dropped with
    a warning rather than failing every request."""
    defaults = {}
    for name in GENERATION_CONFIG_FIELDS:
        value = generation_config.get(name)
        if value is None:
            continue
        try:
            defaults[name] = check_field(name, value)
        except SamplingFieldError as exc:
            logger.warning("ignoring generation_config.json %s: %s", name, exc)
    return defaults
