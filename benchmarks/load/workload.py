"""The requests of the load tools, each ending as one labelled Outcome.

Well-formed kinds: text chat, chat with one or two images, /v1/completions,
/generate (whole answers or streams); streams the client drops at a random
point (before the answer starts, or after any event); malformed requests
(bad JSON, an unknown field, an undecodable image, an unknown model, a
huge max_tokens) that must be refused with a 4xx and never hurt the server.

Labels: ok (a complete answer, or a stream ending in [DONE]), cancelled (we
dropped it), refused (429), client_error (other 4xx), server_error (5xx,
also as an `error` event in a stream), stream_error (another error event),
incomplete (200 but the answer or stream was cut short), timeout,
connection_error.
"""

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Dict, FrozenSet, List, Optional

from benchmarks.load import client
from benchmarks.load.client import Reply, Server

WORDS = ("the a of and to in is it that was for on are with as his they be at one have this "
         "from or had by hot word but what some we can out other were all there when up use "
         "your how said an each she which do their time if will way about many then them "
         "picture colour light cat dog house tree river story number describe tell me why").split()
SERVER_ERROR_TYPES = {"internal_server_error": 500, "service_unavailable_error": 503}


@dataclass
class Outcome:
    """How one request ended (see the module docstring for the labels)."""

    kind: str
    label: str
    status: int = 0
    start: float = 0.0
    end: float = 0.0
    ttft: Optional[float] = None  # streams: time to the first generated text
    detail: str = ""
    retry_after: Optional[str] = None

    @property
    def e2e(self) -> float:
        return self.end - self.start


@dataclass
class Workload:
    """What every request needs: the server, the model name, the images
    (data URIs) and bounds on output length and on time."""

    server: Server
    images: List[str]
    model: str = "default"
    max_tokens: int = 16
    timeout: float = 300.0

    def text(self, rng: random.Random, num_words: int = 0) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(num_words or rng.randint(3, 40)))

    def pick_images(self, rng: random.Random, count: int) -> List[str]:
        return [rng.choice(self.images) for _ in range(count)] if self.images else []


# ---- sending and labelling ----------------------------------------------

