"""The server's command line (SGLang's flag names) as plain frozen data.

`add_server_arguments` declares every flag with its help; `server_args_from`
turns parsed flags into a `ServerArgs`; `ServerArgs.engine_kwargs()` gives
the pyvlm.Engine arguments. Building any of these touches no disk or network.
"""

import argparse
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Tuple

from pyvlm.config import ParallelConfig

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerArgs:
    """Everything `python -m pyvlm` is told (see --help for each field)."""

    model: Optional[str] = None  # None: the demo model
    tokenizer_path: Optional[str] = None
    vision_tower_path: Optional[str] = None
    load_format: str = "auto"
    chat_template: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: Optional[str] = None
    served_model_name: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    context_length: Optional[int] = None
    rope_scaling: Optional[Dict[str, Any]] = None
    mem_fraction_static: float = 0.85
    max_running_requests: int = 256
    max_total_tokens: Optional[int] = None
    chunked_prefill_size: Optional[int] = 8192
    max_prefill_tokens: int = 16384
    schedule_policy: str = "fcfs"
    page_size: int = 16
    stream_interval: int = 1
    random_seed: Optional[int] = None  # None: a random base per process
    schedule_conservativeness: float = 1.0
    disable_mixed_chunk: bool = False
    enable_cache_report: bool = False
    disable_radix_cache: bool = False
    log_requests: bool = False
    log_level: str = "info"
    decode_log_interval: int = 40
    enable_metrics: bool = False
    watchdog_timeout: float = 300.0
    limit_mm_per_prompt: int = 16
    allowed_local_media_path: Optional[str] = None
    allow_private_media_urls: bool = False
    max_image_pixels: int = 64_000_000
    max_pending_image_bytes: int = 4 << 30
    mm_processor_kwargs: Optional[Dict[str, Any]] = None
    encoder_cache_bytes: int = 1 << 30
    max_request_bytes: int = 64 * MIB
    # Past running + queued, 429: a sustained overload is shed instead of queued
    # without end (memory, and latency no client waits for).
    max_queued_requests: Optional[int] = 1024
    shutdown_grace_s: float = 10.0
    cuda_graph_max_bs: int = 256
    disable_cuda_graph: bool = False
    piecewise_cuda_graph_max_tokens: int = 1024
    vision_cuda_graphs: int = 8
    vision_side_stream: bool = False
    vision_tower_sms: int = 0
    vision_encode_ahead: bool = False
    engine_process: str = "auto"
    tp_size: int = 1
    dp_size: int = 1
    dist_port: Optional[int] = None
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: Optional[str] = None  # HOST:PORT
    mm_encoder_tp_mode: str = "data"
    torchrun: bool = False  # no flag: set from torchrun's environment (pyvlm.entrypoints.torchrun)
    disable_overlap_schedule: bool = False
    max_mixed_prefill_tokens: Optional[int] = 1024  # pyvlm.config.SchedulerConfig says why

    @property
    def enable_mixed_chunk(self) -> bool:
        """The engine's name for the opposite of --disable-mixed-chunk."""
        return not self.disable_mixed_chunk

    @property
    def model_name(self) -> str:
        """The name clients send as `model` (besides "default")."""
        if self.served_model_name:
            return self.served_model_name
        return self.model or "pyvlm-demo"

    def engine_kwargs(self) -> Dict[str, Any]:
        """Arguments of pyvlm.Engine (pyvlm.config.engine_config names)."""
        names = ("model", "tokenizer_path", "vision_tower_path", "load_format", "dtype", "device",
                 "context_length", "rope_scaling",
                 "mem_fraction_static", "max_running_requests", "max_total_tokens",
                 "chunked_prefill_size", "max_prefill_tokens", "schedule_policy", "page_size",
                 "stream_interval", "random_seed", "schedule_conservativeness", "enable_mixed_chunk",
                 "enable_cache_report", "disable_radix_cache", "encoder_cache_bytes",
                 "decode_log_interval", "chat_template", "served_model_name",
                 "allowed_local_media_path", "allow_private_media_urls", "max_image_pixels",
                 "max_pending_image_bytes", "mm_processor_kwargs", "cuda_graph_max_bs",
                 "disable_cuda_graph", "piecewise_cuda_graph_max_tokens", "vision_cuda_graphs",
                 "vision_side_stream", "vision_tower_sms", "vision_encode_ahead",
                 "engine_process",
                 "max_mixed_prefill_tokens", "tp_size", "dp_size", "dist_port", "nnodes",
                 "node_rank", "dist_init_addr", "mm_encoder_tp_mode", "torchrun")
        kwargs = {name: getattr(self, name) for name in names}
        kwargs["overlap_schedule"] = False if self.disable_overlap_schedule else None
        return kwargs

    def public_dict(self) -> Dict[str, Any]:
        """The arguments without secrets (for /get_server_info)."""
        values = asdict(self)
        values["api_key"] = None if self.api_key is None else "<set>"
        return values


