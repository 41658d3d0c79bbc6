"""SGLang-style sampling_params dicts -> validated SamplingParams."""

from typing import Any, Mapping, Optional

from pyvlm.engine.types import SamplingParams

_FIELDS = set(SamplingParams.__dataclass_fields__)
_ALIASES = {"max_tokens": "max_new_tokens", "sampling_seed": "seed"}


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    return (value,) if isinstance(value, (str, int)) else tuple(value)


def _check_ranges(p: SamplingParams) -> None:
    checks = [
        (p.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
        (p.temperature >= 0.0, "temperature must be >= 0"),
        (0.0 < p.top_p <= 1.0, "top_p must be in (0, 1]"),
        (p.top_k == -1 or p.top_k >= 0, "top_k must be -1 (off) or >= 0"),
        (0.0 <= p.min_p <= 1.0, "min_p must be in [0, 1]"),
        (-2.0 <= p.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
        (-2.0 <= p.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
        (0.0 < p.repetition_penalty <= 2.0, "repetition_penalty must be in (0, 2]"),
        (0 <= p.top_logprobs <= 20, "top_logprobs must be in [0, 20]"),
        (all(s for s in p.stop), "stop strings must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def sampling_params_from(params: Optional[Mapping[str, Any]]) -> SamplingParams:
    """Builds SamplingParams from a dict with SGLang/OpenAI names; raises
    ValueError naming an unknown field or an out-of-range value."""
    values = {}
    for key, value in (params or {}).items():
        key = _ALIASES.get(key, key)
        if key not in _FIELDS:
            raise ValueError(f"unknown sampling parameter {key!r}")
        if value is not None:
            values[key] = value
    values["stop"] = _as_tuple(values.get("stop"))
    values["stop_token_ids"] = tuple(int(t) for t in _as_tuple(values.get("stop_token_ids")))
    bias = values.get("logit_bias") or {}
    values["logit_bias"] = tuple((int(k), float(v)) for k, v in dict(bias).items())
    if values.get("top_k") == 0:
        values["top_k"] = -1
    params = SamplingParams(**values)
    _check_ranges(params)
    return params
