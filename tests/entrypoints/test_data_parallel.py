"""Data parallelism (dp_size, pyvlm/entrypoints/replicas.py).

The routing policy is driven with fake replicas (no processes): least
loaded, prefix affinity (image spans keyed by content) within a slack,
dead replicas skipped and restarted a bounded number of times, commands
fanned out. Then two real replicas of the tiny Qwen2-VL, each an engine
process: 32 concurrent requests give dp_size=1's greedy tokens and reach
both; a repeated image and prompt prefix go where they were cached;
per-replica stats reach /metrics and /get_server_info; a SIGKILLed replica
fails only its own requests, is restarted and serves again; with every
replica dead /health is 503 and nothing hangs or is left unreaped."""

import asyncio
import logging
import os
import pickle
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import pyvlm
from pyvlm.entrypoints import replicas as replicas_module
from pyvlm.entrypoints.replicas import Replica, Router, prefix_hashes
from pyvlm.scheduling.errors import EngineDeadError
from pyvlm.scheduling.request import Request, RequestOutput
from pyvlm.scheduling.types import MultimodalItem
from tests.entrypoints.engine_kills import random_image

# ---- the routing policy, with fake replicas -----------------------------------


class FakeClient:
    """The step-loop interface, recording what it was given; `die()` fails
    what it holds as a dead engine process would."""

    def __init__(self, index: int, stats=None):
        self.index, self.alive, self.failure = index, True, None
        self.sinks, self.aborted, self.running_for = {}, [], None
        self.stats = stats or {"num_running_reqs": 1, "token_usage": 0.5}
        self.flushes = True
        self.stopped = False

    def wait_ready(self):
        pass

    def submit(self, request, sink):
        self.sinks[request.rid] = sink

    def finish(self, rid):
        self.sinks.pop(rid)(output(rid), None)

    def die(self, why="was killed by SIGKILL"):
        self.alive, self.failure = False, why
        for sink in self.sinks.values():
            sink(None, EngineDeadError(why))
        self.sinks.clear()

    def abort(self, rid):
        self.aborted.append(rid)

    def command(self, name):
        if not self.alive:
            raise EngineDeadError(self.failure)
        return self.flushes if name == "flush_cache" else dict(self.stats)

    def is_alive(self):
        return self.alive

    def step_running_for(self):
        return self.running_for

    def stop(self, timeout=30.0):
        self.stopped, self.alive = True, False

    def dump_stacks(self):
        pass


def output(rid: str, finished: bool = True) -> RequestOutput:
    return RequestOutput(rid, [1], "x", finished, "length" if finished else None, None, 1, 1, 0)


class FakeReplicas:
    """A start_replica for Router: FakeClients, kept by replica."""

    def __init__(self):
        self.started = []
        self.fail_starts = False

    def __call__(self, index):
        if self.fail_starts:
            raise RuntimeError("no device")
        client = FakeClient(index)
        self.started.append(client)
        return client


def fake_router(num_replicas=3, **kwargs) -> Router:
    router = Router(FakeReplicas(), num_replicas, block_size=4, **kwargs)
    router.wait_ready()
    return router


def submit(router, rid, prompt_ids, mm_items=()):
    """Submits; returns [(output, error)] the request's sink will receive."""
    got = []
    router.submit(Request(rid, list(prompt_ids), mm_items=list(mm_items)),
                  lambda out, err: got.append((out, err)))
    return got


def loads(router):
    return [r.num_in_flight for r in router.replicas]


def test_requests_go_to_the_least_loaded_replica_and_count_out_when_finished():
    router = fake_router()
    try:
        for i in range(6):  # prompts shorter than a block: load alone decides
            submit(router, f"r{i}", [i, i])
        assert loads(router) == [2, 2, 2]
        client = router.replicas[1].client
        client.finish(next(iter(client.sinks)))
        assert loads(router) == [2, 1, 2]
        submit(router, "next", [9])
        assert router.replica_of("next") == 1 and loads(router) == [2, 2, 2]
        router.abort("next")
        assert router.replicas[1].client.aborted == ["next"]
    finally:
        router.stop()


