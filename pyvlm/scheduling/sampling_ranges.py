"""The rules every sampling field must meet, in one place (no torch): the
range of each numeric field, and the shapes of stop, stop_token_ids,
logit_bias and the boolean flags.

Both front doors check against these rules: the OpenAI server
(pyvlm/server/fields.py, a 400 naming the field) and the offline Engine
(pyvlm/entrypoints/sampling.py, a ValueError naming the field); a rule
raises SamplingFieldError, whose message and `param` both name the field.
The bounds are OpenAI's where OpenAI has one (temperature <= 2, penalties in
[-2, 2], logit bias in [-100, 100], at most 20 top logprobs), SGLang's
otherwise.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple


class SamplingFieldError(ValueError):
    """A sampling field has the wrong type or is out of range; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Bound:
    """A closed or half-open interval; high None means unbounded above."""

    low: float
    high: Optional[float] = None
    low_open: bool = False
    integer: bool = False

    def contains(self, value: float) -> bool:
        above_low = value > self.low if self.low_open else value >= self.low
        return above_low and (self.high is None or value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            return f"greater than {self.low:g}" if self.low_open else f"at least {self.low:g}"
        if self.low_open:
            return f"greater than {self.low:g} and at most {self.high:g}"
        return f"between {self.low:g} and {self.high:g}"


MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1

# Engine field name -> its bound. top_k also accepts -1 and 0 (both: no limit).
BOUNDS = {
    "max_new_tokens": Bound(1, integer=True),
    "temperature": Bound(0.0, 2.0),
    "top_p": Bound(0.0, 1.0, low_open=True),
    "top_k": Bound(1, integer=True),
    "min_p": Bound(0.0, 1.0),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "repetition_penalty": Bound(0.0, 2.0, low_open=True),
    "top_logprobs": Bound(0, MAX_TOP_LOGPROBS, integer=True),
    "seed": Bound(0, MAX_SEED, integer=True),
}
LOGIT_BIAS = Bound(-100.0, 100.0)
TOP_K_OFF = (-1, 0)


def is_number(value: Any) -> bool:
    """int or float but not bool (`"n": true` is a client bug worth reporting)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checked(name: str, value: Any, bound: Bound, param: Optional[str] = None):
    """value if it has the bound's type and lies inside it; else
    SamplingFieldError naming `param` (default: name)."""
    param = param or name
    if bound.integer and not (isinstance(value, int) and not isinstance(value, bool)):
        raise SamplingFieldError(f"'{param}' must be an integer", param)
    if not is_number(value) or not math.isfinite(value):
        raise SamplingFieldError(f"'{param}' must be a number", param)
    if not bound.contains(value):
        raise SamplingFieldError(f"'{param}' must be {bound.describe()}, got {value:g}", param)
    return value


def check_field(name: str, value: Any, param: Optional[str] = None):
    """Checks the engine field `name` (see BOUNDS); returns the value."""
    if name == "top_k" and value in TOP_K_OFF and not isinstance(value, bool):
        return value
    return checked(name, value, BOUNDS[name], param)


def is_token_id(value: Any) -> bool:
    """A non-negative int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checked_flag(value: Any, param: str) -> bool:
    """value if it is a bool (ignore_eos, logprobs, skip_special_tokens, ...)."""
    if not isinstance(value, bool):
        raise SamplingFieldError(f"'{param}' must be a boolean", param)
    return value


def checked_stop(value: Any, param: str = "stop") -> Tuple[str, ...]:
    """A non-empty string or a list of them, as a tuple."""
    values = (value,) if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(s, str) and s for s in values):
        raise SamplingFieldError(f"'{param}' must be a non-empty string or a list of them", param)
    return tuple(values)


def checked_token_ids(value: Any, param: str) -> Tuple[int, ...]:
    """A list of token ids (possibly empty), as a tuple."""
    if not isinstance(value, (list, tuple)) or not all(is_token_id(t) for t in value):
        raise SamplingFieldError(f"'{param}' must be a list of token ids", param)
    return tuple(value)


def _is_token_id_key(key: Any) -> bool:
    # JSON object keys are strings; isdigit() alone admits "²" and "፩",
    # which int() refuses, hence isascii().
    return is_token_id(key) or (isinstance(key, str) and key.isascii() and key.isdigit())


def checked_logit_bias(value: Any, param: str = "logit_bias") -> Dict[int, float]:
    """{token id (an int or its ASCII digits): bias in [-100, 100]} as {int: float}."""
    if not isinstance(value, Mapping):
        raise SamplingFieldError(f"'{param}' must be an object mapping token ids to numbers",
                                 param)
    bias = {}
    for key, amount in value.items():
        if not _is_token_id_key(key):
            raise SamplingFieldError(f"'{param}' keys must be token ids, got {key!r:.40}", param)
        if not is_number(amount) or not LOGIT_BIAS.contains(amount):
            raise SamplingFieldError(f"'{param}' values must be numbers in "
                                     f"[{LOGIT_BIAS.low:g}, {LOGIT_BIAS.high:g}]", param)
        bias[int(key)] = float(amount)
    return bias
