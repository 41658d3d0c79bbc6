"""A stand-in for the engine process's entry point (run_engine_core) that
speaks its protocol and loads nothing: Ready, then on Stop, Closed and an
exit whose files close before the process can be reaped, as a CUDA
process's do (the driver's teardown runs after the connection and the
sentinel have closed). STUB_EXIT_S: how long that exit takes; STUB_SILENT:
close the files and exit without a word (no Ready)."""

import os
import time

from pyvlm.entrypoints import core_channel
from pyvlm.entrypoints.core_messages import Closed, Ready, Stop, encode


def run_stub_engine_core(spec, conn, clock_cell, log_settings) -> None:
    if not os.environ.get("STUB_SILENT"):
        conn.send_bytes(encode(Ready(os.getpid())))
        _serve_until_stop(conn)
    os.closerange(0, os.sysconf("SC_OPEN_MAX"))  # the sentinel fires here
    time.sleep(float(os.environ.get("STUB_EXIT_S", "0.3")))
    os._exit(0)


def _serve_until_stop(conn) -> None:
    while True:
        try:
            message = core_channel.receive(conn)
        except (EOFError, OSError):
            return
        if isinstance(message, Stop):
            conn.send_bytes(encode(Closed(None)))
            return