def test_a_replica_holding_the_prefix_takes_the_request_within_the_slack():
    router = fake_router(affinity_slack=2, affinity_slack_ratio=0.0)
    try:
        prefix = list(range(100, 108))  # two blocks of 4
        submit(router, "first", prefix + [1])
        home = router.replica_of("first")
        for i in range(2):  # home now has 1, 2 more than the others: within the slack of 2
            submit(router, f"same{i}", prefix + [2 + i])
            assert router.replica_of(f"same{i}") == home
        submit(router, "over", prefix + [9])  # home would be 3 over the least loaded
        assert router.replica_of("over") != home
        assert router.replicas[home].num_prefix_routed == 2
    finally:
        router.stop()


def test_the_longest_cached_prefix_wins_and_images_match_by_content():
    router = fake_router()
    try:
        text = list(range(200, 212))  # three blocks
        short, long = Request("s", text[:4] + [0] * 4), Request("l", text[:8] + [1] * 4)
        router.replicas[0].prefixes.add(prefix_hashes(short, block_size=4))  # one block shared
        router.replicas[1].prefixes.add(prefix_hashes(long, block_size=4))  # two blocks shared
        submit(router, "query", text)
        assert router.replica_of("query") == 1
        # Same placeholder ids, different images: no affinity; same image: affinity.
        placeholder = [7] * 8
        submit(router, "image a", placeholder, [MultimodalItem(hash=111, offset=0, length=8)])
        a_home = router.replica_of("image a")
        submit(router, "image b", placeholder, [MultimodalItem(hash=222, offset=0, length=8)])
        assert router.replica_of("image b") != a_home  # least loaded, no shared prefix
        submit(router, "image a again", placeholder + [5],
               [MultimodalItem(hash=111, offset=0, length=8)])
        assert router.replica_of("image a again") == a_home
    finally:
        router.stop()


def test_prefix_hashes_are_chained_per_block_and_cheap():
    request = Request("r", list(range(10)) + [3] * 6)
    hashes = prefix_hashes(request, block_size=4)
    assert len(hashes) == 4
    other = Request("o", [0] + list(range(1, 10)) + [4] * 6)  # same first 8, differs after
    assert prefix_hashes(other, block_size=4)[:2] == hashes[:2]
    assert prefix_hashes(other, block_size=4)[2:] != hashes[2:]
    shifted = Request("s", [99] + list(range(1, 10)) + [3] * 6)  # first block differs
    assert not set(prefix_hashes(shifted, block_size=4)) & set(hashes)  # chaining
    images = [MultimodalItem(hash=5 + i, offset=100 + 1100 * i, length=1000) for i in range(4)]
    long_prompt = Request("l", list(range(8000)), mm_items=images)
    started = time.perf_counter()
    for _ in range(10):
        prefix_hashes(long_prompt)
    assert (time.perf_counter() - started) / 10 < 0.02  # about 0.5 ms on a 2-core VM
    assert long_prompt._prompt_key_memo is None  # no key per position was built


def shared_blocks_of_position_keys(a: Request, b: Request, block_size: int) -> int:
    """The reference: leading blocks whose Request.position_keys are equal."""
    keys_a, keys_b = a.position_keys(), b.position_keys()
    num = 0
    while (num + 1) * block_size <= min(len(keys_a), len(keys_b)):
        span = slice(num * block_size, (num + 1) * block_size)
        if keys_a[span] != keys_b[span]:
            break
        num += 1
    return num


