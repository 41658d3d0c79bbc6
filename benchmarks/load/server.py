"""The server under load, as the load tools see it: started as a child
process on a loopback port (`python -m pyvlm`, or a random-weight model of a
real shape through benchmarks/load/serve_random.py), its resident memory
read from /proc, its engine counters from /get_server_info, its log scanned
for tracebacks."""

import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from benchmarks.load import client
from benchmarks.load.client import Server

REPO = Path(__file__).resolve().parents[2]
SERVE_RANDOM = Path(__file__).resolve().parent / "serve_random.py"


def add_target_arguments(parser, extra=()) -> None:
    """The flags choosing the server a load tool starts (or finds running);
    extra: (flags, argparse keywords) pairs added to the same group."""
    from benchmarks.load.warmup import CPU_POOL_TOKENS

    target = parser.add_argument_group("server (started here unless --base-url)")
    target.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    target.add_argument("--serve-random", default=None, metavar="SHAPE",
                        help="serve a random-weight model of this shape (SHAPES of "
                        "benchmarks/load/serve_random.py, e.g. qwen2-vl-7b or llava-1.5-7b-narrow)")
    target.add_argument("--device", default="cpu")
    for flags, options in extra:
        target.add_argument(*flags, **options)
    target.add_argument("--max-total-tokens", type=int, default=None,
                        help=f"KV pool tokens (default on CPU: {CPU_POOL_TOKENS})")
    target.add_argument("--server-args", default="", help="more server flags, one string")
    target.add_argument("--base-url", default=None, help="a server already running (loopback)")
    target.add_argument("--server-pid", type=int, default=None, help="its pid, for its memory")
    target.add_argument("--ready-timeout", type=float, default=900.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, model: Optional[str], serve_random: Optional[str],
                   flags: Sequence[str]) -> List[str]:
    """The command line of a server on 127.0.0.1:port: pyvlm over `model`
    (None: the demo model), or serve_random.py building `serve_random`."""
    base = ["--host", "127.0.0.1", "--port", str(port), *flags]
    if serve_random is not None:
        return [sys.executable, str(SERVE_RANDOM), serve_random, *base]
    return [sys.executable, "-m", "pyvlm", *(["--model", model] if model else []), *base]


@dataclass
class ServerProcess:
    """A running server: its process (None when it was started elsewhere)
    and where it listens."""

    server: Server
    process: Optional[subprocess.Popen] = None
    log_path: Optional[Path] = None
    pid: Optional[int] = None  # whose memory is read (the child's, or --server-pid)

    def rss_bytes(self) -> Optional[int]:
        """The server's resident memory (VmRSS), None when unknown."""
        if self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def is_alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def log_tracebacks(self) -> List[str]:
        """Each traceback in the log, as its first and last lines."""
        if self.log_path is None or not self.log_path.exists():
            return []
        lines = self.log_path.read_text(errors="replace").splitlines()
        found = []
        for i, line in enumerate(lines):
            if line.startswith("Traceback (most recent call last)"):
                end = next((j for j in range(i + 1, len(lines))
                            if lines[j] and not lines[j].startswith((" ", "\t"))), i)
                found.append(f"{lines[i - 1] if i else ''} ... {lines[end]}".strip())
        return found

    def stop(self) -> None:
        if self.process is not None:
            from pyvlm.utils import terminate_process

            terminate_process(self.process)


def start_server(command: List[str], log_path: Path, ready_timeout: float) -> ServerProcess:
    """Starts the command (its own process group, output to log_path) and
    waits until it answers /v1/models."""
    from pyvlm.utils import wait_for_server

    port = int(command[command.index("--port") + 1])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    # A file, not a pipe: nobody reads a pipe while the load runs.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                               start_new_session=True)
    log.close()
    handle = ServerProcess(Server("127.0.0.1", port), process, log_path, process.pid)
    try:
        wait_for_server(handle.server.url, timeout=ready_timeout, process=process)
    except BaseException:
        handle.stop()
        raise
    return handle


async def engine_stats(server: Server) -> dict:
    """/get_server_info's engine_stats (num_running_reqs, num_used_pages, ...)."""
    reply = await client.request(server, "GET", "/get_server_info", timeout=30)
    if reply.status != 200:
        raise RuntimeError(f"/get_server_info answered {reply.status}: {reply.body[:200]!r}")
    return reply.json()["engine_stats"]


async def server_info(server: Server) -> dict:
    reply = await client.request(server, "GET", "/get_server_info", timeout=30)
    return reply.json()


async def wait_idle(server: Server, timeout: float = 120.0) -> dict:
    """Polls until nothing runs or waits; returns those engine stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await engine_stats(server)
        if stats["num_running_reqs"] == 0 and stats["num_queued_reqs"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server is still busy after {timeout} s: {stats}")
        await asyncio.sleep(0.2)


async def flush_cache(server: Server) -> bool:
    reply = await client.request(server, "POST", "/flush_cache", timeout=60)
    return reply.status == 200