async def send(kind: str, work: Workload, path: str, payload, stop_after=None) -> Outcome:
    """Sends payload (a dict, or bytes sent as they are) and labels the answer."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    start = time.perf_counter()
    try:
        reply = await client.request(work.server, "POST", path, body, work.timeout, stop_after)
    except asyncio.TimeoutError:
        return Outcome(kind, "timeout", 0, start, time.perf_counter(), detail=f"> {work.timeout} s")
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        return Outcome(kind, "connection_error", 0, start, time.perf_counter(),
                       detail=f"{type(exc).__name__}: {exc}"[:200])
    try:
        outcome = label(kind, path, reply)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # an answer we cannot read
        outcome = Outcome(kind, "incomplete", reply.status, detail=f"unreadable: {exc}"[:200])
    outcome.start, outcome.end = start, time.perf_counter()
    if outcome.ttft is not None:
        outcome.ttft -= start
    return outcome


def label(kind: str, path: str, reply: Reply) -> Outcome:
    status = reply.status
    if status != 200:
        name = ("server_error" if status >= 500 else "refused" if status == 429
                else "client_error")
        return Outcome(kind, name, status, detail=reply.body[:200].decode(errors="replace"),
                       retry_after=reply.headers.get("retry-after"))
    if reply.events or reply.headers.get("content-type", "").startswith("text/event-stream"):
        return _label_stream(kind, path, reply)
    try:
        complete = answer_is_complete(path, reply.json())
    except (ValueError, KeyError, IndexError, TypeError):
        complete = False
    return Outcome(kind, "ok" if complete else "incomplete", status,
                   detail="" if complete else reply.body[:200].decode(errors="replace"))


def _label_stream(kind: str, path: str, reply: Reply) -> Outcome:
    ttft = first_text_time(path, reply)
    errors = reply.error_events()
    if errors:
        kind_of_error = errors[0].get("error", {}).get("type", "")
        name = "server_error" if kind_of_error in SERVER_ERROR_TYPES else "stream_error"
        return Outcome(kind, name, SERVER_ERROR_TYPES.get(kind_of_error, 200), ttft=ttft,
                       detail=json.dumps(errors[0])[:200])
    if reply.closed_early:
        return Outcome(kind, "cancelled", 200, ttft=ttft)
    return Outcome(kind, "ok" if reply.is_done else "incomplete", 200, ttft=ttft,
                   detail="" if reply.is_done else f"{len(reply.events)} events, no [DONE]")


def answer_is_complete(path: str, body: dict) -> bool:
    """A whole (non-streamed) answer that says why it ended."""
    if path == "/generate":
        return body["meta_info"]["finish_reason"] is not None and isinstance(body["text"], str)
    choice = body["choices"][0]
    text = choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]
    return choice["finish_reason"] in ("stop", "length") and isinstance(text, str)


def event_text(path: str, data: str) -> str:
    """The generated text an SSE data event carries ('' for none)."""
    if data == "[DONE]":
        return ""
    value = json.loads(data)
    if path == "/generate":
        return value.get("text") or ""
    choices = value.get("choices") or [{}]
    if path.endswith("chat/completions"):
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


def first_text_time(path: str, reply: Reply) -> Optional[float]:
    for (name, data), at in zip(reply.events, reply.event_times):
        if name is None and event_text(path, data):
            return at
    return None


# ---- the kinds ----------------------------------------------------------

def chat_body(work: Workload, rng: random.Random, num_images: int, stream: bool, **fields):
    parts = [{"type": "image_url", "image_url": {"url": uri}}
             for uri in work.pick_images(rng, num_images)]
    parts.append({"type": "text", "text": work.text(rng)})
    body = {"model": work.model, "messages": [{"role": "user", "content": parts}],
            "max_tokens": rng.randint(1, work.max_tokens), "stream": stream,
            "temperature": rng.choice([0.0, 0.7])}
    return dict(body, **fields)


async def chat_text(work: Workload, rng: random.Random) -> Outcome:
    return await send("chat_text", work, "/v1/chat/completions",
                      chat_body(work, rng, 0, rng.random() < 0.5))


async def chat_image(work: Workload, rng: random.Random) -> Outcome:
    num_images = rng.choice([1, 1, 2]) if work.images else 0
    return await send("chat_image", work, "/v1/chat/completions",
                      chat_body(work, rng, num_images, rng.random() < 0.5))


async def completions(work: Workload, rng: random.Random) -> Outcome:
    body = {"model": work.model, "prompt": work.text(rng), "stream": rng.random() < 0.5,
            "max_tokens": rng.randint(1, work.max_tokens), "temperature": rng.choice([0.0, 0.7])}
    return await send("completions", work, "/v1/completions", body)


async def generate(work: Workload, rng: random.Random) -> Outcome:
    body = {"text": work.text(rng), "stream": rng.random() < 0.5,
            "sampling_params": {"max_new_tokens": rng.randint(1, work.max_tokens),
                                "temperature": rng.choice([0.0, 0.7])}}
    if work.images and rng.random() < 0.5:
        body["image_data"] = work.pick_images(rng, 1)
    return await send("generate", work, "/generate", body)


async def stream_cancel(work: Workload, rng: random.Random) -> Outcome:
    """A stream dropped before its answer starts, or after a random number
    of events (ignore_eos: it would run to max_tokens)."""
    body = chat_body(work, rng, rng.choice([0, 1]) if work.images else 0, True,
                     max_tokens=max(8, work.max_tokens), ignore_eos=True)
    if rng.random() < 0.25:
        start = time.perf_counter()
        try:
            await client.send_and_leave(work.server, "/v1/chat/completions", body)
        except (OSError, asyncio.TimeoutError) as exc:
            return Outcome("stream_cancel", "connection_error", 0, start, time.perf_counter(),
                           detail=f"{type(exc).__name__}: {exc}"[:200])
        return Outcome("stream_cancel", "cancelled", 0, start, time.perf_counter())
    num_events = rng.randint(1, body["max_tokens"] + 1)  # the role event, then one per token
    return await send("stream_cancel", work, "/v1/chat/completions", body,
                      stop_after=lambda events: len(events) >= num_events)


async def bad_json(work: Workload, rng: random.Random) -> Outcome:
    whole = json.dumps(chat_body(work, rng, 0, False)).encode()
    cut = whole[:rng.randint(1, len(whole) - 1)]  # a JSON object cut short
    return await send("bad_json", work, "/v1/chat/completions", cut)


async def unknown_field(work: Workload, rng: random.Random) -> Outcome:
    name = "x_" + "".join(rng.choice("abcdefgh") for _ in range(6))
    if rng.random() < 0.5:
        return await send("unknown_field", work, "/generate", {"text": work.text(rng), name: 1})
    return await send("unknown_field", work, "/v1/chat/completions",
                      dict(chat_body(work, rng, 0, False), **{name: 1}))


async def bad_image(work: Workload, rng: random.Random) -> Outcome:
    """Not an image, not base64, or a real image cut short."""
    truncated = work.images[0].split(",", 1)[1][:rng.randint(1, 500) * 4] if work.images else "QUJD"
    garbage = rng.choice(["data:image/png;base64," + "QUJD" * rng.randint(1, 64),
                          "data:image/jpeg;base64,%%%not base64%%%",
                          "data:image/jpeg;base64," + truncated])
    body = chat_body(work, rng, 0, rng.random() < 0.5)
    body["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": garbage}})
    return await send("bad_image", work, "/v1/chat/completions", body)


async def unknown_model(work: Workload, rng: random.Random) -> Outcome:
    body = chat_body(work, rng, 0, rng.random() < 0.5, model=f"no-such-model-{rng.randint(0, 999)}")
    return await send("unknown_model", work, "/v1/chat/completions", body)


async def huge_max_tokens(work: Workload, rng: random.Random) -> Outcome:
    """max_tokens far beyond the context: refused, or clipped to the context
    (pyvlm today); streamed and dropped after 3 events so it stays short."""
    body = chat_body(work, rng, 0, True, max_tokens=rng.choice([10**6, 10**9, 2**62]))
    return await send("huge_max_tokens", work, "/v1/chat/completions", body,
                      stop_after=lambda events: len(events) >= 3)


@dataclass(frozen=True)
class Kind:
    """A kind of request: how often it is sent, how to send it, which labels
    are fine (refused is always fine: the server may bound its queue) and,
    for refusals, which statuses."""

    name: str
    weight: int
    send: Callable[[Workload, random.Random], Awaitable[Outcome]]
    expected: FrozenSet[str] = frozenset({"ok"})
    statuses: FrozenSet[int] = frozenset()

    def is_expected(self, outcome: Outcome) -> bool:
        if outcome.label == "refused":
            return outcome.retry_after is not None
        if outcome.label == "client_error" and self.statuses:
            return outcome.status in self.statuses
        return outcome.label in self.expected


REFUSED_4XX = frozenset({"client_error"})
KINDS: Dict[str, Kind] = {k.name: k for k in [
    Kind("chat_text", 20, chat_text),
    Kind("chat_image", 20, chat_image),
    Kind("completions", 10, completions),
    Kind("generate", 10, generate),
    Kind("stream_cancel", 15, stream_cancel, frozenset({"cancelled", "ok"})),
    Kind("bad_json", 5, bad_json, REFUSED_4XX, frozenset({400})),
    Kind("unknown_field", 5, unknown_field, REFUSED_4XX, frozenset({400})),
    Kind("bad_image", 5, bad_image, REFUSED_4XX, frozenset({400, 422})),
    Kind("unknown_model", 5, unknown_model, REFUSED_4XX, frozenset({404})),
    Kind("huge_max_tokens", 5, huge_max_tokens, frozenset({"client_error", "cancelled", "ok"}),
         frozenset({400})),
]}


@dataclass
class KindDeck:
    """Kinds drawn like cards: each deck holds every kind `weight` times,
    shuffled, so every kind is sent within each 100 requests."""

    rng: random.Random
    kinds: List[Kind] = field(default_factory=lambda: list(KINDS.values()))
    _cards: List[Kind] = field(default_factory=list)

    def draw(self) -> Kind:
        if not self._cards:
            self._cards = [k for k in self.kinds for _ in range(k.weight)]
            self.rng.shuffle(self._cards)
        return self._cards.pop()
