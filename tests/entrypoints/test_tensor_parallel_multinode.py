"""Multi-node tensor parallelism (--nnodes, --node-rank, --dist-init-addr),
two "nodes" on this host: node 0 is a pyvlm.Engine (tp_size 2, rank 0 in
its engine process, no local worker), node 1 is `python -m pyvlm
--node-rank 1` (its rank 1), meeting at a TCP rendezvous on 127.0.0.1.
Greedy tokens and prefix-cache hits equal one rank's; node 0's shutdown
ends node 1 with status 0; a killed node 1 fails node 0's requests with
EngineDeadError within seconds; a killed node 0 ends node 1 with status 1.
The flags' checks refuse impossible layouts with a message naming them."""

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import pyvlm
from pyvlm.config import ParallelConfig
from pyvlm.entrypoints import tensor_parallel_runner
from pyvlm.entrypoints.tensor_parallel_ranks import (check_node_layout, free_port,
                                                     rendezvous_address)
from pyvlm.entrypoints.tensor_parallel_runner import CheckRanks, RunStep, TensorParallelRunner
from pyvlm.scheduling.errors import DeviceFailure, EngineDeadError
from pyvlm.scheduling.types import ForwardBatch
from pyvlm.server.args import ServerArgs, add_server_arguments, server_args_from
from tests.entrypoints.test_tensor_parallel_engine import (ENGINE_ARGS, GREEDY, LONG,
                                                           children_of, workload)

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120
EXIT_TIMEOUT_S = 20  # node 1 leaves within this of node 0's end


def node_flags(checkpoint, address: str, node_rank: int):
    """ENGINE_ARGS as `python -m pyvlm` flags, for a 2-rank, 2-node engine."""
    flags = ["--model", str(checkpoint), "--tp-size", "2", "--nnodes", "2",
             "--node-rank", str(node_rank), "--dist-init-addr", address]
    for name, value in ENGINE_ARGS.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def start_node1(checkpoint, address: str, log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "pyvlm",
                                 *node_flags(checkpoint, address, node_rank=1)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def start_node0(checkpoint, address: str, node1: subprocess.Popen, log_path: Path):
    """The Engine of node 0, built on a thread while node 1 is watched: a
    node 1 that died would leave node 0 waiting at the rendezvous."""
    built = {}

    def build():
        try:
            built["engine"] = pyvlm.Engine(model=str(checkpoint), tp_size=2, nnodes=2,
                                           node_rank=0, dist_init_addr=address, **ENGINE_ARGS)
        except BaseException as exc:  # noqa: BLE001 - reported below
            built["error"] = exc

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while thread.is_alive() and node1.poll() is None and time.monotonic() < deadline:
        thread.join(0.2)
    if thread.is_alive():
        node1.kill()
        pytest.fail(f"node 0 did not start (node 1: {node1.poll()}):\n{log_path.read_text()}")
    if "error" in built:
        raise built["error"]
    return built["engine"]


@pytest.fixture
def two_nodes(tiny_checkpoint_qwen2_vl, tmp_path):
    """(engine of node 0, node 1's process, its log); both ended after."""
    address = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "node1.log"
    node1 = start_node1(tiny_checkpoint_qwen2_vl, address, log_path)
    try:
        engine = start_node0(tiny_checkpoint_qwen2_vl, address, node1, log_path)
        try:
            yield engine, node1, log_path
        finally:
            engine.shutdown()
    finally:
        if node1.poll() is None:
            node1.kill()
        node1.wait()


def rank_processes(pid: int):
    """The spawned children of pid (not multiprocessing's resource tracker)."""
    def cmdline(child: int) -> bytes:
        with open(f"/proc/{child}/cmdline", "rb") as file:
            return file.read()
    return [child for child in children_of(pid) if b"spawn_main" in cmdline(child)]


def wait_exit(process: subprocess.Popen, log_path: Path) -> int:
    try:
        return process.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node 1 still runs {EXIT_TIMEOUT_S} s after node 0 ended:\n"
                    f"{log_path.read_text()}")


def test_two_nodes_equal_one_rank_and_node_1_leaves_with_node_0(
        two_nodes, tiny_checkpoint_qwen2_vl):
    engine, node1, log_path = two_nodes
    assert children_of(engine.step_loop.pid) == []  # rank 1 is node 1's
    assert len(rank_processes(node1.pid)) == 1
    got = workload(engine)
    engine.shutdown()
    assert wait_exit(node1, log_path) == 0, log_path.read_text()
    assert engine.step_loop._process.exitcode == 0
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), engine_process="thread",
                      **ENGINE_ARGS) as reference:
        expected = workload(reference)
    assert got["tokens"] == expected["tokens"]
    assert got["cached"] == expected["cached"] and got["cached"][1] > 0


def test_a_killed_node_1_fails_node_0s_requests_quickly(two_nodes):
    engine, node1, _ = two_nodes

    async def kill_while_streaming() -> float:
        stream = engine.async_generate("a long story", LONG)
        await stream.__anext__()
        node1.send_signal(signal.SIGKILL)  # its rank exits with it (parent watch)
        killed_at = time.monotonic()
        with pytest.raises(EngineDeadError, match="tensor-parallel rank"):
            async for _ in stream:
                pass
        return time.monotonic() - killed_at

    assert asyncio.run(asyncio.wait_for(kill_while_streaming(), 60)) < 15
    started = time.monotonic()
    with pytest.raises(EngineDeadError):
        engine.generate("too late", GREEDY)
    # Refused at once, not after a wait for the dead rank: a bound well under
    # any wait, with room for a loaded 2-core CI machine (it once read 2.0 s
    # there, 14 minutes into the suite; alone it takes milliseconds).
    assert time.monotonic() - started < 5


