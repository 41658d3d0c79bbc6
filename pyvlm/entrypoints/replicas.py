"""Data parallelism (--dp-size N): N engine replicas, each an engine process
with its own KV cache driven by a CoreClient, behind one Router that has
the step-loop interface (submit, abort, command, is_alive, failure, wait,
stop, step_running_for, dump_stacks), so Engine and the server use it as
they use one CoreClient.

Routing (SGLang's cache-aware router, vLLM's DP load balancing): a request
goes to the serving replica with the fewest requests in flight (submitted,
not yet finished: counted through the request's sink), unless a replica
holds a prefix of its prompt: then to the one with the longest such prefix
among those whose load is within a slack of the least loaded (see
Router.slack). What a replica holds is what the router sent there: per
replica, an LRU-bounded set of chained hashes of the prompt's position keys
(Request.position_keys: image spans are keyed by image content, so a
repeated image matches) at every block_size tokens. It is an estimate (the
replica's radix cache may have evicted since), which is all routing needs.

Failures: a replica whose engine process dies fails its own requests with
EngineDeadError (its CoreClient does); the router stops routing to it and
restarts it in the background (a new client from the same factory, at most
max_restarts times), while the others serve on. The router is alive while
one replica serves (/health 200); with none, is_alive() is False and
`failure` says why for each (/health 503, the server's watchdog exits for a
restart). Commands fan out to the serving replicas: flush_cache is true
only if every one flushed, stats are merged and listed per replica.

This module imports no torch: tests drive the Router with fake replicas.
"""

import concurrent.futures
import itertools
import logging
import queue
import threading
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from pyvlm.entrypoints.step_loop import SHUT_DOWN, Sink, send_to_sink
from pyvlm.scheduling.errors import EngineDeadError
from pyvlm.scheduling.request import Request

logger = logging.getLogger("pyvlm.engine")

# Prefix blocks: 32 tokens is finer than a typical system prompt or image
# (a Qwen2-VL image of 448x448 pixels is 256 tokens), so shared prefixes
# show, and a 4,000-token prompt is 125 tuple hashes (about 0.1 ms on a
# 2-core VM).
PREFIX_BLOCK_TOKENS = 32
# Only the leading blocks are hashed: past 8,192 tokens two replicas that
# both match would be told apart by load anyway, and hashing stays bounded.
MAX_HASHED_BLOCKS = 256
# Per replica: 65,536 blocks of 32 tokens (2M tokens, more than most KV
# caches hold) in about 6 MB of the front's memory.
MAX_REMEMBERED_BLOCKS = 1 << 16
MAX_RESTARTS = 3  # per replica: a replica that keeps dying is left down
MONITOR_INTERVAL_S = 0.25  # how soon a dead replica is noticed (and restarted)

StartReplica = Callable[[int], object]
"""Starts replica i's client (its engine process starts meanwhile): a
CoreClient, or any object with the step-loop interface and wait_ready()."""


