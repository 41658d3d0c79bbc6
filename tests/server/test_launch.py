"""Launcher start-up, in process on loopback: the port is bound before the
engine loads (a port that cannot be bound fails at once, loading nothing),
answers 503 while the engine loads, and "Ready" is logged once, after the app
that serves requests is in place. (tests/server/test_live_server.py checks
the same through a `python -m pyvlm` subprocess.)"""

import asyncio
import errno
import logging
import os
import signal
import socket
import threading
import urllib.error
import urllib.request

import pytest

from pyvlm.server import launch
from pyvlm.server.args import ServerArgs
from pyvlm.server.launch import Launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RecordsWithAppState(logging.Handler):
    """Keeps (message, was the launcher's app set) of each pyvlm.server record."""

    def __init__(self, launcher: Launcher):
        super().__init__(logging.INFO)
        self.launcher, self.records = launcher, []

    def emit(self, record):
        self.records.append((record.levelno, record.getMessage(), self.launcher.app is not None))

    def __enter__(self):
        logger = logging.getLogger("pyvlm.server")
        self.old_level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger("pyvlm.server")
        logger.removeHandler(self)
        logger.setLevel(self.old_level)

    def ready_lines(self):
        return [(message, app_set) for _, message, app_set in self.records
                if message.startswith("Ready:")]


def run_launcher(launcher: Launcher):
    with RecordsWithAppState(launcher) as log:
        return asyncio.run(launcher.run()), log


def test_a_taken_port_fails_at_once_without_loading_the_engine():
    loads = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, log = run_launcher(Launcher(ServerArgs(port=port), make_engine=loads.append))
    assert code == 2 and loads == []
    [(level, message, _)] = log.records
    assert level == logging.ERROR
    assert f"127.0.0.1:{port}" in message and "already in use" in message and "--port" in message


def test_an_address_that_is_not_local_is_named_with_the_reason():
    port = free_port()
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never an address of this machine.
    launcher = Launcher(ServerArgs(host="192.0.2.1", port=port), make_engine=lambda args: None)
    code, log = run_launcher(launcher)
    [(level, message, _)] = log.records
    assert code == 2 and level == logging.ERROR
    assert message == f"cannot listen on 192.0.2.1:{port}: {os.strerror(errno.EADDRNOTAVAIL)}"


def http_status(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


async def first_answer(url: str):
    while (status := await asyncio.to_thread(http_status, url)) is None:
        await asyncio.sleep(0.02)
    return status


def test_503_while_the_engine_loads_then_ready_is_logged_once(tiny_checkpoint_qwen2):
    args = ServerArgs(model=str(tiny_checkpoint_qwen2), port=free_port(), device="cpu",
                      max_total_tokens=2048, served_model_name="tiny")
    loading = threading.Event()

    def load_when_allowed(engine_args):
        loading.wait(60)  # the real engine, once the test has seen the 503
        return launch._make_engine(engine_args)

    launcher = Launcher(args, make_engine=load_when_allowed)
    base = f"http://127.0.0.1:{args.port}"
    seen = {}

    async def scenario():
        run = asyncio.ensure_future(launcher.run())
        seen["while loading"] = await first_answer(f"{base}/health")
        seen["ready lines while loading"] = list(log.ready_lines())
        loading.set()
        while (status := await asyncio.to_thread(http_status, f"{base}/health")) != 200:
            assert status == 503
            await asyncio.sleep(0.02)
        seen["models"] = await asyncio.to_thread(http_status, f"{base}/v1/models")
        launcher._on_signal(signal.SIGTERM)
        return await run

    with RecordsWithAppState(launcher) as log:
        code = asyncio.run(scenario())
    assert code == 0
    assert seen["while loading"] == 503 and seen["ready lines while loading"] == []
    assert seen["models"] == 200
    # Exactly one "Ready" line, logged when the app answering requests was already set.
    assert log.ready_lines() == [(f"Ready: serving tiny at {base} (OpenAI API under /v1)", True)]
    assert not any(level >= logging.ERROR for level, _, _ in log.records), log.records


def test_a_signal_while_the_engine_loads_shuts_down_without_ever_logging_ready(
        tiny_checkpoint_qwen2):
    args = ServerArgs(model=str(tiny_checkpoint_qwen2), port=free_port(), device="cpu",
                      max_total_tokens=2048)
    loading = threading.Event()
    engines = []

    def load_when_allowed(engine_args):
        loading.wait(60)
        engines.append(launch._make_engine(engine_args))
        return engines[-1]

    launcher = Launcher(args, make_engine=load_when_allowed)

    async def scenario():
        run = asyncio.ensure_future(launcher.run())
        assert await first_answer(f"http://127.0.0.1:{args.port}/health") == 503
        launcher._on_signal(signal.SIGTERM)
        loading.set()
        return await run

    with RecordsWithAppState(launcher) as log:
        code = asyncio.run(scenario())
    assert code == 0 and log.ready_lines() == []
    assert len(engines) == 1
    with pytest.raises(RuntimeError, match="not running"):  # the launcher shut it down
        engines[0].get_stats()
