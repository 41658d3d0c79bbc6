"""pyvlm.utils (the tutorial's helpers) against real processes: a tiny
`python -m http.server` standing in for the server."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pyvlm.utils import execute_shell_command, print_highlight, terminate_process, wait_for_server


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_exists(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def served_dir(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "models").write_text('{"object": "list", "data": []}')
    return tmp_path


def test_tutorial_style_command_serves_and_terminates(served_dir, capsys):
    port = free_port()
    process = execute_shell_command(f"""
{sys.executable} -m http.server {port} \\
    --bind 127.0.0.1 \\
    --directory "{served_dir}"
""")
    try:
        assert os.getpgid(process.pid) == process.pid != os.getpgid(0)  # its own group
        wait_for_server(f"http://127.0.0.1:{port}", timeout=30)
        assert f"Server is ready at http://127.0.0.1:{port}" in capsys.readouterr().out
    finally:
        terminate_process(process)
    assert process.returncode == -signal.SIGTERM
    assert not group_exists(process.pid)


def test_wait_for_server_needs_a_200_from_v1_models(tmp_path):
    port = free_port()  # http.server answers 404: /v1/models does not exist here
    process = execute_shell_command(
        f"{sys.executable} -m http.server {port} --bind 127.0.0.1 --directory {tmp_path}")
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            wait_for_server(f"http://127.0.0.1:{port}", timeout=2)
        assert time.monotonic() - started >= 2
    finally:
        terminate_process(process)


def test_wait_for_server_reports_the_exit_code_of_a_dead_server():
    exit_code = 3 + int.from_bytes(os.urandom(1), "little") % 50
    execute_shell_command(f"{sys.executable} -c 'import sys, time; time.sleep(0.3); sys.exit({exit_code})'")
    with pytest.raises(RuntimeError, match=f"exited with code {exit_code}"):
        wait_for_server(f"http://127.0.0.1:{free_port()}", timeout=30)


def test_wait_for_server_watches_the_process_it_is_given():
    other = execute_shell_command(f"{sys.executable} -c 'import time; time.sleep(30)'")
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    try:
        with pytest.raises(RuntimeError, match="code 7"):
            wait_for_server(f"http://127.0.0.1:{free_port()}", timeout=30, process=dead)
    finally:
        terminate_process(other)


def test_terminate_escalates_to_sigkill_for_the_whole_group():
    # The shell and its background child both ignore SIGTERM.
    process = execute_shell_command("sh -c 'trap \"\" TERM; sleep 60 & sleep 60 & wait'")
    time.sleep(0.3)
    started = time.monotonic()
    terminate_process(process, grace_s=0.5)
    assert process.returncode == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while group_exists(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # the orphaned sleeps are reaped by init
    assert not group_exists(process.pid)


def test_execute_shell_command_refuses_an_empty_command():
    with pytest.raises(ValueError):
        execute_shell_command(" \\\n ")


def test_print_highlight_prints_bold_blue(capsys):
    print_highlight("hello <world>")
    assert capsys.readouterr().out == "\033[1;34mhello <world>\033[0m\n"


def test_terminate_process_stops_a_process_that_leads_no_group():
    import subprocess
    import sys

    from pyvlm.utils import terminate_process

    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    terminate_process(process, grace_s=5)
    assert process.returncode is not None  # stopped, and the test process (same group) survived
