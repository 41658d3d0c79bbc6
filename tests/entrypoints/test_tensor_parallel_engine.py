"""Tensor-parallel engines (tp_size > 1; gloo on the CPU): greedy tokens and
prefix-cache hits equal one rank's on Qwen2-VL and LLaVA (text, images,
chunked prefill, and a pool too small for the batch: preemption), over 2
and 4 ranks; shutdown stops and reaps every rank; a killed worker rank
fails in-flight and later requests with EngineDeadError at once and takes
every process down, and workers exit with a killed engine process; thread
mode is refused. Rank 0's runner mirrors each call to the workers in
order, and a worker goes on after a step that failed (as rank 0 isolates
its request). The images of a step are split over the ranks
(mm_encoder_tp_mode "data", the default) or every rank runs them through
its slice of the tower ("weights")."""

import os
import signal
import socket
import time
from types import SimpleNamespace

import pytest
import torch

import pyvlm
from pyvlm.entrypoints import tensor_parallel_runner
from pyvlm.entrypoints.tensor_parallel_runner import (FreeEncoderCache, RunStep, RunTokenLogits,
                                                      StopRanks, TensorParallelRunner,
                                                      serve_steps)
from pyvlm.scheduling.errors import DeviceFailure, EngineDeadError
from pyvlm.scheduling.types import ForwardBatch
from tests.entrypoints.engine_kills import kill_while_in_flight, random_image, refused_at_once

POOL_TOKENS = 320  # the preemption batch needs twice that; any one request fits
ENGINE_ARGS = dict(device="cpu", dtype="float32", page_size=4, context_length=1024,
                   chunked_prefill_size=16, max_total_tokens=POOL_TOKENS,
                   schedule_conservativeness=0.0)  # admit together, then preempt
GREEDY = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
LONG = dict(GREEDY, max_new_tokens=900)
WORDS = "the cat sat on a mat while seven quick zebras jumped over lazy dogs".split()


def words(n: int, seed: int) -> str:
    """n words led by the seed: prompts of different seeds share no cache
    page, so which of them hit the prefix cache never depends on timing."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (n,), generator=generator).tolist()
    return f"{seed}: " + " ".join(WORDS[i] for i in picks)


def children_of(pid: int):
    """Pids whose parent is pid (/proc: zombies included)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def wait_gone(pids, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.05)
    return [p for p in pids if os.path.exists(f"/proc/{p}")]


def workload(engine) -> dict:
    """Greedy outputs of: a batch of text and image prompts (chunked: over
    16 tokens), one prompt twice (the second hits the prefix cache), a batch
    of which one request has penalties, and a batch the pool cannot hold at
    once (preemption)."""
    image = engine.builder.image_token
    mixed = engine.generate(
        [words(5, 0), f"{image}\n{words(6, 1)}", f"{words(3, 2)} {image} {words(20, 3)}"],
        GREEDY, image_data=[None, random_image(60, 90, 0), random_image(50, 40, 1)])
    repeated = [engine.generate(f"{image}\n{words(9, 4)}", GREEDY,
                                image_data=random_image(64, 64, 2)) for _ in range(2)]
    # Penalties read the ids a step sends only for the requests that have them.
    penalized = engine.generate([words(7, 5), words(9, 6)], [
        GREEDY, dict(GREEDY, repetition_penalty=1.3, frequency_penalty=0.4)])
    # Far more than the pool: requests admitted as they come (whenever that
    # is) outgrow it while they decode.
    crowd = engine.generate([words(12 + i, 10 + i) for i in range(8)],
                            dict(GREEDY, max_new_tokens=60))
    return {"tokens": [r["output_ids"] for r in mixed + repeated + penalized + crowd],
            "cached": [r["meta_info"]["cached_tokens"] for r in repeated],
            "preemptions": engine.get_stats().get("num_preemptions", 0)}


@pytest.fixture(scope="module")
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


@pytest.fixture(scope="module")
def one_rank(checkpoint):
    """The reference: tp_size 1, on a thread of this process."""
    with pyvlm.Engine(model=str(checkpoint), engine_process="thread", **ENGINE_ARGS) as engine:
        return workload(engine)


def assert_all_exited(pids) -> None:
    """Every process exited and was reaped (no zombie), and none left
    shared memory named after it in /dev/shm."""
    assert wait_gone(pids) == []
    assert not [name for name in os.listdir("/dev/shm") for pid in pids if f"_{pid}_" in name]


# (tp_size, mm_encoder_tp_mode) runs: the images split over the ranks, or the
# tower's layers split (the tiny towers' heads divide by 2 and 4).
@pytest.mark.parametrize("checkpoint, runs", [
    ("qwen2_vl", [(2, "data"), (2, "weights")]),
    ("llava", [(2, "data"), (4, "data"), (4, "weights")]),
    ("mllama", [(2, "data")])], indirect=["checkpoint"])