def test_prefix_hashes_match_exactly_where_position_keys_do():
    def image(hash_, offset, length=6):
        return MultimodalItem(hash=hash_, offset=offset, length=length)

    ids = list(range(40))
    requests = [
        Request("text", ids), Request("text, other end", ids[:30] + [0] * 10),
        Request("image", ids, mm_items=[image(1, 5)]),
        Request("same image", ids[:30] + [7] * 10, mm_items=[image(1, 5)]),
        Request("other image", ids, mm_items=[image(2, 5)]),
        Request("image moved", ids, mm_items=[image(1, 6)]),
        Request("two images", ids, mm_items=[image(1, 5), image(3, 20, 8)]),
        Request("two images, second other", ids, mm_items=[image(1, 5), image(4, 20, 8)]),
        Request("adjacent same", ids, mm_items=[image(1, 5), image(1, 11)]),
        Request("pre key", ids, mm_items=[image(1, 9)], pre_image_key=11),
        Request("pre key, same", ids[:35] + [1] * 5, mm_items=[image(1, 9)], pre_image_key=11),
        Request("pre key other", ids, mm_items=[image(1, 9)], pre_image_key=12),
        Request("image first", ids, mm_items=[image(1, 0)], pre_image_key=11),
    ]
    for block_size in (3, 4, 8):
        hashes = {r.rid: prefix_hashes(r, block_size) for r in requests}
        for a in requests:
            for b in requests:
                shared = 0
                for ha, hb in zip(hashes[a.rid], hashes[b.rid]):
                    if ha != hb:
                        break
                    shared += 1
                assert shared == shared_blocks_of_position_keys(a, b, block_size), (a.rid, b.rid)


def test_a_dead_replica_fails_its_own_requests_is_skipped_and_restarted():
    router = fake_router(num_replicas=2, max_restarts=1)
    factory = router._start_replica
    try:
        got = [submit(router, f"r{i}", [i]) for i in range(4)]
        dead = router.replicas[0].client
        dead.die()
        assert [err is not None for g in got for _, err in g] == [True, True]  # replica 0's two
        assert loads(router) == [0, 2]
        submit(router, "while down", [1])
        assert router.replica_of("while down") == 1  # skipped at once, before the monitor looks
        assert router.is_alive() and router.failure is None
        wait_for(lambda: router.replicas[0].client is not dead and router.replicas[0].is_serving())
        assert router.replicas[0].num_restarts == 1 and len(factory.started) == 3
        assert dead.stopped  # reaped by the restart
        submit(router, "after", [2])
        assert router.replica_of("after") == 0  # the least loaded again
        # Its restarts spent, a replica that dies again stays down.
        router.replicas[0].client.die()
        wait_for(lambda: router.replicas[0].state == Replica.DOWN)
        time.sleep(3 * replicas_module.MONITOR_INTERVAL_S)
        assert len(factory.started) == 3
    finally:
        router.stop()


def test_with_every_replica_dead_requests_fail_at_once_and_failure_says_why():
    router = fake_router(num_replicas=2, max_restarts=0)
    try:
        for replica in router.replicas:
            replica.client.die(f"was killed ({replica.index})")
        assert not router.is_alive()
        assert "[DP 0] was killed (0)" in router.failure
        assert "[DP 1] was killed (1)" in router.failure
        got = submit(router, "late", [1])
        assert got and isinstance(got[0][1], EngineDeadError)
        with pytest.raises(EngineDeadError):
            router.command("stats")
    finally:
        router.stop()
    assert router.failure is None  # stopped on purpose, as a stopped CoreClient


def test_a_failed_restart_is_retried_then_the_replica_stays_down():
    router = fake_router(num_replicas=2, max_restarts=2)
    try:
        router._start_replica.fail_starts = True
        router.replicas[1].client.die()
        wait_for(lambda: router.replicas[1].state == Replica.DOWN)
        assert router.replicas[1].num_restarts == 2 and router.is_alive()
    finally:
        router.stop()


