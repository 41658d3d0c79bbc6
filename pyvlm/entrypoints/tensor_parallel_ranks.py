"""The processes of a tensor-parallel engine (--tp-size N): rank 0 is the
engine process (pyvlm/entrypoints/engine_core.py), which starts the other
ranks of its node as worker processes (spawn: CUDA-safe). Every rank joins
one torch.distributed group (NCCL on CUDA, a rank on its node's GPU of its
local index; gloo on the CPU) over a TCP rendezvous (rank 0's store at
--dist-init-addr, else 127.0.0.1), plus a gloo group for pickled Python
objects (SGLang's cpu_group), and builds its share of the model with the
same start-up code (startup.build_rank_runner). Rank 0 schedules; the
workers run what it broadcasts (pyvlm/entrypoints/tensor_parallel_runner.py).

Multi-node (--nnodes M, SGLang's flags): node n holds ranks n*k..n*k+k-1,
k = N / M. Node 0 is the above; node n > 0 runs serve_node (`python -m
pyvlm --node-rank n`), which starts its k ranks the same way and waits.

Failures end the whole engine, never a part of it: a watcher thread of
rank 0 waits on its node's workers' sentinels, and when one exits unasked
it logs which rank died, kills and reaps the others and ends the engine
process with status 1 (the CoreClient then fails what is in flight with
EngineDeadError). A worker exits as soon as the process that started it
is gone (it waits on its parent's sentinel, a pipe that closes when the
parent dies), so no worker outlives its engine. Across nodes a dead peer
is a broken connection: rank 0's next broadcast fails (DeviceFailure, the
engine stops) and so does a worker's wait for the next step (it exits;
its node's serve_node then ends the others). Collectives time out after
COLLECTIVE_TIMEOUT (a peer that vanishes without closing its connections).
"""

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch

from pyvlm.layers.tensor_parallel import TensorParallelGroup

logger = logging.getLogger("pyvlm.engine")

# Bounds every collective (NCCL's default; gloo's is 30 minutes): ranks that
# load weights at different speeds wait for each other at start-up within it.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
STOP_TIMEOUT_S = 10.0  # how long workers may take to leave after StopRanks
KILL_WAIT_S = 5.0


