"""`python -m tests.server.hung_engine_server CHECKPOINT PORT`: the real server
on the tiny checkpoint whose engine hangs in the first prefill step (a fault
hook that sleeps), with --watchdog-timeout 1.5 s. The watchdog must dump every
thread's stack and exit 3 (tests/server/test_engine_failures.py)."""

import asyncio
import logging
import sys
import time

from pyvlm.server import launch
from pyvlm.server.args import ServerArgs


def hang_in_prefill(stage, chunks):
    if stage == "prefill":
        time.sleep(3600)


def make_hanging_engine(args):
    engine = launch._make_engine(args)
    engine.state.runner.fault_hook = hang_in_prefill
    return engine


def main(checkpoint: str, port: int) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    args = ServerArgs(model=checkpoint, port=port, device="cpu", max_total_tokens=2048,
                      watchdog_timeout=1.5)
    return asyncio.run(launch.Launcher(args, make_engine=make_hanging_engine).run())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
