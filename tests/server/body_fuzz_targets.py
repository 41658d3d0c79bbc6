"""Arbitrary JSON bodies for the generation endpoints, and what the App must
answer them: shared by tests/server/test_body_fuzz.py (short) and
benchmarks/fuzz.py (long).

The bodies mix the endpoints' real field names (mostly plausible values,
sometimes any JSON: huge integers, floats, booleans in number slots, nested
garbage) with random keys; chat messages get random roles, contents and
parts, image_url parts random strings or tiny valid data: URIs. Bodies are
serialised with the standard library (it writes integers beyond 64 bits and
NaN/Infinity, which orjson refuses), and some are raw bytes: truncated,
deeply nested, not UTF-8.

Generation is kept short: a body that can pass validation always carries a
length limit of 1-3 tokens or an invalid one (never null, which would mean
"up to the context length").

The property (`check_answer`): the status is 2xx or 4xx, never 5xx; a 4xx
body is exactly {"error": {"message", "type", "param", "code"}}; a stream
ends in [DONE] or an `error` event that is not an internal error; nothing
was logged at ERROR level; no admission slot is left held.
"""

import base64
import io
import json
import logging
from typing import Dict, List, Optional

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from tests.server.conftest import acall

CHAT, COMPLETIONS, GENERATE = "/v1/chat/completions", "/v1/completions", "/generate"
ENDPOINTS = (CHAT, COMPLETIONS, GENERATE)
NORMAL_REQUEST = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                  "temperature": 0}

# ---- leaves ----------------------------------------------------------------
huge_ints = (st.integers(min_value=2**63 - 2, max_value=2**70)
             | st.integers(min_value=-(2**70), max_value=-(2**63) + 2))
# JSON has no NaN or Infinity: the stdlib writes them anyway (the server must
# refuse them as invalid JSON), 1e400 overflows to Infinity, 5e-324 is subnormal.
odd_floats = st.sampled_from([-0.0, 5e-324, 1e308, -1e308, float(2**53 + 1), 1e400,
                              float("nan"), float("-inf")])
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.one_of(st.integers(-3, 3), st.integers(), huge_ints, finite_floats, odd_floats,
                    st.booleans())
short_text = st.text(max_size=12)
scalars = st.one_of(st.none(), st.booleans(), numbers, short_text)
garbage = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(short_text, inner, max_size=3), max_leaves=6)
not_null = garbage.filter(lambda value: value is not None)


def sometimes(valid, invalid=garbage, one_in: int = 8):
    """`valid`, except one time in `one_in` `invalid` (anything, by default).
    The invalid branch is the last choice: hypothesis starts from, and
    shrinks towards, the first one."""
    return st.integers(1, one_in).flatmap(lambda draw: invalid if draw == one_in else valid)


# A length limit that either caps generation at 1-3 tokens or is refused,
# never null (that would mean "up to the context length").
length_limit = sometimes(st.integers(1, 3), st.one_of(
    st.integers(max_value=0), huge_ints, finite_floats, odd_floats, st.booleans(), short_text,
    st.lists(st.integers(), max_size=2), st.dictionaries(short_text, scalars, max_size=2)))
unit_float = st.floats(0, 1) | st.sampled_from([0, 1])
token_ids = sometimes(st.lists(st.integers(0, 383), min_size=1, max_size=6),
                      st.lists(st.integers(-2, 2**64), max_size=6))  # the vocabulary is 384
stops = st.one_of(st.text(min_size=1, max_size=6), st.lists(st.text(min_size=1, max_size=6),
                                                            max_size=3))
# Digits of every Unicode kind: "²".isdigit() is True but int("²") fails.
numeric_text = st.text(st.characters(categories=("Nd", "No", "Nl")), min_size=1, max_size=3)
logit_bias = st.dictionaries(st.integers(0, 400).map(str) | numeric_text | short_text,
                             st.floats(-100, 100) | numbers, max_size=3)
big_or_small_ints = st.integers(-1, 60) | st.integers(-1, 2**63 - 1)

# ---- images and messages -----------------------------------------------------


