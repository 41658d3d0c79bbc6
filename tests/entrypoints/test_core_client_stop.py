"""CoreClient.stop() reads the engine process's exit from its sentinel: a
process that exited is never reported as hung ("did not stop within 30 s;
killing it", logged on GPU runs about a second after the last request),
whoever reaped it: the reader thread, which waits for the same exit when
the connection closes, or anyone else. Driven with a stub engine process
(stub_engine_core.py) whose exit, as a CUDA process's, closes its files
before it can be reaped."""

import logging
import os
import time

import pytest

from pyvlm.entrypoints import core_client
from pyvlm.entrypoints.core_client import CoreClient
from pyvlm.scheduling.errors import EngineDeadError

from stub_engine_core import run_stub_engine_core

HUNG = "did not stop"


@pytest.fixture
def stub_core(monkeypatch):
    monkeypatch.setattr(core_client, "run_engine_core", run_stub_engine_core)


def test_stop_while_the_reader_thread_reaps_the_same_exit(stub_core, caplog):
    # Both threads wait for the exit; of two waitpid calls on one child the
    # loser gets ECHILD, which multiprocessing reads as "still running".
    for _ in range(3):
        client = CoreClient(spec=None)
        client.wait_ready()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="pyvlm.engine"):
            client.stop(timeout=20)
        assert time.monotonic() - started < 10
        assert HUNG not in caplog.text
        assert client._process.exitcode == 0  # it exited by itself: not killed
        assert not client._reader.is_alive()


def test_stop_of_a_process_reaped_elsewhere_is_not_a_hang(stub_core, monkeypatch, caplog):
    monkeypatch.setenv("STUB_SILENT", "1")
    client = CoreClient(spec=None)  # (no reader thread: it never said Ready)
    process = client._process
    pid, _ = os.waitpid(process.pid, 0)  # someone else reaps it
    assert pid == process.pid
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pyvlm.engine"):
        client.stop(timeout=20)
    assert time.monotonic() - started < 5
    assert HUNG not in caplog.text


def test_wait_ready_reports_a_process_that_exited_silently(stub_core, monkeypatch):
    monkeypatch.setenv("STUB_SILENT", "1")
    client = CoreClient(spec=None)
    started = time.monotonic()
    with pytest.raises(EngineDeadError, match="exited with status 0 while starting"):
        client.wait_ready()
    # The spawn and the stub's imports are in this time (9 s once, on a 2-core
    # machine under load): the bound tells a noticed exit from a wait_ready
    # that would never return.
    assert time.monotonic() - started < 60
    client.stop()
