"""`torchrun --nproc-per-node 2 -m pyvlm --tp-size 2` (gloo on the CPU):
rank 0 serves HTTP and its engine process is rank 0 of the group, rank 1
is torchrun's other process; a chat completion with an image answers what
a one-rank engine answers; the server's SIGTERM ends every process with
status 0; a
killed rank 1 ends the job non-zero within seconds, the in-flight request
answered or cut, never left hanging. torchrun's environment maps onto the
node layout, and flags that contradict it are refused."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import pyvlm
from pyvlm.entrypoints.tensor_parallel_ranks import free_port
from pyvlm.entrypoints.torchrun import TorchrunWorld, under_torchrun
from pyvlm.server.args import ServerArgs
from tests.entrypoints.engine_kills import random_image
from tests.entrypoints.test_tensor_parallel_engine import children_of, wait_gone

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 150
EXIT_TIMEOUT_S = 30
FLAGS = ["--device", "cpu", "--dtype", "float32", "--page-size", "4", "--context-length",
         "1024", "--max-total-tokens", "2048"]


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_messages(seed: int):
    image = random_image(48 + seed % 40, 90 - seed % 30, seed)
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image)}},
        {"type": "text", "text": f"what is in picture {seed}?"}]}]


def post(url: str, body: dict, timeout: float = 120):
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def health(base: str):
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@pytest.fixture
def torchrun_server(tiny_checkpoint_qwen2_vl, tmp_path):
    """(base URL, torchrun's process, its log): 2 ranks serving the tiny
    Qwen2-VL checkpoint; every process is gone after."""
    port, log_path = free_port(), tmp_path / "torchrun.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "pyvlm", "--model", str(tiny_checkpoint_qwen2_vl), "--tp-size", "2",
               "--port", str(port), *FLAGS]
    with open(log_path, "wb") as log:
        job = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while health(base) != 200:
            assert job.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield base, job, log_path
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def rank_pids(job: subprocess.Popen):
    """{rank: pid} of torchrun's processes (their RANK variable)."""
    ranks = {}
    for pid in children_of(job.pid):
        with open(f"/proc/{pid}/environ", "rb") as file:
            environ = dict(entry.split(b"=", 1) for entry in file.read().split(b"\0")
                           if b"=" in entry)
        if b"RANK" in environ:
            ranks[int(environ[b"RANK"])] = pid
    return ranks


def all_processes(job: subprocess.Popen):
    """torchrun, its ranks and their children (rank 0's engine process)."""
    pids, frontier = [job.pid], [job.pid]
    while frontier:
        frontier = [child for pid in frontier for child in children_of(pid)]
        pids += frontier
    return pids


def test_two_torchrun_ranks_answer_as_one_and_leave_on_sigterm(torchrun_server,
                                                               tiny_checkpoint_qwen2_vl):
    base, job, log_path = torchrun_server
    assert sorted(rank_pids(job)) == [0, 1]
    seeds = [int.from_bytes(os.urandom(2), "little") for _ in range(2)]
    params = {"max_tokens": 12, "temperature": 0}
    answers = [post(f"{base}/v1/chat/completions",
                    {"model": "default", "messages": chat_messages(seed), **params})
               for seed in seeds]
    processes = all_processes(job)
    # The server's stop (SIGTERM, as a supervisor sends it) stops rank 1 too:
    # every rank ends with 0, so does torchrun. (A SIGTERM to torchrun
    # itself ends it with 1 by torchrun's design, whatever its ranks do.)
    os.kill(rank_pids(job)[0], signal.SIGTERM)
    assert job.wait(EXIT_TIMEOUT_S) == 0, log_path.read_text()
    assert wait_gone(processes) == []
    log = log_path.read_text()
    assert "started by torchrun" in log and "Traceback" not in log
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2_vl), engine_process="thread",
                      device="cpu", dtype="float32", page_size=4, context_length=1024,
                      max_total_tokens=2048) as reference:
        for seed, (status, body) in zip(seeds, answers):
            assert status == 200, body
            expected = reference.generate(messages=chat_messages(seed),
                                          sampling_params={"max_new_tokens": 12,
                                                           "temperature": 0})
            assert body["choices"][0]["message"]["content"] == expected["text"]


def test_a_killed_rank_ends_the_torchrun_job(torchrun_server):
    base, job, log_path = torchrun_server
    answer = {}

    def long_request():
        try:
            answer["reply"] = post(f"{base}/generate", {
                "text": "a long story", "sampling_params": {
                    "max_new_tokens": 900, "temperature": 0, "ignore_eos": True}}, timeout=60)
        except OSError as exc:  # the server was stopped with the job: the connection ends
            answer["error"] = exc

    processes = all_processes(job)
    request = threading.Thread(target=long_request)
    request.start()
    time.sleep(1.0)  # decoding (900 tokens take far longer)
    os.kill(rank_pids(job)[1], signal.SIGKILL)
    killed_at = time.monotonic()
    assert job.wait(EXIT_TIMEOUT_S) != 0, log_path.read_text()
    assert time.monotonic() - killed_at < EXIT_TIMEOUT_S
    request.join(30)
    assert not request.is_alive()
    assert "error" in answer or answer["reply"][0] == 503, answer
    assert wait_gone(processes) == []


# ---- torchrun's environment --------------------------------------------------------

def test_torchrun_environment_sets_the_node_layout():
    environ = {"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "WORLD_SIZE": "8",
               "LOCAL_WORLD_SIZE": "4"}
    world = TorchrunWorld.from_environ(environ)
    assert world == TorchrunWorld(rank=5, world_size=8, local_world_size=4)
    args = under_torchrun(ServerArgs(tp_size=8), world)
    assert (args.torchrun, args.nnodes, args.node_rank) == (True, 2, 1)
    assert args.engine_kwargs()["torchrun"] is True
    assert TorchrunWorld.from_environ({"RANK": "0", "WORLD_SIZE": "2"}) is None
    with pytest.raises(ValueError, match="lacks a valid 'LOCAL_WORLD_SIZE'"):
        TorchrunWorld.from_environ({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("args, message", [
    (ServerArgs(tp_size=4), "torchrun started 2 processes: pass --tp-size 2"),
    (ServerArgs(tp_size=2, dp_size=2), "--dp-size > 1 does not run under torchrun"),
    (ServerArgs(tp_size=2, nnodes=2, dist_init_addr="h:1"), "pass the node layout to torchrun"),
])
def test_flags_that_contradict_torchrun_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        under_torchrun(args, TorchrunWorld(rank=0, world_size=2, local_world_size=2))