_FLAGS = [
    # (flags, type or action, help)
    (("--model", "--model-path"), str,
     "checkpoint folder or Hugging Face hub id; omitted: the bundled demo model"),
    (("--tokenizer-path",), str, "tokenizer folder or hub id (default: the model's)"),
    (("--vision-tower-path",), str,
     "vision tower folder or hub id of a LLaVA checkpoint in its authors' layout "
     "(default: its config's mm_vision_tower, or the tower weights inside it)"),
    (("--chat-template",), str,
     "a named template (chatml-llava, qwen2-vl, vicuna_v1.1, llama_3_vision, llava_llama_3) "
     "or a path to a Jinja file (default: the checkpoint's own template)"),
    (("--host",), str, "address to listen on (default 127.0.0.1)"),
    (("--port",), int, "port to listen on (default 30000)"),
    (("--api-key",), str, "require 'Authorization: Bearer KEY' on every endpoint but /health"),
    (("--served-model-name",), str, "the model name clients send (default: the --model value)"),
    (("--load-format",), str,
     "auto (the checkpoint's weights) or dummy (random weights from its config alone, no "
     "weight files: for benchmarking real shapes)"),
    (("--dtype",), str, "auto|float32|float16|bfloat16 (default auto)"),
    (("--device",), str, "auto|cpu|cuda (default auto)"),
    (("--context-length",), int,
     "context length in tokens (default, and most: the positions the checkpoint supports)"),
    (("--rope-scaling",), json.loads,
     "JSON rope scaling for the text model, e.g. '{\"rope_type\": \"linear\", \"factor\": 4}': "
     "multiplies the positions the model supports (and allowed --context-length) by factor"),
    (("--mem-fraction-static",), float,
     "GPU: fraction of the card's memory for the weights, the KV cache and what steps need "
     "beside them, measured at start-up (default 0.85)"),
    (("--max-running-requests",), int, "most requests decoding at once (default 256)"),
    (("--max-total-tokens",), int, "KV pool size in tokens (default: from free memory)"),
    (("--chunked-prefill-size",), int,
     "longest prefill chunk in tokens; <= 0 disables chunking (default 8192)"),
    (("--max-prefill-tokens",), int, "most prompt tokens in one prefill batch (default 16384)"),
    (("--schedule-policy",), str, "fcfs|lpm: waiting-queue order (default fcfs)"),
    (("--page-size",), int, "tokens per KV cache page (default 16)"),
    (("--stream-interval",), int, "tokens between streamed deltas (default 1)"),
    (("--random-seed",), int,
     "first seed of requests that give none (default: random per process)"),
    (("--schedule-conservativeness",), float,
     "scales the decode room reserved for running requests before admitting more; "
     "0 reserves none (default 1.0)"),
    (("--disable-mixed-chunk",), "store_true",
     "run prefill and decode in separate steps (default: prefill chunks run in the same step "
     "as one token of every running request, so new requests never pause the streams)"),
    (("--enable-cache-report",), "store_true",
     "report usage.prompt_tokens_details.cached_tokens in every response"),
    (("--disable-radix-cache",), "store_true", "turn the prefix cache off"),
    (("--log-requests",), "store_true", "log every request (method, path, status, time)"),
    (("--log-level",), str, "debug|info|warning|error (default info)"),
    (("--decode-log-interval",), int, "decode steps between batch log lines (default 40)"),
    (("--enable-metrics",), "store_true", "serve Prometheus metrics at GET /metrics"),
    (("--watchdog-timeout",), float,
     "seconds an engine step may take before the server is declared hung and exits (default 300)"),
    (("--limit-mm-per-prompt",), int, "most images in one request, over all messages (default 16)"),
    (("--allowed-local-media-path",), str,
     "directory whose files (paths and file:// URLs) requests may use as images (default: none)"),
    (("--allow-private-media-urls",), "store_true",
     "allow image URLs on loopback/private/link-local addresses (off: refused, against SSRF)"),
    (("--max-image-pixels",), int,
     "most pixels of any image buffer of a request: the decoded image, a padded square canvas, "
     "a resized copy (default 64000000); more is a 400 naming the image"),
    (("--max-pending-image-bytes",), int,
     "most bytes of preprocessed images held by requests not yet finished; past it, new "
     "image requests get 429 (default 4 GiB)"),
    (("--mm-processor-kwargs",), json.loads,
     "JSON image-processor settings over the checkpoint's, e.g. '{\"max_pixels\": 1003520}' "
     "for Qwen2-VL; a request's own mm_processor_kwargs apply on top"),
    (("--encoder-cache-bytes",), int,
     "bytes of vision-tower outputs kept for reuse (default 1 GiB)"),
    (("--max-request-bytes",), int, "largest request body in bytes (default 64 MiB); more gets 413"),
    (("--max-queued-requests",), int,
     "most requests waiting beyond --max-running-requests; more get 429 with Retry-After "
     "(default 1024)"),
    (("--cuda-graph-max-bs",), int,
     "CUDA: largest decode batch run through a captured CUDA graph (default 256)"),
    (("--disable-cuda-graph",), "store_true", "CUDA: run every step eagerly (no CUDA graphs)"),
    (("--piecewise-cuda-graph-max-tokens",), int,
     "CUDA: prefill and mixed steps of up to this many tokens run the decoder between its "
     "attentions as captured CUDA graphs (default 1024; 0: eagerly)"),
    (("--vision-cuda-graphs",), int,
     "CUDA: Qwen2-VL/Qwen2.5-VL vision-tower CUDA graphs kept, one per combination of image "
     "sizes in a step, captured the second time it is seen (default 8; 0: the tower runs "
     "eagerly)"),
    (("--vision-side-stream",), "store_true",
     "CUDA, one GPU per replica: run the vision tower on a second stream, of lower priority "
     "than the steps' own, beside the step in flight instead of after it; reserves its "
     "activations apart (off by default: within noise on an H100, and a decode step "
     "beside a tower ran slower than after it)"),
    (("--vision-tower-sms",), int,
     "CUDA, with --vision-side-stream: the side stream is a CUDA green context's of this many "
     "SMs, so the tower never holds more and the steps keep the rest; needs a CUDA 12.5+ "
     "driver; the tower then runs without its CUDA graphs (default 0: "
     "the tower may take every SM; not yet measured)"),
    (("--vision-encode-ahead",), "store_true",
     "encode the images of the next waiting requests before their prefill, instead of inside "
     "the mixed step that admits them: a step ahead, in what its budget leaves; with "
     "--vision-side-stream beside the steps, the request admitted once they are done (off by "
     "default: within noise on an H100)"),
    (("--max-mixed-prefill-tokens",), int,
     "most prefill tokens in a step that also decodes the running requests (default 1024; "
     "<= 0: only --chunked-prefill-size): bounds the streams' inter-token time while new "
     "requests are prefilled"),
    (("--disable-overlap-schedule",), "store_true",
     "CUDA: read each step's tokens before launching the next (no overlap of the "
     "host's scheduling with the device's step)"),
    (("--engine-process",), str,
     "auto|process|thread: run the scheduler and model in their own process or in a thread "
     "of the server's (default auto: a process on CUDA, a thread on CPU)"),
    (("--tp-size",), int,
     "tensor parallelism: ranks (one engine process and GPU each; gloo on CPU) that each hold "
     "1/N of the weights and KV heads (default 1)"),
    (("--dp-size",), int,
     "data parallelism: engine replicas behind this server, each with its own process, "
     "device(s) and KV cache, routed by load and cached prefix (default 1)"),
    (("--dist-port",), int,
     "TCP port on 127.0.0.1 for the tensor-parallel ranks' rendezvous (default: a free one)"),
    (("--nnodes",), int,
     "hosts the --tp-size ranks spread over, --tp-size / --nnodes each (default 1); run "
     "the same command on each with its --node-rank and the same --dist-init-addr"),
    (("--node-rank",), int,
     "this host's index among --nnodes (default 0): node 0 serves HTTP and runs rank 0; "
     "the others serve no HTTP, only run their ranks until node 0 stops"),
    (("--dist-init-addr",), str,
     "HOST:PORT of the ranks' rendezvous, on node 0 and reachable from every node (as "
     "torch's MASTER_ADDR:MASTER_PORT); required with --nnodes > 1 (default: "
     "127.0.0.1:--dist-port)"),
    (("--mm-encoder-tp-mode",), str,
     "data|weights: with --tp-size > 1, every rank holds the whole vision tower and encodes "
     "its share of each step's images (data, the default), or the tower's layers split over "
     "the ranks like the decoder's (weights: less memory per rank, an all-reduce per layer)"),
]


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares every server flag on parser (defaults: ServerArgs')."""
    defaults = ServerArgs()
    for flags, kind, help_text in _FLAGS:
        dest = flags[0][2:].replace("-", "_")
        if kind == "store_true":
            parser.add_argument(*flags, dest=dest, action="store_true", help=help_text)
        else:
            parser.add_argument(*flags, dest=dest, type=kind, default=getattr(defaults, dest),
                                help=help_text)


def server_args_from(namespace: argparse.Namespace) -> ServerArgs:
    """A ServerArgs from parsed flags; raises ValueError on impossible values."""
    names = {f.name for f in fields(ServerArgs)}
    args = ServerArgs(**{k: v for k, v in vars(namespace).items() if k in names})
    _check(args)
    return args


def _check(args: ServerArgs) -> None:
    checks = [
        (0 < args.port < 65536, "--port must be in 1..65535"),
        (args.limit_mm_per_prompt >= 0, "--limit-mm-per-prompt must be >= 0"),
        (args.max_request_bytes > 0, "--max-request-bytes must be > 0"),
        (args.max_queued_requests is None or args.max_queued_requests >= 0,
         "--max-queued-requests must be >= 0"),
        (args.max_running_requests > 0, "--max-running-requests must be > 0"),
        (args.watchdog_timeout > 0, "--watchdog-timeout must be > 0"),
        (args.max_image_pixels > 0, "--max-image-pixels must be > 0"),
        (args.encoder_cache_bytes >= 0, "--encoder-cache-bytes must be >= 0"),
        (args.max_pending_image_bytes > 0, "--max-pending-image-bytes must be > 0"),
        (args.schedule_conservativeness >= 0, "--schedule-conservativeness must be >= 0"),
        (args.rope_scaling is None or isinstance(args.rope_scaling, dict),
         "--rope-scaling must be a JSON object"),
        (args.mm_processor_kwargs is None or isinstance(args.mm_processor_kwargs, dict),
         "--mm-processor-kwargs must be a JSON object"),
        (args.load_format in ("auto", "dummy"), "--load-format must be auto or dummy"),
        (args.cuda_graph_max_bs >= 0, "--cuda-graph-max-bs must be >= 0"),
        (args.vision_cuda_graphs >= 0, "--vision-cuda-graphs must be >= 0"),
        (args.vision_tower_sms >= 0, "--vision-tower-sms must be >= 0"),
        (not args.vision_tower_sms or args.vision_side_stream,
         "--vision-tower-sms needs --vision-side-stream"),
        (args.piecewise_cuda_graph_max_tokens >= 0,
         "--piecewise-cuda-graph-max-tokens must be >= 0"),
        (args.tp_size >= 1, "--tp-size must be >= 1"),
        (args.dp_size >= 1, "--dp-size must be >= 1"),
        (args.dist_port is None or 0 < args.dist_port < 65536, "--dist-port must be in 1..65535"),
        (args.mm_encoder_tp_mode in ("data", "weights"),
         "--mm-encoder-tp-mode must be data or weights"),
        (args.engine_process in ("auto", "process", "thread"),
         "--engine-process must be auto, process or thread"),
        (args.log_level.lower() in ("debug", "info", "warning", "error", "critical"),
         "--log-level must be debug, info, warning, error or critical"),
    ]
    for ok, message in checks + _node_checks(args):
        if not ok:
            raise ValueError(message)


def _node_checks(args: ServerArgs) -> List[Tuple[bool, str]]:
    """Multi-node tensor parallelism: --nnodes, --node-rank, --dist-init-addr."""
    checks = [
        (args.nnodes >= 1, "--nnodes must be >= 1"),
        (args.nnodes < 1 or args.tp_size % args.nnodes == 0,
         f"--tp-size ({args.tp_size}) must be a multiple of --nnodes ({args.nnodes})"),
        (0 <= args.node_rank < max(args.nnodes, 1),
         f"--node-rank must be in 0..{args.nnodes - 1} (--nnodes {args.nnodes})"),
        (args.nnodes == 1 or args.dist_init_addr is not None,
         "--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address, the same on "
         "every node)"),
        (args.dp_size == 1 or (args.nnodes == 1 and args.dist_init_addr is None),
         "--dp-size > 1 takes neither --nnodes > 1 nor --dist-init-addr (each replica has "
         "its own rendezvous, at --dist-port + its index)"),
    ]
    if args.dist_init_addr is not None:
        try:
            ParallelConfig.split_address(args.dist_init_addr)
        except ValueError as exc:
            checks.append((False, f"--dist-init-addr: {exc}"))
    return checks
