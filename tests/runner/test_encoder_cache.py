"""Encoder cache (LRU by image hash, bounded in bytes) and step-wise vision batching."""

import pytest
import torch

from pyvlm.scheduling.types import MultimodalItem
from pyvlm.runner.encoder_cache import EncoderCache, VisionBatcher


def _item(h: int, length: int = 3) -> MultimodalItem:
    return MultimodalItem(hash=h, offset=0, length=length)


class RecordingEncoder:
    def __init__(self):
        self.calls = []

    def __call__(self, items):
        self.calls.append([it.hash for it in items])
        return [torch.full((it.length, 4), float(it.hash)) for it in items]


def test_misses_of_one_step_are_encoded_in_one_call_and_hits_skip_the_tower():
    encoder = RecordingEncoder()
    batcher = VisionBatcher(encoder, EncoderCache(1 << 20))
    first = batcher.embed([_item(1), _item(2), _item(1)])
    assert encoder.calls == [[1, 2]]  # the repeated image is encoded once
    assert torch.equal(first[2], torch.full((3, 4), 2.0))
    batcher.embed([_item(2), _item(3)])
    assert encoder.calls == [[1, 2], [3]]
    assert batcher.cache.num_hits == 1


def test_lru_eviction_keeps_the_recently_used():
    cache = EncoderCache(8)  # two float32 scalars
    cache.put(1, torch.zeros(1))
    cache.put(2, torch.zeros(1))
    assert cache.get(1) is not None  # 1 becomes most recent
    cache.put(3, torch.zeros(1))
    assert cache.get(2) is None and cache.get(1) is not None and cache.get(3) is not None
    assert cache.num_bytes == 8


def test_the_byte_budget_bounds_the_cache():
    cache = EncoderCache(1000)
    for key in range(50):
        cache.put(key, torch.zeros(int(torch.randint(1, 60, ())), dtype=torch.float32))
        assert cache.num_bytes <= 1000
        assert cache.num_bytes == sum(cache.get(k).numel() * 4 for k in list(cache._entries))
    cache.put(99, torch.zeros(251))  # larger than the whole budget: not kept
    assert cache.get(99) is None
    cache.put(7, torch.zeros(10))
    cache.put(7, torch.zeros(20))  # replacing an entry counts its new size only
    assert cache.get(7).numel() == 20
    assert cache.num_bytes == sum(cache.get(k).numel() * 4 for k in list(cache._entries))
    cache.clear()
    assert cache.num_bytes == 0 and len(cache) == 0


def test_zero_size_cache_stores_nothing():
    cache = EncoderCache(0)
    cache.put(1, torch.zeros(1))
    assert len(cache) == 0


def test_row_count_mismatch_is_an_error():
    batcher = VisionBatcher(lambda items: [torch.zeros(2, 4) for _ in items], EncoderCache(1 << 20))
    with pytest.raises(RuntimeError, match="2 rows for an image that needs 3"):
        batcher.embed([_item(1, 3)])


class RecordedCuda:
    """torch.cuda's stream, event and record_stream calls replaced by
    recorders (this machine has no GPU): `calls` lists what happened, in
    order; `current` is the stream stack (the step's stream at the bottom);
    an event's query() is whether its name is in `done`; new_stream(name)
    makes another stream."""

    def __init__(self, monkeypatch):
        import contextlib

        calls = self.calls = []
        current = self.current = []
        done = self.done = set()

        class Stream:
            def __init__(self, name):
                self.name, self.device = name, torch.device("cuda", 0)

            def wait_stream(self, other):
                calls.append((self.name, "waits for stream", other.name))

            def wait_event(self, event):
                calls.append((self.name, "waits for", event.name))

        class Event:
            count = 0

            def __init__(self):
                Event.count += 1
                self.name = f"event {Event.count}"

            def record(self, stream):
                calls.append(("record", self.name, "on", stream.name))

            def query(self):
                return self.name in done

        @contextlib.contextmanager
        def on(stream):
            current.append(stream)
            calls.append(("enter", stream.name))
            try:
                yield
            finally:
                current.pop()
                calls.append(("exit", stream.name))

        self.new_stream = Stream
        self.side, self.step = Stream("side"), Stream("step")
        current.append(self.step)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
        monkeypatch.setattr(torch.cuda, "stream", on)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: calls.append(
            ("rows of", float(self[0, 0]), "owned by", stream.name)), raising=False)

    def encoder(self, items):
        self.calls.append(("encode on", self.current[-1].name, [it.hash for it in items]))
        return [torch.full((it.length, 4), float(it.hash)) for it in items]