def test_a_killed_node_0_ends_node_1_with_a_failure(two_nodes):
    engine, node1, log_path = two_nodes
    assert engine.generate("hello", GREEDY)["output_ids"]
    os.kill(engine.step_loop.pid, signal.SIGKILL)
    assert wait_exit(node1, log_path) == 1
    assert "this node stops" in log_path.read_text()


# ---- the flags ---------------------------------------------------------------------

def parse(*argv: str) -> ServerArgs:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return server_args_from(parser.parse_args(list(argv)))


def test_node_flags_reach_the_engine_config():
    args = parse("--tp-size", "4", "--nnodes", "2", "--node-rank", "1",
                 "--dist-init-addr", "10.0.0.1:5000")
    parallel = ParallelConfig(**{k: v for k, v in args.engine_kwargs().items()
                                 if k in ParallelConfig.__dataclass_fields__})
    assert (parallel.nnodes, parallel.node_rank, parallel.dist_init_addr) == (2, 1,
                                                                               "10.0.0.1:5000")
    assert parallel.node_ranks() == range(2, 4)
    assert rendezvous_address(parallel) == "10.0.0.1:5000"
    assert ParallelConfig(tp_size=4, nnodes=2).node_ranks() == range(0, 2)
    assert ParallelConfig.split_address("[::1]:29500") == ("::1", 29500)
    assert rendezvous_address(ParallelConfig(dist_init_addr="[::1]:29500")) == "[::1]:29500"
    assert rendezvous_address(ParallelConfig(dist_port=29501)) == "127.0.0.1:29501"
    assert parse().nnodes == 1 and parse().dist_init_addr is None


@pytest.mark.parametrize("argv, message", [
    (["--tp-size", "3", "--nnodes", "2", "--dist-init-addr", "h:1"],
     r"--tp-size \(3\) must be a multiple of --nnodes \(2\)"),
    (["--nnodes", "0"], "--nnodes must be >= 1"),
    (["--tp-size", "2", "--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"],
     r"--node-rank must be in 0..1"),
    (["--node-rank", "-1"], r"--node-rank must be in 0..0"),
    (["--tp-size", "2", "--nnodes", "2"], "--nnodes > 1 needs --dist-init-addr"),
    (["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", "node0"],
     "--dist-init-addr: 'node0' is not HOST:PORT"),
    (["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", "node0:70000"],
     "--dist-init-addr: 'node0:70000' is not HOST:PORT"),
    (["--tp-size", "2", "--nnodes", "2", "--dp-size", "2", "--dist-init-addr", "h:1"],
     "--dp-size > 1 takes neither --nnodes > 1 nor --dist-init-addr"),
    (["--tp-size", "2", "--dp-size", "2", "--dist-init-addr", "h:1"],
     "--dp-size > 1 takes neither"),
])
def test_impossible_node_layouts_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)


@pytest.mark.parametrize("layout, message", [
    (dict(tp_size=3, nnodes=2, dist_init_addr="h:1"), "tp_size 3 must be a multiple of nnodes 2"),
    (dict(tp_size=2, nnodes=2, node_rank=2, dist_init_addr="h:1"), r"node_rank must be in 0..1"),
    (dict(tp_size=2, nnodes=2), "nnodes > 1 needs dist_init_addr"),
])
def test_the_engine_refuses_impossible_node_layouts_too(layout, message):
    check_node_layout(ParallelConfig(tp_size=2, nnodes=2, dist_init_addr="h:1"))  # fine
    with pytest.raises(ValueError, match=message):
        check_node_layout(ParallelConfig(**layout))


def test_the_cli_refuses_a_node_layout_in_one_line():
    result = subprocess.run([sys.executable, "-m", "pyvlm", "--tp-size", "2", "--nnodes", "2",
                             "--node-rank", "1"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "--nnodes > 1 needs --dist-init-addr" in result.stderr


# ---- a failed step: a bad request, or a rank gone on another node ------------------

class FailingRunner:
    def launch(self, batch):
        raise ValueError("a bad request")


@pytest.mark.parametrize("ranks_answer", [True, False])
def test_a_failed_step_is_a_device_failure_only_when_a_rank_no_longer_answers(
        monkeypatch, ranks_answer):
    sent = []

    def answer(group):
        if not ranks_answer:
            raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(tensor_parallel_runner, "broadcast_message",
                        lambda message, group: sent.append(message))
    monkeypatch.setattr(tensor_parallel_runner, "answer_check", answer)
    ranks = SimpleNamespace(groups=SimpleNamespace(objects="objects"), stop=lambda leave: None,
                            death=lambda timeout: None)
    runner = TensorParallelRunner(FailingRunner(), ranks)
    batch = ForwardBatch(is_decode=True)
    expected = ValueError if ranks_answer else DeviceFailure
    with pytest.raises(expected, match="a bad request" if ranks_answer else "stopped answering"):
        runner.launch(batch)
    runner.shutdown()
    assert sent == [RunStep(batch), CheckRanks()]
