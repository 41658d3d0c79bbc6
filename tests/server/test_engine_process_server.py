"""The server over an engine process (--engine-process process): Ctrl-C
(SIGINT to the whole process group) lets the request in flight finish,
stops the engine process and exits 0; an engine process killed under load
turns /health to 503, answers the request in flight with a 503, and the
server exits 4 (for its supervisor to restart it), never hanging."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time

from pyvlm.server.args import ServerArgs
from pyvlm.server.launch import Launcher
from tests.server.test_engine_failures import post
from tests.server.test_launch import first_answer, free_port, http_status

LONG = {"text": "a long story", "sampling_params": {"max_new_tokens": 3000, "temperature": 0,
                                                    "ignore_eos": True}}
SHORT = dict(LONG, sampling_params=dict(LONG["sampling_params"], max_new_tokens=100))


def is_running(pid: int) -> bool:
    """True while pid is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ctrl_c_finishes_the_request_in_flight_and_stops_the_engine_process(
        tiny_checkpoint_qwen2):
    args = ServerArgs(model=str(tiny_checkpoint_qwen2), port=free_port(), device="cpu",
                      max_total_tokens=4096, engine_process="process")
    launcher = Launcher(args)
    base = f"http://127.0.0.1:{args.port}"
    seen = {}

    async def scenario():
        run = asyncio.ensure_future(launcher.run())
        while await first_answer(f"{base}/health") != 200:
            await asyncio.sleep(0.05)
        seen["pid"] = launcher.engine.step_loop.pid
        in_flight = asyncio.ensure_future(asyncio.to_thread(post, f"{base}/generate", SHORT))
        while launcher.engine.get_stats()["num_running_reqs"] == 0:
            await asyncio.sleep(0.01)
        # A terminal's Ctrl-C reaches the whole process group.
        os.kill(seen["pid"], signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        seen["in flight"] = await in_flight
        return await asyncio.wait_for(run, 30)

    assert asyncio.run(scenario()) == 0
    status, body = seen["in flight"]
    assert status == 200 and len(body["output_ids"]) == 100
    assert launcher.engine.step_loop._process.exitcode == 0
    assert not is_running(seen["pid"])


def test_a_killed_engine_process_gives_503s_and_the_server_exits_4(tiny_checkpoint_qwen2,
                                                                     tmp_path):
    port, log_path = free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "pyvlm", "--model", str(tiny_checkpoint_qwen2), "--port",
               str(port), "--device", "cpu", "--page-size", "4", "--max-total-tokens", "4096",
               "--engine-process", "process"]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while http_status(f"{base}/health") != 200:
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        pid = int(re.search(r"Engine process started \(pid (\d+)\)",
                            log_path.read_text()).group(1))
        answers = {}
        in_flight = threading.Thread(target=lambda: answers.update(
            generate=post(f"{base}/generate", LONG)))
        in_flight.start()
        time.sleep(1.0)  # the request is decoding (3000 tokens take far longer)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while (health := http_status(f"{base}/health")) == 200:
            assert time.monotonic() - killed_at < 5
        answers["health"] = health
        in_flight.join(15)
        assert server.wait(timeout=30) == 4
        assert time.monotonic() - killed_at < 15
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    log = log_path.read_text()
    status, body = answers["generate"]
    assert status == 503 and "killed by SIGKILL" in body["error"]["message"], body
    assert answers["health"] == 503
    assert "the engine stopped (the engine process was killed by SIGKILL)" in log
    assert "Traceback" not in log
    assert not is_running(pid)