@dataclass
class RankGroups:
    """This process's torch.distributed groups: `model` (the default group:
    the model's collectives), `objects` (gloo: rank 0's pickled messages)
    and `host` (gloo: host values the ranks agree on within a step)."""

    rank: int
    size: int
    backend: str
    model: Any
    objects: Any
    host: Any

    def tensor_parallel_group(self) -> TensorParallelGroup:
        return TensorParallelGroup(self.rank, self.size, self.model, self.host)

    def destroy(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()  # the default group and every other one


def init_rank_groups(rank: int, size: int, init_method: str, device: torch.device) -> RankGroups:
    """Joins the ranks' rendezvous at init_method (rendezvous_method: rank 0
    hosts torch's TCP store at tcp://HOST:PORT; under torchrun, env:// finds
    its agent's); every rank calls it, in the same order of groups."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank,
                            world_size=size, timeout=COLLECTIVE_TIMEOUT, **options)
    # Groups of their own even on the CPU: object broadcasts (from rank 0's
    # step and heartbeat threads) never interleave with the model's
    # collectives, nor with a step's host agreements.
    objects = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    host = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return RankGroups(rank, size, backend, dist.group.WORLD, objects, host)


def rendezvous_address(parallel) -> str:
    """"HOST:PORT" of the ranks' rendezvous (a config.ParallelConfig's
    dist_init_addr; else 127.0.0.1 and dist_port, or a port free now)."""
    if parallel.dist_init_addr is not None:
        host, port = parallel.split_address(parallel.dist_init_addr)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"127.0.0.1:{parallel.dist_port or free_port()}"


def rendezvous_method(parallel) -> str:
    """torch.distributed's init_method for the ranks: env:// under torchrun
    (its MASTER_ADDR:MASTER_PORT, the agent's store when it shares one),
    else tcp://rendezvous_address."""
    return "env://" if parallel.torchrun else f"tcp://{rendezvous_address(parallel)}"


def check_node_layout(parallel) -> None:
    """ValueError for a node layout no engine can run (the server's flags
    are checked alike, with their names: pyvlm/server/args.py)."""
    if parallel.nnodes < 1 or parallel.tp_size % parallel.nnodes:
        raise ValueError(f"tp_size {parallel.tp_size} must be a multiple of nnodes "
                         f"{parallel.nnodes}")
    if not 0 <= parallel.node_rank < parallel.nnodes:
        raise ValueError(f"node_rank must be in 0..{parallel.nnodes - 1}, not "
                         f"{parallel.node_rank}")
    if parallel.nnodes > 1 and parallel.dist_init_addr is None and not parallel.torchrun:
        raise ValueError("nnodes > 1 needs dist_init_addr: HOST:PORT of node 0, the same "
                         "on every node")


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of the rank with this index on its node, made this
    process's current one: on CUDA one GPU per rank, the local_rank-th from
    `device` (cuda:r from cuda:0; a data-parallel replica's ranks start at
    its first GPU: replica_spec), else `device`."""
    if device.type != "cuda":
        return device
    device = torch.device("cuda", (device.index or 0) + local_rank)
    torch.cuda.set_device(device)
    return device


def share_cpu_cores(device: torch.device, size: int) -> None:
    """On the CPU the ranks share the host's cores: each takes its part
    (N ranks of all cores each would oversubscribe them N times over)."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def exit_reason(exitcode: Optional[int]) -> str:
    """How a process ended, from its exit code, for logs and errors."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def exit_process(status: int) -> None:
    """os._exit after flushing the logs (no interpreter teardown: a thread
    may be blocked in a collective)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(status)


# ---- rank 0 ------------------------------------------------------------------

class TensorParallelRanks:
    """Rank 0's hold on the ranks: starts the workers, joins the groups and
    watches the workers (module docstring). on_death(reason) is called, on
    the watcher's thread, when a worker exits unasked, after the others
    were killed; by default it ends this process with status 1."""

    def __init__(self, spec, log_settings):
        parallel = spec.config.parallel
        check_node_layout(parallel)
        if parallel.node_rank != 0:
            raise ValueError(f"node_rank {parallel.node_rank} runs no engine: only node 0 "
                             "does; the other nodes run serve_node (python -m pyvlm "
                             "--node-rank N)")
        self.size = parallel.tp_size
        self.torchrun = parallel.torchrun
        self.init_method = rendezvous_method(parallel)
        self.device = rank_device(spec.device, 0)
        share_cpu_cores(self.device, parallel.ranks_per_node)
        self.on_death: Callable[[str], None] = lambda reason: exit_process(1)
        self.groups: Optional[RankGroups] = None
        # Who ends the workers: stop() or, for a worker that died, the
        # watcher; decided once, under _ending.
        self._ending = threading.Lock()
        self._stopping = False
        self._death: Optional[str] = None
        self._died = threading.Event()
        self._reap_lock = threading.Lock()
        # The engine process is daemonic (CoreClient: multiprocessing ends it
        # with its caller), and multiprocessing refuses children to daemonic
        # processes. Its workers are ended here instead (stop, the watcher)
        # and end themselves with it (run_worker_rank).
        multiprocessing.current_process().daemon = False
        # torchrun starts and watches the ranks itself.
        local_ranks = range(0) if self.torchrun else parallel.node_ranks()[1:]
        self.workers = start_worker_ranks(spec, local_ranks, self.init_method, log_settings)
        if self.workers:  # (another node's ranks are watched by their node)
            threading.Thread(target=self._watch, name="pyvlm-tp-watcher", daemon=True).start()
        try:
            self.groups = init_rank_groups(0, self.size, self.init_method, self.device)
        except BaseException:
            self.stop()
            raise

    def describe(self) -> str:
        """The rank layout, for the engine's start-up log line."""
        ranks = [f"rank 0: pid {os.getpid()} on {self.device} (engine process)"]
        ranks += [f"rank {r}: pid {w.pid} on {_device_name(self.device, r)}"
                  for r, w in enumerate(self.workers, 1)]
        if len(self.workers) + 1 < self.size:
            ranks.append(f"ranks {len(self.workers) + 1}..{self.size - 1} "
                         + ("started by torchrun" if self.torchrun else "on the other nodes"))
        backend = self.groups.backend if self.groups else "?"
        return (f"tensor parallelism over {self.size} ranks ({backend}, rendezvous "
                f"{self.init_method}): " + "; ".join(ranks))

    def death(self, timeout: float) -> Optional[str]:
        """Which worker died unasked and how, waiting up to timeout seconds
        for the watcher to see it; None if none did. (A collective that
        failed because a rank died asks this, to report the death, not the
        broken connection.)"""
        self._died.wait(timeout)
        return self._death

    def _watch(self) -> None:
        by_sentinel = {w.sentinel: (rank, w) for rank, w in enumerate(self.workers, 1)}
        rank, worker = by_sentinel[multiprocessing.connection.wait(list(by_sentinel))[0]]
        with self._reap_lock:
            worker.join()
        reason = f"tensor-parallel rank {rank} (pid {worker.pid}) {exit_reason(worker.exitcode)}"
        with self._ending:
            if self._stopping:
                return
            self._death = reason
        self._died.set()
        logger.critical("engine stopped: %s", reason)
        self._kill_workers()
        self.on_death(reason)

    def stop(self, ask_to_leave: Optional[Callable[[], None]] = None) -> None:
        """Calls ask_to_leave (sends StopRanks; None: the workers are not
        asked, e.g. a step may still be running), waits up to STOP_TIMEOUT_S
        for the workers to leave, kills what is left, reaps them all and
        destroys this process's groups. After a worker died, the watcher
        ends them (and, by default, this process) instead: stop() waits."""
        with self._ending:
            self._stopping = self._death is None
        if not self._stopping:
            time.sleep(2 * KILL_WAIT_S)  # on_death normally exits before this ends
            return
        timeout = 0.0
        if ask_to_leave is not None:
            try:
                ask_to_leave()
                timeout = STOP_TIMEOUT_S
            except Exception:  # noqa: BLE001 - a rank is gone already: kill the rest
                logger.debug("the tensor-parallel ranks could not be asked to stop",
                             exc_info=True)
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        self._kill_workers()
        if self.groups is not None:
            self.groups.destroy()

    def _kill_workers(self) -> None:
        with self._reap_lock:
            for worker in self.workers:
                if worker.exitcode is None:
                    worker.kill()
            for worker in self.workers:
                worker.join(KILL_WAIT_S)


def _device_name(first: torch.device, rank: int) -> str:
    """Rank r's device, named from rank 0's (without touching CUDA)."""
    return f"cuda:{first.index + rank}" if first.type == "cuda" else str(first)


# ---- ranks 1..N-1 ------------------------------------------------------------

def start_worker_ranks(spec, ranks: range, init_method: str,
                       log_settings) -> List[multiprocessing.Process]:
    """Started worker processes (spawn) for these global ranks, each
    running run_worker_rank; they exit when this process does."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=run_worker_rank,
                               args=(spec, rank, init_method, log_settings),
                               name=f"pyvlm-tp-rank{rank}", daemon=True)
               for rank in ranks]
    for worker in workers:
        worker.start()
    return workers


def run_worker_rank(spec, rank: int, init_method: str, log_settings) -> None:
    """A spawned worker process's entry point: serve_rank, then exit with
    its status; it also exits as soon as the process that started it ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller's process decides when to stop
    from pyvlm.entrypoints.engine_core import configure_logging, log_marker

    configure_logging(log_settings, log_marker(spec, rank))
    _exit_with_parent()
    exit_process(serve_rank(spec, rank, init_method))


def serve_rank(spec, rank: int, init_method: str) -> int:
    """Worker rank `rank` in this process: joins the groups, builds its
    share of the model like rank 0 does, then runs what rank 0 broadcasts.
    Returns 0 after StopRanks, 1 after a failure (logged)."""
    from pyvlm.entrypoints.startup import build_rank_runner
    from pyvlm.entrypoints.tensor_parallel_runner import serve_steps

    parallel = spec.config.parallel
    try:
        device = rank_device(spec.device, rank % parallel.ranks_per_node)
        share_cpu_cores(device, parallel.ranks_per_node)
        groups = init_rank_groups(rank, parallel.tp_size, init_method, device)
        _, runner = build_rank_runner(replace(spec, device=device),
                                      groups.tensor_parallel_group())
    except BaseException:
        logger.exception("tensor-parallel rank %d could not start", rank)
        return 1
    logger.info("tensor-parallel rank %d ready on %s (pid %d)", rank, device, os.getpid())
    try:
        serve_steps(runner, groups.objects, rank)
    except BaseException:
        logger.exception("tensor-parallel rank %d stops", rank)
        return 1
    groups.destroy()
    return 0


# ---- nodes 1..M-1 -------------------------------------------------------------

def serve_node(config, log_settings) -> int:
    """`python -m pyvlm --node-rank N` (N > 0): starts this node's ranks
    (config.parallel.node_ranks()) as worker processes that join rank 0's
    rendezvous and serve its steps, and waits for them. Returns 0 once all
    left at rank 0's StopRanks; 1 as soon as one failed (rank 0 gone, a
    rank of this node dead), after killing the others. No HTTP server: node
    0 serves the requests."""
    from pyvlm.entrypoints.startup import core_spec_for, resolve_device

    parallel = config.parallel
    check_node_layout(parallel)
    if parallel.node_rank == 0:
        raise ValueError("node 0 runs the engine (pyvlm.Engine or the server), not serve_node")
    spec = core_spec_for(config, torch.device(resolve_device(config.model.device)))
    init_method = rendezvous_method(parallel)
    workers = start_worker_ranks(spec, parallel.node_ranks(), init_method, log_settings)
    logger.info("node %d of %d: tensor-parallel ranks %d..%d (pids %s) joining the rendezvous "
                "at %s", parallel.node_rank, parallel.nnodes, parallel.node_ranks()[0],
                parallel.node_ranks()[-1], ", ".join(str(w.pid) for w in workers), init_method)
    try:
        return wait_node_workers(workers)
    finally:
        for worker in workers:
            if worker.exitcode is None:
                worker.kill()
            worker.join(KILL_WAIT_S)


def wait_node_workers(workers: List[multiprocessing.Process]) -> int:
    """Waits until every worker exited (0) or one failed (1, logged)."""
    running = {w.sentinel: w for w in workers}
    while running:
        for sentinel in multiprocessing.connection.wait(list(running)):
            worker = running.pop(sentinel)
            worker.join()
            if worker.exitcode != 0:
                logger.error("%s %s: this node stops", worker.name, exit_reason(worker.exitcode))
                return 1
    logger.info("rank 0 stopped the ranks; this node stops")
    return 0


def _exit_with_parent() -> None:
    """Ends this process when rank 0's (its parent's) ends, even while the
    main thread is blocked in a collective."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        logger.error("the process that started this rank is gone; this rank exits")
        exit_process(1)

    threading.Thread(target=watch, name="pyvlm-tp-parent-watch", daemon=True).start()
