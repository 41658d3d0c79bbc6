"""The helpers SGLang's tutorials import from `sglang.utils`, so a notebook
written against them runs with only the import changed:

    from pyvlm.utils import execute_shell_command, wait_for_server, terminate_process, print_highlight

    server = execute_shell_command('''
    python -m pyvlm --model lmms-lab/llava-onevision-qwen2-0.5b-ov \\
      --chat-template chatml-llava --port 30000
    ''')
    wait_for_server("http://localhost:30000")
    ...
    terminate_process(server)

No torch; standard library only.
"""

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import List, Optional

POLL_INTERVAL_S = 1.0
MAX_STATUS_WAIT_S = 5.0  # per /v1/models probe
TERMINATE_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long

# Processes started by execute_shell_command, newest last: wait_for_server
# watches the newest one when it is not given a process.
_started: List[subprocess.Popen] = []


def execute_shell_command(command: str) -> subprocess.Popen:
    """Starts `command` (one command line; backslash-newline continuations and
    surrounding blank lines allowed, quoting as in a shell) in its own process
    group, with stdout/stderr inherited, and returns the process."""
    args = shlex.split(command.replace("\\\n", " "))
    if not args:
        raise ValueError("empty command")
    process = subprocess.Popen(args, start_new_session=True)
    _started.append(process)
    return process


def _models_status(base_url: str) -> Optional[int]:
    """The HTTP status of GET {base_url}/v1/models, None if nothing answers."""
    request = urllib.request.Request(base_url.rstrip("/") + "/v1/models",
                                     headers={"Authorization": "Bearer None"})
    try:
        with urllib.request.urlopen(request, timeout=MAX_STATUS_WAIT_S) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


def _check_alive(process: Optional[subprocess.Popen]) -> None:
    if process is not None and process.poll() is not None:
        raise RuntimeError(f"the server process exited with code {process.returncode} "
                           "before it became ready")


def wait_for_server(base_url: str, timeout: Optional[float] = None,
                    process: Optional[subprocess.Popen] = None) -> None:
    """Polls GET {base_url}/v1/models until it answers 200.

    process: the server's process (default: the newest one started by
    execute_shell_command and not yet terminated); if it exits first, raises
    RuntimeError with its exit code. Raises TimeoutError after `timeout`
    seconds (None: wait as long as the process lives).
    """
    if process is None and _started:
        process = _started[-1]
    deadline = None if timeout is None else time.monotonic() + timeout
    while _models_status(base_url) != 200:
        _check_alive(process)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} did not become ready within {timeout} s")
        time.sleep(POLL_INTERVAL_S)
    print_highlight(f"Server is ready at {base_url}")


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    """Signals the process group the process leads (execute_shell_command
    makes one); a process that leads no group is signalled alone, so the
    caller's own group is never hit."""
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signum)
        elif process.poll() is None:
            process.send_signal(signum)
    except (ProcessLookupError, PermissionError):
        pass  # already gone (or reaped and the id reused by another user)


def terminate_process(process: subprocess.Popen, grace_s: float = TERMINATE_GRACE_S) -> None:
    """Stops the process and every process of its group: SIGTERM, then
    SIGKILL if it is still running after `grace_s` seconds. Waits for it."""
    if process in _started:
        _started.remove(process)
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Children that ignored SIGTERM (or outlived their parent) go too.
    _signal_group(process, signal.SIGKILL)
    process.wait()


def print_highlight(text: object) -> None:
    """Prints `text` in bold blue (an HTML block in a Jupyter notebook)."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and type(get_ipython()).__name__ == "ZMQInteractiveShell":
        html = str(text).replace("&", "&amp;").replace("<", "&lt;").replace("\n", "<br>")
        display(HTML(f"<strong style='color: #00008B;'>{html}</strong>"))
        return
    print(f"\033[1;34m{text}\033[0m", file=sys.stdout, flush=True)
