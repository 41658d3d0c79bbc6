"""pyvlm's server in this process (`python -m pyvlm`'s own Launcher on a free
loopback port, the flags given) measured by benchmarks/load/serving_phases.py
in a child process, so the client never competes with the server for the
interpreter lock; the client's results after each phase reach a callback as
they come (it prints them as one JSON line each)."""

import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from benchmarks.load.serving_phases import PhaseResults, Plan

REPO = Path(__file__).resolve().parents[2]
MAX_LINE_BYTES = 1 << 22


def client_command(base_url: str, served_name: str, plan: Plan, image_size: Tuple[int, int],
                   photos: Optional[Path] = None) -> List[str]:
    width, height = image_size
    command = [sys.executable, "-m", "benchmarks.load.serving_phases", "--base-url", base_url,
               "--model", served_name, "--image-size", f"{width}x{height}"]
    for name, value in asdict(plan).items():
        command += ["--" + name.replace("_", "-"), str(value)]
    return command + (["--photos", str(photos)] if photos else [])


async def serve_while_client_runs(launcher, command: Sequence[str],
                                  on_line: Callable[[bytes], None]) -> int:
    """Serves until the client process exits (or the server stops first,
    when it could not start: then the client is stopped); each line the
    client prints goes to on_line. Returns the client's exit status."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    serving = asyncio.ensure_future(launcher.run())
    child = await asyncio.create_subprocess_exec(*command, cwd=REPO, env=env,
                                                 stdout=asyncio.subprocess.PIPE,
                                                 limit=MAX_LINE_BYTES)
    reading = asyncio.ensure_future(_read_lines(child.stdout, on_line))
    try:
        await asyncio.wait({serving, reading}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if child.returncode is None and not reading.done():
            child.terminate()
        status = await child.wait()
        launcher.stop.set()
        await serving
    await reading  # its error, if any, after the server has stopped
    return status


async def _read_lines(stream: asyncio.StreamReader, on_line) -> None:
    while line := await stream.readline():
        on_line(line)


def measure_server(flags: Sequence[str], plan: Plan, served_name: str,
                   image_size: Tuple[int, int], photos: Optional[Path] = None,
                   on_phase: Optional[Callable[[PhaseResults], None]] = None) -> PhaseResults:
    """The phases of plan against `python -m pyvlm <flags>` served here;
    on_phase(results so far) after each phase. A client that stops early
    leaves the phases it finished, and its exit status in errors; one that
    finished none ends the run (SystemExit)."""
    from benchmarks.load.server import free_port
    from pyvlm.cli import build_server_parser
    from pyvlm.server.args import server_args_from
    from pyvlm.server.launch import Launcher, run_loop

    port = free_port()
    args = server_args_from(build_server_parser().parse_args(
        [*flags, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name]))
    command = client_command(f"http://127.0.0.1:{port}/v1", served_name, plan, image_size, photos)
    latest: List[PhaseResults] = []

    def on_line(line: bytes) -> None:
        latest[:] = [PhaseResults(**json.loads(line))]
        if on_phase is not None:
            on_phase(latest[0])

    status = run_loop(serve_while_client_runs(Launcher(args), command, on_line))
    if not latest:
        raise SystemExit(f"the serving phases failed (client exit status {status})")
    if status != 0:
        latest[0].errors.append(f"the client stopped (exit status {status}) after phases "
                                f"{', '.join(latest[0].phases) or 'none'}")
    return latest[0]