def test_commands_fan_out_stats_merge_and_the_watchdog_sees_the_longest_step():
    router = fake_router(num_replicas=3, max_restarts=0)
    try:
        assert router.command("flush_cache") is True
        router.replicas[2].client.flushes = False
        assert router.command("flush_cache") is False  # true only if every replica flushed
        router.replicas[0].client.stats = {"num_running_reqs": 3, "token_usage": 0.1}
        router.replicas[1].client.die()  # dead replicas are listed, not merged
        submit(router, "r", [1])
        stats = router.command("stats")
        assert stats["num_running_reqs"] == 4 and stats["token_usage"] == pytest.approx(0.3)
        assert stats["num_serving_replicas"] == 2
        per_replica = {r["replica"]: r for r in stats["replicas"]}
        assert per_replica[0]["num_running_reqs"] == 3 and per_replica[1]["serving"] == 0.0
        assert sum(r["num_in_flight"] for r in stats["replicas"]) == 1
        assert router.step_running_for() is None
        router.replicas[0].client.running_for, router.replicas[2].client.running_for = 1.0, 7.0
        assert router.step_running_for() == 7.0
    finally:
        router.stop()
    assert all(client.stopped for client in router._start_replica.started)


def test_stop_stops_every_replica():
    router = fake_router(num_replicas=2)
    router.stop()
    assert all(r.client.stopped for r in router.replicas) and not router.is_alive()


def test_engine_process_log_records_say_which_replica_and_rank_speaks():
    from pyvlm.entrypoints.engine_core import configure_logging, log_marker
    from pyvlm.entrypoints.replica_spec import ReplicaSpec

    spec = ReplicaSpec(None, None, None, torch.device("cpu"), torch.float32, 16, replica=3)
    spec = pickle.loads(pickle.dumps(spec))  # what the engine process gets
    assert log_marker(spec) == "[DP 3]" and log_marker(spec, 1) == "[DP 3 TP1]"
    assert log_marker(SimpleNamespace(), 0) == "[TP0]" and log_marker(SimpleNamespace()) is None

    def message() -> str:
        return logging.getLogger("x").makeRecord("x", logging.INFO, "f", 1, "hello %d", (7,),
                                                 None).getMessage()

    make_record, level = logging.getLogRecordFactory(), logging.getLogger().level
    try:
        before = message()
        configure_logging((level, None), log_marker(spec))  # what the engine process does
        after = message()
    finally:
        logging.setLogRecordFactory(make_record)  # (this process is no replica)
        logging.getLogger().setLevel(level)
    assert before == "hello 7" and after == "[DP 3] hello 7"


def test_each_replica_gets_its_own_gpus_and_rendezvous_port():
    from pyvlm.config import engine_config
    from pyvlm.entrypoints.replica_spec import replica_spec
    from pyvlm.entrypoints.startup import CoreSpec

    config = engine_config(dp_size=2, tp_size=2, dist_port=29500)
    spec = CoreSpec(config, None, None, torch.device("cuda", 1), torch.float16, 16)
    replicas = [replica_spec(spec, index) for index in range(2)]
    assert [r.device for r in replicas] == [torch.device("cuda", 1), torch.device("cuda", 3)]
    assert [r.config.parallel.dist_port for r in replicas] == [29500, 29501]
    on_cpu = replica_spec(CoreSpec(engine_config(dp_size=2), None, None, torch.device("cpu"),
                                   torch.float32, 16), 1)
    assert on_cpu.device == torch.device("cpu") and on_cpu.replica == 1


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---- two real replicas -----------------------------------------------------------

ENGINE_ARGS = dict(device="cpu", page_size=4, max_total_tokens=4096, context_length=2048)
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


def test_data_parallel_needs_engine_processes(tiny_checkpoint_qwen2_vl):
    with pytest.raises(ValueError, match="engine_process='thread' cannot"):
        pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), engine_process="thread", dp_size=2,
                     **ENGINE_ARGS)


