"""Configuration as plain frozen data (building one touches no disk or network).

ServerArgs-style flags map onto these groups; `EngineConfig` composes them.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint and how to load it."""

    model: Optional[str] = None  # local directory or hub id; None = the demo model
    tokenizer_path: Optional[str] = None
    # The vision tower of a checkpoint in the LLaVA authors' layout, over
    # its config's mm_vision_tower (a folder or hub id).
    vision_tower_path: Optional[str] = None
    # "auto": the checkpoint's weights; "dummy": random weights from its
    # config alone (no weight files; SGLang's and vLLM's name), for
    # benchmarking real shapes without a download.
    load_format: str = "auto"
    dtype: str = "auto"  # auto|float32|float16|bfloat16
    device: str = "auto"  # auto|cpu|cuda
    context_length: Optional[int] = None  # None: from the checkpoint's config (also the cap)
    # Replaces the text model's rope scaling (e.g. {"rope_type": "linear", "factor": 4.0});
    # max_position_embeddings grows by the factor, and so may --context-length.
    rope_scaling: Optional[Dict[str, Any]] = None
    chat_template: Optional[str] = None
    served_model_name: Optional[str] = None
    # Range checks of the ops' index tensors on the engine thread (see
    # pyvlm.ops.index_checks). None: on for CPU; off for CUDA, where each check
    # is a host sync per layer per step, the scheduler builds every index
    # itself and the kernels skip invalid ones.
    check_indices: Optional[bool] = None


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool and the prefix/encoder caches."""

    page_size: int = 16
    # GPU: the fraction of the card's memory for the weights, the KV pool and
    # what steps need beside them (measured at start-up: activations of the
    # largest prefill, the decode CUDA graphs, the encoder cache).
    mem_fraction_static: float = 0.85
    max_total_tokens: Optional[int] = None  # CPU: KV pool size; None = from available RAM
    disable_radix_cache: bool = False
    encoder_cache_bytes: int = 1 << 30  # vision-tower outputs kept (LRU), in bytes


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits and policies (SGLang's flag names)."""

    max_running_requests: int = 256
    max_prefill_tokens: int = 16384
    chunked_prefill_size: Optional[int] = 8192  # None or <= 0: no chunking
    schedule_policy: str = "fcfs"  # fcfs|lpm
    stream_interval: int = 1
    decode_log_interval: int = 40
    random_seed: Optional[int] = None  # first seed of unseeded requests; None: random per process
    enable_cache_report: bool = False
    # Scales the decode room admission reserves for running requests (SGLang's
    # --schedule-conservativeness): 0 reserves none (more preemption), >1 more.
    schedule_conservativeness: float = 1.0
    # Runs prefill chunks in the same step as one decode token of every running
    # request (SGLang's --enable-mixed-chunk, on here by default), so arrivals
    # never pause the streams; the decode tokens count against the step's
    # prefill budget. False: a step is all prefill or all decode.
    enable_mixed_chunk: bool = True
    # The most prefill tokens in a step that also decodes (None or <= 0: only
    # the limits above), the tower's work on the images a chunk starts
    # counted too (pyvlm/scheduling/encoder_budget.py): a mixed step of 8k new
    # tokens would stall every stream for the time of a long prefill. 1024
    # takes one typical image prompt whole (411 tokens, 802 with its tower's
    # charge) but not two; 512 cut it in two steps, which on an
    # H200 cost 25% of the 256 @ 64 throughput and tripled the inter-token
    # p50 for a 13% lower p99 (benchmarks/RESULTS.md, 2026-12-07 H200).
    max_mixed_prefill_tokens: Optional[int] = 1024
    # Launch step N+1 (decode, prefill or mixed) before reading step N's tokens
    # (SGLang's overlap scheduler; pyvlm.scheduling.overlap). None: on with CUDA (the host's
    # work hides behind the device's), off on the CPU (nothing to hide).
    overlap_schedule: Optional[bool] = None
    # Encode the images of the next waiting requests before their prefill: a
    # step ahead, in what that step's budget leaves, or with
    # vision_side_stream beside the steps, the request admitted once they
    # are done (pyvlm/scheduling/encode_ahead.py). Off: both forms read within
    # the machine's spread at 256 @ 64 on an H100 (benchmarks/RESULTS.md); the
    # first, unbudgeted form let two image prompts share a mixed step.
    vision_encode_ahead: bool = False


@dataclass(frozen=True)
class MediaConfig:
    """What request images may reach and cost, for the server and the
    offline Engine alike (pyvlm.multimodal.media.MediaPolicy's fields)."""

    allowed_local_media_path: Optional[str] = None  # the only folder local paths may read
    allow_private_media_urls: bool = False  # fetch URLs on loopback/private addresses too
    max_image_pixels: int = 64_000_000  # any image buffer: decoded, padded canvas, resized
    max_pending_image_bytes: int = 4 << 30  # preprocessed images of unfinished requests
    # The family's image-processor settings over the checkpoint's (e.g.
    # {"max_pixels": 1003520} for Qwen2-VL); a request's own come on top.
    mm_processor_kwargs: Optional[Dict[str, Any]] = None