def prefix_hashes(request: Request, block_size: int = PREFIX_BLOCK_TOKENS,
                  max_blocks: int = MAX_HASHED_BLOCKS) -> List[int]:
    """Chained hashes of the prompt's position keys (Request.position_keys),
    one per full block of block_size tokens (hash i names blocks 0..i), at
    most max_blocks: two prompts share hash i exactly when their first
    i + 1 blocks have the same keys (up to hash collisions).

    Built from spans, not from a key per position: position_keys builds
    (and keeps on the request, pickled to the engine process with it) a
    tuple per image position, 1 ms and 80 KB for a prompt of 4 large
    images, where this takes a tuple per block and span."""
    num_tokens = min(len(request.prompt_ids) // block_size, max_blocks) * block_size
    segments, ids = _key_segments(request), request.prompt_ids
    hashes, chained, first = [], 0, 0
    if len(segments) == 1:  # text only: a block's keys are its token ids
        for start in range(0, num_tokens, block_size):
            chained = hash((chained, (tuple(ids[start:start + block_size]),)))
            hashes.append(chained)
        return hashes
    for start in range(0, num_tokens, block_size):
        end = start + block_size
        while segments[first][1] <= start:
            first += 1
        parts, index = [], first
        while index < len(segments) and segments[index][0] < end:
            seg_start, seg_end, tag = segments[index]
            parts.append(_block_part(ids, seg_start, tag, max(start, seg_start),
                                     min(end, seg_end)))
            index += 1
        chained = hash((chained, tuple(parts)))
        hashes.append(chained)
    return hashes


def _key_segments(request: Request) -> List[Tuple[int, int, Optional[tuple]]]:
    """The prompt as spans (start, end, tag) of one kind of position key
    (Request._build_prompt_keys): tag None for text (the token ids),
    ("img", image hash) for an image's placeholders, ("pre", key) for the
    text before the first image when its keys name the images."""
    segments, position = [], 0
    items = sorted(request.mm_items, key=lambda item: item.offset)
    if items and request.pre_image_key is not None and items[0].offset > 0:
        segments.append((0, items[0].offset, ("pre", request.pre_image_key)))
        position = items[0].offset
    for item in items:
        if item.offset > position:
            segments.append((position, item.offset, None))
        segments.append((item.offset, item.offset + item.length, ("img", item.hash)))
        position = item.offset + item.length
    return segments + [(position, max(position, len(request.prompt_ids)) + 1, None)]


def _block_part(ids: List[int], seg_start: int, tag: Optional[tuple], start: int,
                end: int) -> tuple:
    """Positions [start, end) of one span, as a hashable value that equals
    another part's exactly when their position keys are equal."""
    if tag is None:
        return tuple(ids[start:end])
    if tag[0] == "img":  # keys ("img", hash, index in the span)
        return tag + (start - seg_start, end - seg_start)
    return tag + (tuple(ids[start:end]),)


class PrefixSet:
    """The prefix blocks sent to one replica: an LRU-bounded set of hashes."""

    def __init__(self, max_blocks: int = MAX_REMEMBERED_BLOCKS):
        self.max_blocks = max_blocks
        self._blocks: "OrderedDict[int, None]" = OrderedDict()

    def add(self, hashes: Sequence[int]) -> None:
        """Remembers the blocks (refreshed: a shared prefix stays)."""
        blocks = self._blocks
        for block in hashes:
            blocks[block] = None
            blocks.move_to_end(block)
        while len(blocks) > self.max_blocks:
            blocks.popitem(last=False)

    def num_leading(self, hashes: Sequence[int]) -> int:
        """How many of the leading blocks are here."""
        for num, block in enumerate(hashes):
            if block not in self._blocks:
                return num
        return len(hashes)

    def clear(self) -> None:
        self._blocks.clear()

    def __len__(self) -> int:
        return len(self._blocks)


class Replica:
    """One replica as the router sees it: its client, the requests it has
    in flight, what was routed there, and its restarts."""

    SERVING, RESTARTING, DOWN = "serving", "restarting", "down"

    def __init__(self, index: int, client, max_prefix_blocks: int):
        self.index = index
        self.client = client
        self.state = Replica.SERVING
        self.failure: Optional[str] = None  # why it last stopped
        self.prefixes = PrefixSet(max_prefix_blocks)
        self.num_in_flight = 0
        self.num_routed = 0
        self.num_prefix_routed = 0  # routed for a prefix it held, not for its load
        self.num_restarts = 0

    def is_serving(self) -> bool:
        # The client is asked too: a death is seen at once, not at the
        # monitor's next look.
        return self.state == Replica.SERVING and self.client.is_alive()

    def counters(self) -> Dict[str, float]:
        return {"replica": self.index, "serving": float(self.is_serving()),
                "num_in_flight": self.num_in_flight, "num_routed": self.num_routed,
                "num_prefix_routed": self.num_prefix_routed, "num_restarts": self.num_restarts}


# Stats that are fractions: averaged over the replicas; the others are counts, summed.
AVERAGED_STATS = ("token_usage", "cache_hit_rate")


class Router:
    """Engine replicas behind the step-loop interface (module docstring).

    Router(start_replica, num_replicas) starts every replica's client at
    once (their engine processes load in parallel); wait_ready() waits for
    all of them, raising the first start-up error (after stopping all).

    slack: a replica holding a prefix of the request takes it while its
    load (requests in flight) is at most affinity_slack +
    affinity_slack_ratio x the least loaded replica's. A cache hit skips
    the matched prefill (image encoding included), and a few more requests
    in a replica's batch cost each of them little; unbounded affinity
    would pile a popular prompt onto one replica. SGLang's cache-aware
    router keeps affinity until loads differ by more than 64 requests and
    1.5x (--balance-abs-threshold, --balance-rel-threshold); replicas
    behind one front share a host and its traffic, and a tighter 8 + 0.5x
    keeps their batches closer. A prefix every replica holds (a common
    system prompt) decides nothing: equal matches go to the least loaded.
    """

    def __init__(self, start_replica: StartReplica, num_replicas: int,
                 block_size: int = PREFIX_BLOCK_TOKENS, max_restarts: int = MAX_RESTARTS,
                 affinity_slack: int = 8, affinity_slack_ratio: float = 0.5,
                 max_prefix_blocks: int = MAX_REMEMBERED_BLOCKS):
        self.block_size, self.max_restarts = block_size, max_restarts
        self.affinity_slack, self.affinity_slack_ratio = affinity_slack, affinity_slack_ratio
        self._start_replica = start_replica
        self._lock = threading.Lock()  # routing state: loads, owners, replica states
        self._owners: Dict[str, object] = {}  # rid -> the client it went to (for abort)
        self._next_tie = itertools.count()  # rotates ties of load between replicas
        self._stopping = threading.Event()
        self._pending: Dict[int, object] = {}  # replica index -> a client starting as its restart
        self._restarts: List[threading.Thread] = []
        self._monitor: Optional[threading.Thread] = None
        self.replicas: List[Replica] = []
        try:
            for index in range(num_replicas):
                self.replicas.append(Replica(index, start_replica(index), max_prefix_blocks))
        except BaseException:
            self.stop()
            raise
        self._commands = concurrent.futures.ThreadPoolExecutor(
            max_workers=num_replicas, thread_name_prefix="pyvlm-dp-command")

    def wait_ready(self) -> None:
        """Waits until every replica serves; raises the first replica's
        start-up error, after stopping them all."""
        try:
            for replica in self.replicas:
                replica.client.wait_ready()
                logger.info("[DP %d] engine replica ready (pid %s)", replica.index,
                            getattr(replica.client, "pid", "?"))
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._watch, name="pyvlm-dp-monitor",
                                         daemon=True)
        self._monitor.start()

    # ---- the step-loop interface ---------------------------------------------

    def submit(self, request: Request, sink: Sink) -> None:
        """Routes the request (module docstring); with no replica serving,
        the sink gets EngineDeadError at once."""
        hashes = prefix_hashes(request, self.block_size)  # outside the lock: the costly part
        with self._lock:
            replica = self._route(hashes)
            if replica is not None:
                replica.num_in_flight += 1
                replica.num_routed += 1
                replica.prefixes.add(hashes)
                client = self._owners[request.rid] = replica.client
        if replica is None:
            send_to_sink(sink, None, EngineDeadError(self.failure or SHUT_DOWN))
            return
        client.submit(request, self._tracking(replica, request.rid, sink))

    def replica_of(self, rid: str) -> Optional[int]:
        """The index of the replica running request rid (None once it ended)."""
        client = self._owners.get(rid)
        return next((r.index for r in self.replicas if r.client is client), None)

    def abort(self, rid: str) -> None:
        client = self._owners.get(rid)
        if client is not None:
            client.abort(rid)

    def command(self, name: str) -> object:
        """Runs the core command on every serving replica at once:
        flush_cache is true only if all flushed; stats are merged (counts
        summed, fractions averaged) with per-replica entries under
        "replicas"; any other command gives {replica index: result}.
        EngineDeadError if no replica serves."""
        results = self._fan_out(name)
        if name == "flush_cache":
            return all(results.values())
        if name == "stats":
            return self._merged_stats(results)
        return results

    def is_alive(self) -> bool:
        """Whether a replica serves."""
        return any(replica.is_serving() for replica in self.replicas)

    @property
    def failure(self) -> Optional[str]:
        """Why no replica serves (each replica's reason); None while one
        serves, or once stopped (as a stopped CoreClient)."""
        if self._stopping.is_set() or self.is_alive():
            return None
        return "no engine replica is serving: " + "; ".join(
            f"[DP {r.index}] {r.failure or r.client.failure or 'stopped'} ({r.state})"
            for r in self.replicas)

    def step_running_for(self) -> Optional[float]:
        """The longest running step of any replica (the watchdog's view:
        one hung replica is a hung server), None if none runs a step."""
        times = [t for r in self.replicas if (t := r.client.step_running_for()) is not None]
        return max(times, default=None)

    def wait(self, results: "queue.Queue"):
        """results.get(), but raises once no replica serves (never hangs):
        a request's own replica fails it if that replica dies."""
        while True:
            try:
                return results.get(timeout=0.5)
            except queue.Empty:
                if not self.is_alive():
                    raise EngineDeadError(self.failure or SHUT_DOWN) from None

    def stop(self, timeout: float = 30.0) -> None:
        """Stops every replica (in parallel) and any restart under way."""
        self._stopping.set()
        with self._lock:
            clients = [r.client for r in self.replicas] + list(self._pending.values())
        stoppers = [threading.Thread(target=c.stop, args=(timeout,), daemon=True)
                    for c in clients]
        for thread in stoppers:
            thread.start()
        for thread in stoppers + self._restarts + [self._monitor]:
            if thread is not None:
                thread.join(timeout + 10)
        if hasattr(self, "_commands"):  # (its commands fail fast now: every client stopped)
            self._commands.shutdown(wait=True)

    def dump_stacks(self) -> None:
        """Asks every replica's engine process for its threads' stacks."""
        for replica in self.replicas:
            try:
                replica.client.dump_stacks()
            except OSError:  # it exited meanwhile
                pass

    # ---- routing -------------------------------------------------------------

    def slack(self, least_load: int) -> float:
        """How many more requests than the least loaded replica a replica
        holding the request's prefix may have and still take it."""
        return self.affinity_slack + self.affinity_slack_ratio * least_load

    def _route(self, hashes: Sequence[int]) -> Optional[Replica]:
        """The replica for a request of these prefix blocks (under the lock)."""
        serving = [r for r in self.replicas if r.is_serving()]
        if not serving:
            return None
        least = min(r.num_in_flight for r in serving)
        if hashes:
            bound = least + self.slack(least)
            near = [r for r in serving if r.num_in_flight <= bound]
            matches = {r.index: r.prefixes.num_leading(hashes) for r in near}
            best = max(near, key=lambda r: (matches[r.index], -r.num_in_flight))
            if matches[best.index] > 0:
                best.num_prefix_routed += 1
                return best
        ties = [r for r in serving if r.num_in_flight == least]
        return ties[next(self._next_tie) % len(ties)]

    def _tracking(self, replica: Replica, rid: str, sink: Sink) -> Sink:
        """sink, counting the request out of its replica's load at its end
        (its final output or error)."""
        done = False

        def tracked(out, err) -> None:
            nonlocal done
            final = err is not None or out.finished
            try:
                sink(out, err)
            except Exception:  # the client drops a failing sink: nothing more comes
                final = True
                raise
            finally:
                if final and not done:
                    done = True
                    self._finish(replica, rid)
        return tracked

    def _finish(self, replica: Replica, rid: str) -> None:
        with self._lock:
            replica.num_in_flight -= 1
            if self._owners.get(rid) is not None:
                del self._owners[rid]

    # ---- commands ------------------------------------------------------------

    def _fan_out(self, name: str) -> Dict[int, object]:
        """{replica index: result} of the command on each serving replica;
        one that dies meanwhile is left out (the monitor restarts it)."""
        serving = [r for r in self.replicas if r.is_serving()]
        futures = {r.index: self._commands.submit(r.client.command, name) for r in serving}
        results = {}
        for index, future in futures.items():
            try:
                results[index] = future.result()
            except EngineDeadError:
                continue
        if not results:
            raise EngineDeadError(self.failure or SHUT_DOWN)
        return results

    def _merged_stats(self, results: Dict[int, dict]) -> dict:
        merged: Dict[str, object] = {}
        for stats in results.values():
            for key, value in stats.items():
                merged[key] = merged.get(key, 0) + value
        for key in AVERAGED_STATS:
            if key in merged:
                merged[key] /= len(results)
        merged["num_serving_replicas"] = len(results)
        merged["replicas"] = [dict(r.counters(), **results.get(r.index, {}))
                              for r in self.replicas]
        return merged

    # ---- failures and restarts -----------------------------------------------

    def _watch(self) -> None:
        """The monitor thread: notices replicas whose engine process died."""
        while not self._stopping.wait(MONITOR_INTERVAL_S):
            for replica in self.replicas:
                if replica.state == Replica.SERVING and not replica.client.is_alive():
                    self._on_death(replica)

    def _on_death(self, replica: Replica) -> None:
        replica.failure = replica.client.failure or "its engine process stopped"
        with self._lock:
            replica.prefixes.clear()  # a new process starts with an empty cache
            can_restart = replica.num_restarts < self.max_restarts
            replica.state = Replica.RESTARTING if can_restart else Replica.DOWN
        if not can_restart:
            logger.critical("[DP %d] engine replica stopped (%s); not restarting it (%d "
                            "restarts already)", replica.index, replica.failure,
                            replica.num_restarts)
            return
        logger.error("[DP %d] engine replica stopped (%s); the other replicas serve on "
                     "while it restarts", replica.index, replica.failure)
        thread = threading.Thread(target=self._restart, args=(replica,),
                                  name=f"pyvlm-dp-restart-{replica.index}", daemon=True)
        self._restarts = [t for t in self._restarts if t.is_alive()] + [thread]
        thread.start()

    def _restart(self, replica: Replica) -> None:
        """On a thread of its own: new clients until one is ready or the
        restarts are spent."""
        replica.client.stop(timeout=5.0)  # it has exited: reaps it, joins its threads
        while not self._stopping.is_set() and replica.num_restarts < self.max_restarts:
            replica.num_restarts += 1
            logger.warning("[DP %d] restarting the engine replica (restart %d of %d)",
                           replica.index, replica.num_restarts, self.max_restarts)
            client = self._ready_client(replica.index)
            if client is None:
                continue
            with self._lock:
                self._pending.pop(replica.index, None)
                if not self._stopping.is_set():
                    replica.client, replica.state, replica.failure = client, Replica.SERVING, None
                    logger.info("[DP %d] engine replica restarted (pid %s)", replica.index,
                                getattr(client, "pid", "?"))
                    return
            client.stop()  # the router stopped while it started
            return
        with self._lock:
            if replica.state == Replica.RESTARTING:
                replica.state = Replica.DOWN
        logger.critical("[DP %d] engine replica could not be restarted; it stays down",
                        replica.index)

    def _ready_client(self, index: int):
        """A started, ready client for replica index; None if it failed."""
        client = None
        try:
            client = self._start_replica(index)
            with self._lock:
                if self._stopping.is_set():
                    raise EngineDeadError(SHUT_DOWN)
                self._pending[index] = client  # stop() stops it too
            client.wait_ready()
            return client
        except BaseException as exc:
            logger.error("[DP %d] the restart failed: %s", index, exc)
            with self._lock:
                self._pending.pop(index, None)
            if client is not None:
                client.stop(timeout=5.0)
            return None
