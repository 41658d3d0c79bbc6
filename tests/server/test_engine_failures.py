"""What the server does when its engine cannot go on: after a device failure
/health turns 503, the request in flight gets a 503 (never a hang or a
traceback), new work is refused, and the launcher exits 4 for its supervisor;
a step hung past --watchdog-timeout makes the process dump every thread's
stack and exit 3."""

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pyvlm.scheduling.errors import DeviceFailure
from pyvlm.server import launch
from pyvlm.server.args import ServerArgs
from tests.server.test_launch import first_answer, free_port, http_status

CHAT = {"messages": [{"role": "user", "content": "the cat sat"}], "max_tokens": 8,
        "temperature": 0}


def post(url: str, body: dict):
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def fail_device_in_decode(stage, chunks):
    if stage == "decode":
        raise DeviceFailure("injected: an illegal memory access was encountered")


def test_a_device_failure_makes_the_server_unhealthy_and_exit_4(tiny_checkpoint_qwen2):
    args = ServerArgs(model=str(tiny_checkpoint_qwen2), port=free_port(), device="cpu",
                      max_total_tokens=2048)

    def make_failing_engine(engine_args):
        engine = launch._make_engine(engine_args)
        engine.state.runner.fault_hook = fail_device_in_decode
        return engine

    launcher = launch.Launcher(args, make_engine=make_failing_engine)
    base = f"http://127.0.0.1:{args.port}"
    seen = {}

    async def scenario():
        run = asyncio.ensure_future(launcher.run())
        while await first_answer(f"{base}/health") != 200:
            await asyncio.sleep(0.05)
        seen["chat"] = await asyncio.to_thread(post, f"{base}/v1/chat/completions", CHAT)
        seen["health"] = await asyncio.to_thread(http_status, f"{base}/health")
        return await asyncio.wait_for(run, 30)

    assert asyncio.run(scenario()) == 4
    status, body = seen["chat"]
    assert status == 503 and "device failed" in body["error"]["message"]
    assert body["error"]["type"] == "service_unavailable_error"
    assert seen["health"] in (503, None)  # 503, or already closed by the exiting launcher


def test_a_hung_step_dumps_stacks_and_exits_3(tiny_checkpoint_qwen2):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.getcwd(), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.server.hung_engine_server", str(tiny_checkpoint_qwen2),
         str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while http_status(f"http://127.0.0.1:{port}/health") != 200:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        started = time.monotonic()
        try:  # hangs in the engine until the watchdog ends the process
            post(f"http://127.0.0.1:{port}/v1/chat/completions", CHAT)
        except OSError:
            pass
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 3, stderr[-2000:]
    assert time.monotonic() - started < 15
    assert "watchdog: an engine step has run for" in stderr
    # faulthandler's dump: the engine thread, stopped inside the hanging hook.
    assert "most recent call first" in stderr
    assert "hang_in_prefill" in stderr and "step_loop.py" in stderr
