"""SGLang-style sampling_params dicts -> validated SamplingParams, with the
checkpoint's generation_config.json supplying the defaults a request leaves
unset (vLLM's behaviour)."""

import logging
from typing import Any, Dict, Mapping, Optional

from pyvlm.scheduling.sampling_ranges import (BOUNDS, SamplingFieldError, check_field, checked_flag,
                                          checked_logit_bias, checked_stop, checked_token_ids)
from pyvlm.scheduling.types import SamplingParams

logger = logging.getLogger("pyvlm.engine")

_FIELDS = set(SamplingParams.__dataclass_fields__)
_ALIASES = {"max_tokens": "max_new_tokens", "sampling_seed": "seed"}
_FLAGS = ("ignore_eos", "logprobs", "skip_special_tokens")
# What generation_config.json may set for requests (vLLM's list).
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                            "max_new_tokens")


def _checked(values: Dict[str, Any]) -> Dict[str, Any]:
    """Every field checked against pyvlm.scheduling.sampling_ranges (types and
    ranges: what reaches the engine can never fail its step), in
    SamplingParams' own types."""
    for name, value in values.items():
        if name in BOUNDS:
            check_field(name, value)
        elif name in _FLAGS:
            checked_flag(value, name)
    stop = checked_stop(values.get("stop", ()))
    stop_token_ids = checked_token_ids(values.get("stop_token_ids", ()), "stop_token_ids")
    bias = checked_logit_bias(values.get("logit_bias", {}))
    return dict(values, stop=stop, stop_token_ids=stop_token_ids, logit_bias=tuple(bias.items()))


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
    values = _checked(values)
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
