"""Typed reads of JSON request fields: each raises a 400 naming the field.

JSON booleans are not numbers here (Python's bool is an int subclass, but
`"n": true` is a client bug worth reporting)."""

from typing import Any, Callable, List, Mapping, Optional, Sequence

from pyvlm.scheduling.sampling_ranges import (Bound, SamplingFieldError, check_field, checked,
                                          checked_flag, checked_logit_bias, checked_stop,
                                          checked_token_ids, is_token_id)
from pyvlm.server.errors import invalid


def _read(body: Mapping, name: str, rule: Callable[[Any], Any]):
    """rule(body[name]), or None when absent or null; the rule's
    SamplingFieldError (see pyvlm.scheduling.sampling_ranges) becomes a 400
    naming the field."""
    value = body.get(name)
    if value is None:
        return None
    try:
        return rule(value)
    except SamplingFieldError as exc:
        raise invalid(str(exc), exc.param) from None


def get_int(body: Mapping, name: str, default: Optional[int], low: int,
            high: Optional[int] = None) -> Optional[int]:
    """An integer >= low (and <= high), or default when absent or null."""
    value = _read(body, name, lambda v: checked(name, v, Bound(low, high, integer=True)))
    return default if value is None else value


def get_sampling(body: Mapping, name: str, engine_name: Optional[str] = None):
    """A sampling field checked against pyvlm.scheduling.sampling_ranges (the
    engine's own table), or None when absent or null. engine_name: the
    engine's name for it when the API's differs (max_tokens -> max_new_tokens)."""
    return _read(body, name, lambda v: check_field(engine_name or name, v, param=name))


def get_bool(body: Mapping, name: str, default: bool) -> bool:
    value = _read(body, name, lambda v: checked_flag(v, name))
    return default if value is None else value


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
    return list(_read(body, name, lambda v: checked_stop(v, name)) or ())


def get_token_ids(body: Mapping, name: str) -> List[int]:
    """A list of token ids, [] when absent or null."""
    return list(_read(body, name, lambda v: checked_token_ids(v, name)) or ())


def get_logit_bias(body: Mapping, name: str = "logit_bias") -> dict:
    """{"token id": bias in [-100, 100]} as {int: float}."""
    return _read(body, name, lambda v: checked_logit_bias(v, name)) or {}


def is_token_ids(value: Any) -> bool:
    """A non-empty list of token ids."""
    return isinstance(value, list) and bool(value) and all(is_token_id(t) for t in value)


def check_known(body: Mapping, known: Sequence[str]) -> None:
    from pyvlm.server.errors import unknown_field

    for name in body:
        if name not in known:
            raise unknown_field(name)
