"""Typed reads of JSON request fields: each raises a 400 naming the field.

JSON booleans are not numbers here (Python's bool is an int subclass, but
`"n": true` is a client bug worth reporting)."""

from typing import Any, List, Mapping, Optional, Sequence

from pyvlm.engine.sampling_ranges import (LOGIT_BIAS, Bound, SamplingFieldError, check_field,
                                          checked, is_number)
from pyvlm.server.errors import invalid


def get_number(body: Mapping, name: str, default, bound: Bound):
    """body[name] checked against bound (type and range), or default when
    absent or null."""
    value = body.get(name)
    if value is None:
        return default
    try:
        return checked(name, value, bound)
    except SamplingFieldError as exc:
        raise invalid(str(exc), exc.param) from None


def get_float(body: Mapping, name: str, default: Optional[float], low: float,
              high: float) -> Optional[float]:
    """A number in [low, high], or default when absent or null."""
    value = get_number(body, name, default, Bound(low, high))
    return value if value is None else float(value)


def get_int(body: Mapping, name: str, default: Optional[int], low: int,
            high: Optional[int] = None) -> Optional[int]:
    """An integer >= low (and <= high), or default when absent or null."""
    return get_number(body, name, default, Bound(low, high, integer=True))


def get_sampling(body: Mapping, name: str, engine_name: Optional[str] = None):
    """A sampling field checked against pyvlm.engine.sampling_ranges (the
    engine's own table), or None when absent or null. engine_name: the
    engine's name for it when the API's differs (max_tokens -> max_new_tokens)."""
    value = body.get(name)
    if value is None:
        return None
    try:
        return check_field(engine_name or name, value, param=name)
    except SamplingFieldError as exc:
        raise invalid(str(exc), exc.param) from None


def get_bool(body: Mapping, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean", name)
    return value


def get_str(body: Mapping, name: str, default: Optional[str] = None) -> Optional[str]:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a string", name)
    return value


def get_object(body: Mapping, name: str) -> Mapping:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise invalid(f"'{name}' must be an object", name)
    return value


def get_stop(body: Mapping, name: str = "stop") -> List[str]:
    """A string or a list of non-empty strings."""
    value = body.get(name)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values):
        raise invalid(f"'{name}' must be a non-empty string or a list of them", name)
    return list(values)


def get_int_list(body: Mapping, name: str) -> List[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_token_id(t) for t in value):
        raise invalid(f"'{name}' must be a list of token ids", name)
    return list(value)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def get_logit_bias(body: Mapping, name: str = "logit_bias") -> dict:
    """{"token id": bias in [-100, 100]} as {int: float}."""
    value = get_object(body, name)
    bias = {}
    for key, amount in value.items():
        # isdigit() alone admits "²" and "፩", which int() refuses
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise invalid(f"'{name}' keys must be token ids, got {key!r:.40}", name)
        if not is_number(amount) or not LOGIT_BIAS.contains(amount):
            raise invalid(f"'{name}' values must be numbers in [-100, 100]", name)
        bias[int(key)] = float(amount)
    return bias


def is_token_ids(value: Any) -> bool:
    """A non-empty list of token ids."""
    return isinstance(value, list) and bool(value) and all(_is_token_id(t) for t in value)


def check_known(body: Mapping, known: Sequence[str]) -> None:
    from pyvlm.server.errors import unknown_field

    for name in body:
        if name not in known:
            raise unknown_field(name)
