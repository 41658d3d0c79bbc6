"""`python -m pyvlm` under torchrun, one process per tensor-parallel rank:

    torchrun --nproc-per-node 2 -m pyvlm --model ... --tp-size 2
    torchrun --nnodes 2 --node-rank n --nproc-per-node 4 --master-addr H \\
        --master-port P -m pyvlm --model ... --tp-size 8

torchrun starts the ranks and watches them (a rank that fails ends the
others, as its agent does); pyvlm reads its layout from the environment
torchrun gives each process (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE). Rank 0
runs the HTTP server and the engine, whose engine process is rank 0 of the
group (it starts no ranks of its own); every other rank serves rank 0's
steps in its own process and leaves when rank 0 stops them. Every rank
meets at env://, torchrun's MASTER_ADDR:MASTER_PORT.
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Mapping, Optional

# Set by torchrun (torch.distributed.elastic) in every process it starts.
TORCHRUN_MARKER = "TORCHELASTIC_RUN_ID"


@dataclass(frozen=True)
class TorchrunWorld:
    """This process's place among torchrun's: rank of world_size, on a
    node of local_world_size processes."""

    rank: int
    world_size: int
    local_world_size: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Optional["TorchrunWorld"]:
        """The layout torchrun gave this process; None when torchrun did
        not start it."""
        if TORCHRUN_MARKER not in environ:
            return None
        try:
            return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                       int(environ["LOCAL_WORLD_SIZE"]))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"torchrun's environment lacks a valid {exc}") from None


def under_torchrun(args, world: TorchrunWorld):
    """ServerArgs for a rank started by torchrun: its node layout taken
    from torchrun's (node_rank, nnodes) and torchrun set; ValueError when
    the flags do not match torchrun's processes."""
    if args.tp_size != world.world_size:
        raise ValueError(f"torchrun started {world.world_size} processes: pass --tp-size "
                         f"{world.world_size} (one rank per process), not {args.tp_size}")
    if args.dp_size != 1:
        raise ValueError("--dp-size > 1 does not run under torchrun: start one server per "
                         "replica, or --dp-size without torchrun")
    if args.nnodes != 1 or args.node_rank != 0 or args.dist_init_addr is not None:
        raise ValueError("under torchrun, pass the node layout to torchrun (--nnodes, "
                         "--node-rank, --master-addr), not to pyvlm")
    if world.world_size % world.local_world_size:
        raise ValueError(f"torchrun's {world.world_size} processes are not a multiple of its "
                         f"{world.local_world_size} per node")
    return dataclasses.replace(args, torchrun=True,
                               nnodes=world.world_size // world.local_world_size,
                               node_rank=world.rank // world.local_world_size)


def serve_torchrun_rank(config, rank: int, log_settings) -> int:
    """Rank `rank` > 0 of a torchrun job, in this process: serves rank 0's
    steps until it stops them (0) or a failure (1)."""
    import signal

    import torch

    from pyvlm.entrypoints.engine_core import configure_logging, log_marker
    from pyvlm.entrypoints.startup import core_spec_for, resolve_device
    from pyvlm.entrypoints.tensor_parallel_ranks import (check_node_layout,
                                                         rendezvous_method, serve_rank)

    # torchrun's Ctrl-C reaches every rank; rank 0 decides when the others stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(log_settings, log_marker(None, rank))
    check_node_layout(config.parallel)
    spec = core_spec_for(config, torch.device(resolve_device(config.model.device)))
    return serve_rank(spec, rank, rendezvous_method(config.parallel))