@pytest.fixture(scope="module")
def dp_engine(tiny_checkpoint_qwen2_vl):
    """Two replicas; the last test of this file kills both."""
    engine = pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), engine_process="process",
                          dp_size=2, **ENGINE_ARGS)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_qwen2_vl):
    """dp_size 1 (on a thread: the same tokens as a process, and quicker to start)."""
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), engine_process="thread",
                      **ENGINE_ARGS) as engine:
        yield engine


async def generate_all(engine, prompts, params, images=None, rids=None):
    """Every prompt's output ids (or the error it raised), run at once."""
    async def one(i):
        tokens = []
        try:
            async for delta in engine.async_generate(
                    prompts[i], params, image_data=images[i] if images else None,
                    rid=rids[i] if rids else None):
                tokens += delta["token_ids"]
        except EngineDeadError as exc:
            return exc
        return tokens

    return await asyncio.gather(*(one(i) for i in range(len(prompts))))


def test_two_replicas_give_one_engines_greedy_tokens_and_share_the_work(dp_engine, reference):
    prompts = [f"story number {i} begins" if i % 4 else "<image>\nwhat is this?"
               for i in range(32)]
    images = [None if i % 4 else random_image(40 + i, 60, i) for i in range(32)]
    router = dp_engine.step_loop
    routed_before = [r.num_routed for r in router.replicas]
    got = asyncio.run(generate_all(dp_engine, prompts, GREEDY, images))
    expected = asyncio.run(generate_all(reference, prompts, GREEDY, images))
    assert got == expected and all(len(tokens) == 8 for tokens in got)
    stats = dp_engine.get_stats()
    per_replica = stats["replicas"]
    routed = [r["num_routed"] - before for r, before in zip(per_replica, routed_before)]
    assert sum(routed) == 32 and min(routed) >= 8  # least loaded: about even
    assert stats["num_serving_replicas"] == 2
    assert [r["num_in_flight"] for r in per_replica] == [0, 0]  # every request counted out


def test_a_repeated_image_and_prefix_go_where_they_are_cached(dp_engine):
    router = dp_engine.step_loop
    image = random_image(64, 64, 100)
    prefix = "<image>\n" + "describe every detail of this picture, please. " * 4
    first = dp_engine.generate(prefix + "first", GREEDY, image_data=image)
    assert first["meta_info"]["cached_tokens"] == 0
    hits_before = [r.num_prefix_routed for r in router.replicas]
    for i in range(4):
        again = dp_engine.generate(prefix + f"question {i}", GREEDY, image_data=image)
        assert again["meta_info"]["cached_tokens"] >= router.block_size  # its replica's cache
    hits = [r.num_prefix_routed - before for r, before in zip(router.replicas, hits_before)]
    assert sorted(hits) == [0, 4]  # all four went to the one replica


def test_metrics_and_server_info_report_each_replica(dp_engine, tiny_checkpoint_qwen2_vl):
    from pyvlm.server.app import App
    from pyvlm.server.args import ServerArgs
    from tests.server.conftest import call

    app = App(dp_engine, ServerArgs(model=str(tiny_checkpoint_qwen2_vl),
                                    served_model_name="tiny", enable_metrics=True))
    status, _, metrics = call(app, "GET", "/metrics")
    assert status == 200
    text = metrics.decode()
    assert 'pyvlm:token_usage{model_name="tiny",replica="0"}' in text
    assert 'pyvlm:num_running_reqs{model_name="tiny",replica="1"}' in text
    status, _, info = call(app, "GET", "/get_server_info")
    assert status == 200 and [r["replica"] for r in info["engine_stats"]["replicas"]] == [0, 1]
    assert call(app, "GET", "/health")[0] == 200
    assert dp_engine.flush_cache() is True
    assert all(r["num_cached_pages"] == 0 for r in dp_engine.get_stats()["replicas"])