def png_data_uri(height: int, width: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


tiny_pngs = st.builds(png_data_uri, st.integers(1, 8), st.integers(1, 8), st.integers(0, 2**32))
broken_data_uris = st.builds(lambda kind, payload: f"data:image/{kind};base64,{payload}",
                             st.sampled_from(["png", "jpeg", "gif", "x"]),
                             st.text("ABCDEFGHab+/=0-_ \n", max_size=24))
# No random string may be an http(s) URL: fetching one would leave the machine.
local_strings = short_text.filter(lambda s: not s.lower().lstrip().startswith(("http:", "https:")))
image_urls = sometimes(tiny_pngs, st.one_of(
    broken_data_uris, local_strings, garbage,
    st.sampled_from(["http://127.0.0.1:1/a.png", "https://10.0.0.1/x.jpg", "file:///etc/passwd",
                     "/etc/hostname", "ftp://a/b", "data:,", "data:image/png;base64,"])), 3)
image_part = st.fixed_dictionaries(
    {"type": st.just("image_url"),
     "image_url": sometimes(st.fixed_dictionaries(
         {"url": image_urls},
         optional={"detail": sometimes(st.sampled_from(["auto", "low", "high"]))}))})
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": sometimes(short_text)})
parts = sometimes(text_part | image_part,
                  st.fixed_dictionaries({"type": short_text | garbage}) | garbage)
contents = sometimes(short_text | st.lists(parts, max_size=3), st.none() | garbage)
roles = sometimes(st.sampled_from(["system", "user", "assistant"]), short_text | garbage)
messages = st.fixed_dictionaries({"role": roles, "content": contents},
                                 optional={"name": sometimes(short_text)})
messages_lists = sometimes(st.lists(sometimes(messages), min_size=1, max_size=3),
                           st.just([]) | garbage)


# ---- bodies -------------------------------------------------------------------


def body_with(required: Dict, optional: Dict):
    """A dict with `required` and a random subset of `optional` fields, and
    now and then a random key (an unknown field is a 400 on its own)."""
    known = st.fixed_dictionaries(required, optional=optional)
    extra = sometimes(st.just({}), st.dictionaries(short_text, garbage, min_size=1, max_size=2))
    return st.tuples(extra, known).map(lambda pair: {**pair[0], **pair[1]})


OPENAI_SAMPLING = {
    "temperature": sometimes(st.floats(0, 2) | st.integers(0, 2)),
    "top_p": sometimes(st.floats(0.01, 1)), "top_k": sometimes(big_or_small_ints),
    "min_p": sometimes(unit_float), "n": sometimes(st.integers(1, 2)),
    "stop": sometimes(stops), "stop_token_ids": sometimes(token_ids),
    "seed": sometimes(st.integers(0, 2**63 - 1), st.integers(2**63, 2**64) | garbage),
    "presence_penalty": sometimes(st.floats(-2, 2)),
    "frequency_penalty": sometimes(st.floats(-2, 2)),
    "repetition_penalty": sometimes(st.floats(0.01, 2)), "logit_bias": sometimes(logit_bias),
    "stream": sometimes(st.booleans()),
    "ignore_eos": sometimes(st.booleans()), "skip_special_tokens": sometimes(st.booleans()),
    "user": sometimes(short_text), "model": sometimes(st.sampled_from(["tiny", "default"])),
}
chat_fields = dict(OPENAI_SAMPLING, logprobs=sometimes(st.booleans()),
                   top_logprobs=sometimes(st.integers(0, 20)),
                   stream_options=sometimes(st.fixed_dictionaries(
                       {}, optional={"include_usage": sometimes(st.booleans())})),
                   tools=sometimes(st.just([])), tool_choice=sometimes(st.just("none")),
                   response_format=sometimes(st.just({"type": "text"})),
                   modalities=sometimes(st.just(["text"])), store=sometimes(st.just(False)))
chat_bodies = st.one_of(body_with({"messages": messages_lists, "max_tokens": length_limit},
                                  chat_fields),
                        body_with({"messages": messages_lists,
                                   "max_completion_tokens": length_limit}, chat_fields))
prompts = sometimes(st.one_of(short_text, token_ids, st.lists(short_text | token_ids,
                                                              min_size=1, max_size=3)))
completion_bodies = body_with(
    {"prompt": prompts, "max_tokens": length_limit},
    dict(OPENAI_SAMPLING, logprobs=sometimes(st.integers(0, 20)), echo=sometimes(st.just(False)),
         suffix=sometimes(st.none()), best_of=sometimes(st.just(1))))
native_sampling = body_with({"max_new_tokens": length_limit}, {
    "temperature": sometimes(st.floats(0, 2)), "top_p": sometimes(st.floats(0.01, 1)),
    "top_k": sometimes(big_or_small_ints), "min_p": sometimes(unit_float),
    "seed": sometimes(st.integers(0, 2**63 - 1), st.integers(2**63, 2**64) | garbage),
    "stop": sometimes(stops), "stop_token_ids": sometimes(token_ids),
    "ignore_eos": sometimes(st.booleans()), "presence_penalty": sometimes(st.floats(-2, 2)),
    "frequency_penalty": sometimes(st.floats(-2, 2)),
    "repetition_penalty": sometimes(st.floats(0.01, 2)), "logit_bias": sometimes(logit_bias),
    "logprobs": sometimes(st.booleans()), "top_logprobs": sometimes(st.integers(0, 20)),
    "skip_special_tokens": sometimes(st.booleans())})
native_fields = {"stream": sometimes(st.booleans()), "rid": sometimes(short_text),
                 "return_logprob": sometimes(st.booleans()),
                 "top_logprobs_num": sometimes(st.integers(0, 20))}
generate_bodies = st.one_of(
    body_with({"text": sometimes(short_text), "sampling_params": sometimes(native_sampling, not_null)},
              dict(native_fields, image_data=sometimes(image_urls | st.lists(image_urls,
                                                                              max_size=2)))),
    body_with({"input_ids": token_ids, "sampling_params": sometimes(native_sampling, not_null)},
              native_fields))
BODIES = {CHAT: chat_bodies, COMPLETIONS: completion_bodies, GENERATE: generate_bodies}
FIELD_NAMES = {CHAT: ("messages", "max_tokens", "stop", "logit_bias", "temperature"),
               COMPLETIONS: ("prompt", "max_tokens", "stop", "logit_bias", "n"),
               GENERATE: ("text", "input_ids", "sampling_params", "image_data")}


def encode(body) -> bytes:
    """JSON text as a client might send it: big integers, NaN and Infinity
    included (the stdlib writes them; the server must refuse them cleanly)."""
    return json.dumps(body, allow_nan=True).encode()


def nested(name: str, depth: int, opener: bytes, leaf: bytes, closer: bytes) -> bytes:
    return b'{"%s": ' % name.encode() + opener * depth + leaf + closer * depth + b"}"


def raw_bodies(bodies, field_names):
    """Bytes that are not quite JSON objects, or nest absurdly deep."""
    encoded = bodies.map(encode)
    depths, names = st.integers(1, 5000), st.sampled_from(field_names)
    return st.one_of(
        st.tuples(encoded, st.integers(0, 200)).map(lambda pair: pair[0][: pair[1]]),
        st.binary(max_size=40),
        st.builds(nested, names, depths, st.just(b"["), st.just(b""), st.just(b"]")),
        st.builds(nested, names, depths, st.just(b'{"a": '), st.just(b"1"), st.just(b"}")),
        encoded.map(lambda text: b"\xef\xbb\xbf" + text),
        encoded.map(lambda text: text.replace(b'"', b"'", 2)),
        st.sampled_from([b"", b"null", b"[]", b'"x"', b"1e999", b'{"a":1,"a":2}', b"{\xff}"]))


def requests_for(endpoint: str, stream: Optional[bool] = None):
    """(endpoint, body bytes): JSON bodies mostly, raw bytes sometimes;
    `stream` (unless None) is set on every JSON object body."""
    bodies = BODIES[endpoint]
    if stream is not None:
        bodies = bodies.map(lambda body: {**body, "stream": stream})
    raw = sometimes(bodies.map(encode), raw_bodies(bodies, FIELD_NAMES[endpoint]), 5)
    return st.tuples(st.just(endpoint), raw)


any_request = st.one_of(*(requests_for(endpoint) for endpoint in ENDPOINTS))


# ---- the property ---------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Collects records at ERROR and above (App logs every 5xx it makes)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> List[str]:
        messages = [self.format(record) for record in self.records]
        self.records.clear()
        return messages


def watch_errors() -> ErrorLog:
    """An ErrorLog on the "pyvlm" logger (the server's and the engine
    thread's loggers are its children)."""
    handler = ErrorLog()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger("pyvlm").addHandler(handler)
    return handler


def unwatch_errors(handler: ErrorLog) -> None:
    logging.getLogger("pyvlm").removeHandler(handler)


def assert_openai_error(body) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"] != "internal_server_error", error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert "Traceback" not in error["message"], error


def check_answer(endpoint: str, status: int, body) -> str:
    """Asserts the property for one answer; returns a label for statistics."""
    assert 200 <= status < 300 or 400 <= status < 500, (status, body)
    if status >= 400:
        assert_openai_error(body)
        return f"{status} {body['error']['param']}"
    if isinstance(body, list):
        return _check_stream(body)
    assert isinstance(body, dict), body
    assert ("text" in body) if endpoint == GENERATE else bool(body.get("choices")), body
    return f"{status}"


def _check_stream(events) -> str:
    assert events, "an empty stream"
    for name, data in events[:-1]:
        assert name is None and isinstance(data, dict), (name, data)
    name, data = events[-1]
    if name == "error":
        assert_openai_error(data)
        return f"200 stream, error event {data['error']['param']}"
    assert (name, data) == (None, "[DONE]"), events[-1]
    return "200 stream"


async def post_and_check(app, endpoint: str, raw: bytes, errors: ErrorLog) -> str:
    """Posts one body to the App; asserts the property; returns its label."""
    errors.take()  # records of an earlier example are not this one's
    status, _, body = await acall(app, "POST", endpoint, raw)
    logged = errors.take()
    assert not logged, (status, body, logged)
    label = check_answer(endpoint, status, body)
    assert app.dispatcher.admission.num_in_flight == 0, "an admission slot was not released"
    return label


async def assert_still_serving(app) -> None:
    status, _, body = await acall(app, "POST", CHAT, NORMAL_REQUEST)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body
    stream_request = dict(NORMAL_REQUEST, stream=True)
    status, _, events = await acall(app, "POST", CHAT, stream_request)
    assert status == 200 and events[-1] == (None, "[DONE]"), events


def short_repr(raw: Optional[bytes], limit: int = 600) -> str:
    text = repr(raw)
    return text if len(text) <= limit else text[:limit] + f"... ({len(raw)} bytes)"