def test_tensor_parallel_outputs_equal_one_ranks(checkpoint, runs, one_rank):
    for tp_size, mode in runs:
        engine = pyvlm.Engine(model=str(checkpoint), tp_size=tp_size, mm_encoder_tp_mode=mode,
                              **ENGINE_ARGS)
        try:
            engine_pid = engine.step_loop.pid  # tp_size > 1: an engine process even on the CPU
            workers = children_of(engine_pid)
            assert len(workers) == tp_size - 1
            got = workload(engine)
        finally:
            engine.shutdown()
        differ = [i for i, (a, b) in enumerate(zip(got["tokens"], one_rank["tokens"])) if a != b]
        assert differ == [], (tp_size, mode, differ, got, one_rank)
        assert got["cached"] == one_rank["cached"] and got["cached"][1] > 0
        assert got["preemptions"] > 0 and one_rank["preemptions"] > 0  # (how many: timing)
        # Shutdown stopped every rank cleanly and reaped it.
        assert engine.step_loop._process.exitcode == 0
        assert_all_exited([engine_pid] + workers)


def test_a_killed_worker_rank_fails_requests_at_once_and_ends_every_rank(
        tiny_checkpoint_qwen2_vl):
    engine = pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), tp_size=2, **ENGINE_ARGS)
    engine_pid = engine.step_loop.pid
    (worker,) = children_of(engine_pid)
    try:
        kill_while_in_flight(engine, worker, LONG, "tensor-parallel rank 1 .* killed by SIGKILL",
                             "tensor-parallel rank 1")
        refused_at_once(lambda: engine.generate("too late", GREEDY))
    finally:
        engine.shutdown()
    assert engine.step_loop._process.exitcode == 1
    assert_all_exited([engine_pid, worker])


def test_worker_ranks_exit_with_a_killed_engine_process(tiny_checkpoint_qwen2_vl):
    engine = pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), tp_size=2, **ENGINE_ARGS)
    try:
        (worker,) = children_of(engine.step_loop.pid)
        os.kill(engine.step_loop.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="killed by SIGKILL"):
            engine.generate("too late", GREEDY)
    finally:
        engine.shutdown()
    # The orphan exits on its own; whoever adopted it (init) reaps it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process_state(worker) not in (None, "Z"):
        time.sleep(0.05)
    assert process_state(worker) in (None, "Z")


def process_state(pid: int):
    """The process's state letter (R, S, Z...), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_a_rendezvous_port_in_use_fails_the_start(tiny_checkpoint_qwen2_vl):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="address already in use"):
            pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), tp_size=2,
                         dist_port=taken.getsockname()[1], **ENGINE_ARGS)


def test_thread_mode_cannot_run_tensor_parallel_ranks(tiny_checkpoint_qwen2_vl):
    with pytest.raises(ValueError, match="tp_size > 1.*engine_process='thread' cannot"):
        pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), engine_process="thread", tp_size=2,
                     **ENGINE_ARGS)
    with pytest.raises(ValueError, match="cannot be split over tensor-parallel ranks"):
        pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), loaded_model=torch.nn.Linear(1, 1),
                     tp_size=2, **ENGINE_ARGS)


# ---- the runner's messages, without processes ------------------------------------

class RecordingRunner:
    """A local runner that records its calls (and raises on request)."""

    def __init__(self, fail_on=()):
        self.calls, self.fail_on, self.num_pages = [], fail_on, 7

    def launch(self, batch):
        self.calls.append(("launch", batch))
        if batch in self.fail_on:
            raise ValueError("a bad request")
        return SimpleNamespace(wait=lambda: ["sampled"])

    def token_logits(self, batch):
        self.calls.append(("token_logits", batch))

    def free_encoder_cache(self):
        self.calls.append(("free_encoder_cache",))


def test_rank_zero_broadcasts_each_call_before_making_it(monkeypatch):
    sent, local = [], RecordingRunner()
    monkeypatch.setattr(tensor_parallel_runner, "broadcast_message",
                        lambda message, group: sent.append((message, len(local.calls))))
    ranks = SimpleNamespace(groups=SimpleNamespace(objects="objects"), stop=lambda leave: leave())
    runner = TensorParallelRunner(local, ranks)
    batch = ForwardBatch(is_decode=True)
    assert runner.forward(batch) == ["sampled"] and runner.num_pages == 7
    runner.token_logits(batch)
    runner.free_encoder_cache()
    runner.shutdown()
    # Each message went out before the local call it announces (the workers'
    # collectives meet rank 0's), in the scheduler's order.
    assert sent == [(RunStep(batch), 0), (RunTokenLogits(batch), 1), (FreeEncoderCache(), 2),
                    (StopRanks(), 3)]


def test_a_worker_goes_on_after_a_failed_step_and_stops_on_device_failure(monkeypatch):
    bad, good = ForwardBatch(is_decode=False), ForwardBatch(is_decode=True)
    messages = iter([RunStep(bad), RunStep(good), FreeEncoderCache(), StopRanks()])
    monkeypatch.setattr(tensor_parallel_runner, "broadcast_message",
                        lambda message, group: next(messages))
    runner = RecordingRunner(fail_on=[bad])
    serve_steps(runner, "objects", rank=1)
    assert runner.calls == [("launch", bad), ("launch", good), ("free_encoder_cache",)]

    def device_fails(batch):
        raise DeviceFailure("gone")

    runner.launch = device_fails
    messages = iter([RunStep(good)])
    with pytest.raises(DeviceFailure):
        serve_steps(runner, "objects", rank=1)
