"""`python -m pyvlm` on a tiny checkpoint in a child process, and the
official openai client pointed at it (the family server tests share them)."""

import contextlib
import subprocess
import sys

from pyvlm.utils import terminate_process, wait_for_server
from tests.server.test_live_server import free_port

TINY_FLAGS = ["--device", "cpu", "--dtype", "float32", "--page-size", "4",
              "--served-model-name", "tiny"]


@contextlib.contextmanager
def tiny_server(checkpoint, flags, log_path):
    """Yields the base URL of a server on checkpoint with TINY_FLAGS + flags;
    its output goes to log_path; it is stopped on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "pyvlm", "--model", str(checkpoint), "--port", str(port),
           *TINY_FLAGS, *flags]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_server(base, timeout=120, process=process)
            yield base
        finally:
            terminate_process(process)


def client_for(base):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="EMPTY")
