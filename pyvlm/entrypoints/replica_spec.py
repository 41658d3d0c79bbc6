"""What makes replica i of a data-parallel engine (--dp-size) differ from
the others: its device (on CUDA, replica i takes the GPUs after replica
i-1's: cuda:(base + i x tp_size)) and the "[DP i]" marker on its engine
process's log lines (engine_core.log_marker), so a log that interleaves
the replicas says which one speaks."""

from dataclasses import dataclass, fields, replace

import torch

from pyvlm.config import EngineConfig
from pyvlm.entrypoints.startup import CoreSpec


@dataclass(frozen=True)
class ReplicaSpec(CoreSpec):
    """A CoreSpec that knows its replica: its engine process (and its
    tensor-parallel ranks) mark their log lines with it
    (engine_core.log_marker)."""

    replica: int = 0


def replica_spec(spec: CoreSpec, index: int) -> ReplicaSpec:
    """spec for replica index: its own device, its log marker, and with
    tensor parallelism its own rendezvous port (--dist-port + index: the
    replicas' rank groups are separate)."""
    values = {f.name: getattr(spec, f.name) for f in fields(CoreSpec)}
    values["device"] = replica_device(spec.config, spec.device, index)
    parallel = spec.config.parallel
    if parallel.dist_port is not None:
        values["config"] = replace(spec.config, parallel=replace(
            parallel, dist_port=parallel.dist_port + index))
    return ReplicaSpec(**values, replica=index)


def replica_device(config: EngineConfig, device: torch.device, index: int) -> torch.device:
    """Replica index's (first) device: the CPU for every replica on a CPU;
    on CUDA, the tp_size GPUs after the previous replica's."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + index * config.parallel.tp_size)


def check_data_parallel(config: EngineConfig, device: torch.device,
                        has_loaded_model: bool) -> None:
    """ValueError unless dp_size replicas can start: each needs an engine
    process of its own (engine_process "thread" and a model loaded in this
    process cannot be copied), and on CUDA its own GPUs."""
    dp_size = config.parallel.dp_size
    if config.runner.engine_process == "thread":
        raise ValueError(f"dp_size {dp_size} runs each replica in an engine process of its "
                         "own: engine_process='thread' cannot (use 'process' or 'auto')")
    if has_loaded_model:
        raise ValueError(f"a loaded_model lives in this process: dp_size {dp_size} needs "
                         "engine processes, which load the checkpoint's weights themselves")
    if device.type == "cuda":
        needed = (device.index or 0) + dp_size * config.parallel.tp_size
        if needed > torch.cuda.device_count():
            raise ValueError(f"dp_size {dp_size} x tp_size {config.parallel.tp_size} from "
                             f"{device} needs {needed} GPUs; {torch.cuda.device_count()} found")
