"""Real tensor-parallel ranks for tests: `size` spawned processes joined by
torch.distributed over gloo on the CPU, each running the functions a test
sends it inside building_with(TensorParallelGroup(rank, size)).

A test module starts its ranks once (a module fixture) and runs several
checks on them: `ranks.run(fn, *args)` calls fn(group, *args) on every rank
and returns the ranks' results in rank order. fn must be importable (a
module-level function of a test module). Tasks and results travel as
torch.save bytes (no shared-memory handles between processes). A rank that
raises fails the check with its traceback; a rank left waiting in a
collective by another's failure times the check out.
"""

import io
import multiprocessing
import queue
import socket
import traceback
from typing import Any, Callable, List

import torch

TASK_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _serve(rank: int, size: int, port: int, tasks, results) -> None:
    import torch.distributed as dist

    from pyvlm.layers.tensor_parallel import TensorParallelGroup, building_with

    torch.set_num_threads(1)  # the ranks share the test machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    group = TensorParallelGroup(rank, size)
    try:
        while (task := tasks.get()) is not None:
            try:
                fn, args = _loads(task)
                with building_with(group):
                    results.put((rank, None, _dumps(fn(group, *args))))
            except BaseException:  # reported to the test, which fails
                results.put((rank, traceback.format_exc(), None))
    finally:
        dist.destroy_process_group()


class Ranks:
    """size rank processes serving run() calls until close()."""

    def __init__(self, size: int):
        context = multiprocessing.get_context("spawn")
        port = free_port()
        self.size, self.closed = size, False
        self.tasks = [context.Queue() for _ in range(size)]
        self.results = context.Queue()
        self.processes = [context.Process(target=_serve, daemon=True,
                                          args=(rank, size, port, self.tasks[rank], self.results))
                          for rank in range(size)]
        for process in self.processes:
            process.start()

    def run(self, fn: Callable, *args, timeout: float = TASK_TIMEOUT_S) -> List[Any]:
        """fn(group, *args) on every rank; the results in rank order."""
        if self.closed:
            raise AssertionError("the ranks were stopped by an earlier failure")
        task = _dumps((fn, args))
        for tasks in self.tasks:
            tasks.put(task)
        results, errors = {}, {}
        for _ in range(self.size):
            try:
                rank, error, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise AssertionError(f"{fn.__name__}: no result from every rank in {timeout} s; "
                                     f"errors: {errors}") from None
            if error is not None:
                errors[rank] = error
                if len(errors) + len(results) < self.size:
                    # The others may wait in a collective forever: stop here.
                    self.close()
                    break
            else:
                results[rank] = _loads(value)
        if errors:
            raise AssertionError("\n".join(f"rank {rank} of {fn.__name__}:\n{text}"
                                           for rank, text in sorted(errors.items())))
        return [results[rank] for rank in range(self.size)]

    def close(self) -> None:
        self.closed = True
        for tasks, process in zip(self.tasks, self.processes):
            if process.is_alive():
                tasks.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