def test_on_a_side_stream_the_tower_runs_there_and_the_step_stream_waits_for_it(monkeypatch):
    """--vision-side-stream (tests/entrypoints/test_engine_cuda.py checks
    the tokens on a GPU): the misses are encoded inside the side stream,
    then the step's stream waits for it, then owns each row; a cache hit
    touches no stream."""
    cuda = RecordedCuda(monkeypatch)
    batcher = VisionBatcher(cuda.encoder, EncoderCache(1 << 20), side_stream=cuda.side)
    rows = batcher.embed([_item(1), _item(2)])
    assert cuda.calls == [("enter", "side"), ("encode on", "side", [1, 2]), ("exit", "side"),
                          ("step", "waits for stream", "side"),
                          ("rows of", 1.0, "owned by", "step"),
                          ("rows of", 2.0, "owned by", "step")]
    assert torch.equal(rows[2], torch.full((3, 4), 2.0))
    cuda.calls.clear()
    assert torch.equal(batcher.embed([_item(1)])[1], torch.full((3, 4), 1.0))
    assert cuda.calls == []  # a hit: no tower, no stream


def test_images_encoded_ahead_are_hits_for_the_step_that_reads_them():
    """Without a side stream encode_ahead is the tower call a step would
    make, earlier: the images land in the cache, once each, and the step
    that admits their request finds them there."""
    encoder = RecordingEncoder()
    batcher = VisionBatcher(encoder, EncoderCache(1 << 20))
    batcher.embed([_item(1)])
    batcher.encode_ahead([_item(1), _item(2), _item(3), _item(2)])
    assert encoder.calls == [[1], [2, 3]]  # cached and repeated images are not encoded again
    assert batcher.num_encoded_ahead == 2
    rows = batcher.embed([_item(3), _item(2)])
    assert encoder.calls == [[1], [2, 3]] and batcher.cache.num_hits == 2
    assert torch.equal(rows[3], torch.full((3, 4), 3.0))
    batcher.encode_ahead([_item(2)])
    assert batcher.num_encoded_ahead == 2


def test_on_a_side_stream_images_encoded_ahead_make_only_their_reader_wait(monkeypatch):
    """The tower runs on the side stream and an event is recorded after it;
    the step that encodes ahead does not wait for it; the later step that
    reads the rows waits for that event (not the whole side stream) and owns
    the rows, once."""
    cuda = RecordedCuda(monkeypatch)
    batcher = VisionBatcher(cuda.encoder, EncoderCache(1 << 20), side_stream=cuda.side)
    batcher.encode_ahead([_item(5), _item(6)])
    assert cuda.calls == [("enter", "side"), ("encode on", "side", [5, 6]), ("exit", "side"),
                          ("record", "event 1", "on", "side")]
    cuda.calls.clear()
    rows = batcher.embed([_item(6)])
    assert cuda.calls == [("step", "waits for", "event 1"), ("rows of", 6.0, "owned by", "step")]
    assert torch.equal(rows[6], torch.full((3, 4), 6.0))
    cuda.calls.clear()
    batcher.embed([_item(6)])
    assert cuda.calls == []  # read once before: nothing left to wait for


def test_images_encoded_ahead_beside_the_steps_are_ready_once_their_event_is(monkeypatch):
    """is_ready looks at the event recorded after the tower call (no wait):
    not ready until it has passed; images not encoded ahead, already read,
    or no longer cached count as ready (their step encodes them)."""
    cuda = RecordedCuda(monkeypatch)
    batcher = VisionBatcher(cuda.encoder, EncoderCache(1 << 20), side_stream=cuda.side)
    assert batcher.encodes_beside_steps
    batcher.encode_ahead([_item(5), _item(6)])
    assert not batcher.is_ready([_item(5)]) and not batcher.is_ready([_item(7), _item(6)])
    assert batcher.is_ready([_item(7)])  # never encoded ahead
    cuda.done.add("event 1")
    assert batcher.is_ready([_item(5), _item(6)])
    batcher.encode_ahead([_item(8)])
    batcher.cache.clear()  # evicted before its step: that step encodes it again
    assert batcher.is_ready([_item(8)])


def test_without_a_side_stream_images_encoded_ahead_are_ready_at_once():
    batcher = VisionBatcher(RecordingEncoder(), EncoderCache(1 << 20))
    assert not batcher.encodes_beside_steps
    batcher.encode_ahead([_item(1)])
    assert batcher.is_ready([_item(1)])