@dataclass(frozen=True)
class RunnerConfig:
    """How steps run on the device (SGLang's flag names)."""

    # CUDA graphs of decode steps for batch sizes up to this (padded to the
    # next captured size); larger decode batches run eagerly.
    cuda_graph_max_bs: int = 256
    disable_cuda_graph: bool = False
    # Piecewise CUDA graphs of the decoder (pyvlm/runner/prefill_graphs.py)
    # for steps of up to this many tokens that the decode graphs do not take:
    # prefill, mixed prefill + decode; 0: those steps run eagerly.
    piecewise_cuda_graph_max_tokens: int = 1024
    # CUDA graphs of the vision tower (pyvlm/layers/shape_graphs.py): how many
    # image-size combinations keep one; 0: the tower runs eagerly. Their CUDA
    # tests passed on an H100 (37c9851); the TTFT of one image read 24.2 ms
    # with them against 25.3 without, and 256 @ 64 +2% (benchmarks/RESULTS.md).
    vision_cuda_graphs: int = 8
    # Run the vision tower on a second CUDA stream (pyvlm/runner/encoder_cache.py),
    # beside the step in flight instead of after it, the steps on a stream of
    # higher priority (pyvlm/runner/model_runner.py). Off: within noise on an
    # H100 end to end, and a decode step beside a tower took 29-31 ms against
    # 6.9 alone (the tower's running blocks keep their SMs; benchmarks/RESULTS.md).
    vision_side_stream: bool = False
    # With vision_side_stream: the side stream is a CUDA green context's, of
    # this many SMs (pyvlm/runner/tower_stream.py), so the tower can never hold
    # more and the steps always keep the rest; 0: the tower may take every SM.
    # Not yet measured on a GPU (benchmarks/bench_tower_beside_steps.py is
    # the device's answer, per SM count).
    vision_tower_sms: int = 0
    # Where the scheduler and the model run: "process" (their own process,
    # as vLLM's EngineCore and SGLang's scheduler process), "thread" (a
    # thread of the caller's process), or "auto" (process on CUDA, thread
    # on CPU).
    engine_process: str = "auto"


@dataclass(frozen=True)
class ParallelConfig:
    """How the model spreads over devices and engines (SGLang's flag names),
    on torch.distributed: NCCL between GPUs, gloo on the CPU."""

    # Tensor parallelism: one engine process per rank, each holding 1/tp_size
    # of every large matrix and of the KV cache's heads (Megatron-LM layout).
    tp_size: int = 1
    # Data parallelism: dp_size engine replicas (each its own process,
    # devices and KV cache) behind the one front, routed by load and prefix.
    dp_size: int = 1
    # The TCP port of the ranks' rendezvous (torch.distributed's env:// /
    # tcp:// store) on 127.0.0.1; None: a free port picked at start-up.
    dist_port: Optional[int] = None
    # Multi-node tensor parallelism (SGLang's flags): nnodes hosts of
    # tp_size / nnodes ranks each; node n holds ranks n*k .. n*k+k-1. Node 0
    # runs the engine (rank 0); the others only serve its steps.
    nnodes: int = 1
    node_rank: int = 0
    # "HOST:PORT" of the rendezvous (rank 0's TCP store, as env://'s
    # MASTER_ADDR:MASTER_PORT), reachable from every node; None (one node
    # only): 127.0.0.1 and dist_port.
    dist_init_addr: Optional[str] = None
    # How the ranks of a tensor-parallel engine share the vision tower
    # (vLLM's mm_encoder_tp_mode): "data", every rank holds the whole tower
    # and encodes its share of a step's images, the rows then all-gathered
    # (the tower's matmuls are too small to gain from splitting, and no
    # collective runs per layer); "weights", the tower's layers split over the
    # ranks like the decoder's (1/N of its weights per rank, every rank
    # encodes every image, an all-reduce per layer).
    mm_encoder_tp_mode: str = "data"
    # The ranks are torchrun's processes (`torchrun --nproc-per-node N -m
    # pyvlm --tp-size N ...`; the command line sets this from torchrun's
    # environment): rank 0's engine starts no rank of its own, and every
    # rank meets at env:// (torchrun's MASTER_ADDR:MASTER_PORT store).
    torchrun: bool = False

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    def node_ranks(self) -> range:
        """The global ranks this node holds."""
        first = self.node_rank * self.ranks_per_node
        return range(first, first + self.ranks_per_node)

    @staticmethod
    def split_address(address: str) -> Tuple[str, int]:
        """("host", port) of "HOST:PORT" ("[v6]:PORT" too); ValueError if
        it is not one."""
        host, sep, port = address.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address!r} is not HOST:PORT (a port in 1..65535)")
        return host, int(port)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


_GROUPS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
           "media": MediaConfig, "runner": RunnerConfig, "parallel": ParallelConfig}
_ALIASES = {"model_path": "model"}


def engine_config(**kwargs) -> EngineConfig:
    """An EngineConfig from flat server-argument names (SGLang's spelling,
    e.g. page_size=16, chunked_prefill_size=512, model_path=...).

    Unknown names raise TypeError naming them, so a typo never passes silently.
    """
    grouped = {name: {} for name in _GROUPS}
    unknown = []
    for key, value in kwargs.items():
        key = _ALIASES.get(key, key)
        group = next((g for g, cls in _GROUPS.items() if key in cls.__dataclass_fields__), None)
        if group is None:
            unknown.append(key)
        else:
            grouped[group][key] = value
    if unknown:
        raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
    return EngineConfig(**{g: _GROUPS[g](**v) for g, v in grouped.items()})