def test_admission_counts_every_replicas_running_requests(dp_engine, tiny_checkpoint_qwen2_vl):
    from pyvlm.server.app import App
    from pyvlm.server.args import ServerArgs

    def limit(**kwargs) -> int:
        args = ServerArgs(model=str(tiny_checkpoint_qwen2_vl), max_queued_requests=5, **kwargs)
        return App(dp_engine, args).dispatcher.admission.max_in_flight

    assert limit(max_running_requests=3, dp_size=2) == 2 * 3 + 5
    assert limit(max_running_requests=3) == 3 + 5


def test_a_killed_replica_fails_only_its_requests_and_is_restarted(dp_engine, reference):
    router = dp_engine.step_loop
    params = dict(GREEDY, max_new_tokens=1000)
    prompts = [f"a long tale {i}" for i in range(4)]
    rids = [f"kill-{i}" for i in range(4)]
    old_pid = router.replicas[0].client.pid

    async def kill_replica_0_midway():
        run = asyncio.ensure_future(generate_all(dp_engine, prompts, params, rids=rids))
        await asyncio.sleep(0)
        for _ in range(400):  # until each request has produced tokens
            stats = await asyncio.get_running_loop().run_in_executor(None, dp_engine.get_stats)
            if stats["num_running_reqs"] == 4:
                break
            await asyncio.sleep(0.01)
        homes = [router.replica_of(rid) for rid in rids]
        os.kill(old_pid, signal.SIGKILL)
        return homes, await asyncio.wait_for(run, 60)

    homes, results = asyncio.run(kill_replica_0_midway())
    assert sorted(homes) == [0, 0, 1, 1]
    expected = reference.generate([p for p, h in zip(prompts, homes) if h == 1], params)
    survivors = [r for r, h in zip(results, homes) if h == 1]
    assert survivors == [e["output_ids"] for e in expected]  # untouched by the kill
    for result, home in zip(results, homes):
        if home == 0:
            assert isinstance(result, EngineDeadError) and "SIGKILL" in str(result)
    assert dp_engine.health() is None  # replica 1 serves throughout
    wait_for(lambda: router.replicas[0].is_serving(), timeout=120)
    assert router.replicas[0].client.pid != old_pid and router.replicas[0].num_restarts == 1
    assert not os.path.exists(f"/proc/{old_pid}")  # reaped
    routed = router.replicas[0].num_routed
    again = dp_engine.generate(prompts[:2], GREEDY)
    assert router.replicas[0].num_routed > routed  # the restarted replica serves
    assert [r["output_ids"] for r in again] == [
        r["output_ids"] for r in reference.generate(prompts[:2], GREEDY)]


def test_with_every_replica_killed_health_is_503_and_nothing_hangs(dp_engine,
                                                                  tiny_checkpoint_qwen2_vl,
                                                                  caplog):
    """Runs last: it ends the module's engine. The front's log says which
    replica's engine process stopped."""
    from pyvlm.server.app import App
    from pyvlm.server.args import ServerArgs
    from tests.server.conftest import call

    router = dp_engine.step_loop
    router.max_restarts = 0  # no restart: the state to check is "none serves"
    pids = [r.client.pid for r in router.replicas]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: dp_engine.health() is not None, timeout=10)
    assert "[DP 0]" in dp_engine.health() and "[DP 1]" in dp_engine.health()
    for index in (0, 1):
        assert (f"[DP {index}] engine stopped: the engine process was killed by SIGKILL"
                in caplog.text)
    app = App(dp_engine, ServerArgs(model=str(tiny_checkpoint_qwen2_vl), served_model_name="tiny"))
    assert call(app, "GET", "/health")[0] == 503
    started = time.monotonic()
    with pytest.raises(EngineDeadError):
        dp_engine.generate("too late", GREEDY)
    with pytest.raises(EngineDeadError):
        dp_engine.get_stats()
    assert time.monotonic() - started < 2  # refused at once
    dp_engine.shutdown()
    assert time.monotonic() - started < 15
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)  # reaped: no zombies
    assert not [t for t in threading.enumerate() if t.name.startswith("pyvlm-dp-")]
