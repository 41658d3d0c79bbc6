"""Command line of pyvlm.

`python -m pyvlm [--model ...]` starts the OpenAI-compatible server (SGLang's
flag names; the demo model when no --model is given; with --node-rank N > 0,
only that node's tensor-parallel ranks, no server; under torchrun, rank 0
serves and the others run their rank); `python -m pyvlm
generate` runs the offline Engine on one prompt (with images); `python -m
pyvlm ops` lists the extension's ops.
"""

import argparse
import logging
from typing import List, Optional

DESCRIPTION = (
    "pyvlm: a serving engine for vision-language models. "
    "`python -m pyvlm [flags]` starts the OpenAI-compatible server (/v1/chat/completions "
    "with images, /v1/completions, /generate, /health, /metrics ...); "
    "`python -m pyvlm generate` runs the offline engine on one prompt; "
    "`python -m pyvlm ops` lists the compiled ops."
)
SUBCOMMANDS = ("ops", "generate")
LOG_FORMAT = "[%(asctime)s] %(message)s"

DEMO_NOTICE = (
    "No --model given: using the demo model (SmolLM2-135M-Instruct with a random-weight "
    "SigLIP vision tower). It answers text questions; what it says about images is meaningless."
)


def build_server_parser() -> argparse.ArgumentParser:
    """`python -m pyvlm [flags]`: every server flag (see pyvlm/server/args.py)."""
    from pyvlm.server.args import add_server_arguments

    parser = argparse.ArgumentParser(
        prog="python -m pyvlm", description=DESCRIPTION,
        epilog="subcommands: `python -m pyvlm generate --help`, `python -m pyvlm ops`")
    add_server_arguments(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pyvlm", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("ops", help="list the extension's ops and the devices each has kernels for")
    gen = sub.add_parser("generate", help="answer one chat message with the offline engine")
    gen.add_argument("--model", "--model-path", dest="model", default=None,
                     help="checkpoint folder or hub id (default: the demo model)")
    gen.add_argument("--prompt", default="What is the capital of France?")
    gen.add_argument("--image", action="append", default=[],
                     help="image path, URL or data URI (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--device", default="auto", help="auto|cpu|cuda")
    gen.add_argument("--dtype", default="auto", help="auto|float32|float16|bfloat16")
    return parser


def list_ops() -> List[str]:
    """One line per op of torch.ops.pyvlm: its name and the devices with a kernel."""
    import torch

    import pyvlm.ops  # noqa: F401  (loads the extension)

    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyvlm::"))
    lines = []
    for qualname in names:
        # "computed": a device-independent kernel (the index-check setting's,
        # CompositeExplicitAutograd) serves every device.
        devices = [key for key in ("CPU", "CUDA")
                   if torch._C._dispatch_has_computed_kernel_for_dispatch_key(qualname, key)]
        lines.append(f"{qualname.split('::')[1]:32s} {', '.join(devices) or '(no kernel)'}")
    return lines


def generate(args: argparse.Namespace) -> str:
    """Runs one chat turn through pyvlm.Engine and returns the answer."""
    from pyvlm import Engine

    if args.model is None:
        print(DEMO_NOTICE, flush=True)
    content = [{"type": "image_url", "image_url": {"url": url}} for url in args.image]
    content.append({"type": "text", "text": args.prompt})
    with Engine(model=args.model, device=args.device, dtype=args.dtype,
                allowed_local_media_path=folder_of_local_images(args.image)) as engine:
        result = engine.generate(messages=[{"role": "user", "content": content}],
                                 sampling_params={"max_new_tokens": args.max_new_tokens,
                                                  "temperature": args.temperature})
    return result["text"]


def folder_of_local_images(sources: List[str]) -> Optional[str]:
    """The folder holding every local image path given on the command line
    (the user named them, so the engine's media policy may read them)."""
    import os

    paths = [os.path.abspath(s) for s in sources if "://" not in s and not s.startswith("data:")]
    return os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else None


def _report_errors(command, args) -> int:
    """Runs a command; a user error (missing model, bad image, bad value) is
    one line on stderr and exit status 2, never a traceback."""
    import sys

    from pyvlm.models.checkpoint import CheckpointError

    try:
        print(command(args))
        return 0
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def serve(argv: List[str]) -> int:
    """Parses the server flags and serves until SIGTERM/Ctrl-C."""
    import sys

    from pyvlm.server.args import server_args_from
    from pyvlm.server.launch import run_server

    from pyvlm.entrypoints.torchrun import TorchrunWorld, under_torchrun

    parser = build_server_parser()
    namespace = parser.parse_args(argv)
    try:
        args = server_args_from(namespace)
        world = TorchrunWorld.from_environ()
        if world is not None:
            args = under_torchrun(args, world)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    if args.model is None and (world is None or world.rank == 0):
        print(DEMO_NOTICE, file=sys.stderr, flush=True)
    if world is not None and world.rank > 0:
        return serve_torchrun_rank(args, world.rank)
    if args.node_rank > 0:
        return serve_node(args)
    return run_server(args)


def serve_node(args) -> int:
    """--node-rank N > 0: no HTTP server, only this node's tensor-parallel
    ranks, serving node 0's engine until it stops them (exit 0) or a rank
    fails (exit 1)."""
    from pyvlm.config import engine_config
    from pyvlm.entrypoints.tensor_parallel_ranks import serve_node as serve_node_ranks

    return serve_node_ranks(engine_config(**args.engine_kwargs()),
                            (logging.getLogger().level, LOG_FORMAT))


def serve_torchrun_rank(args, rank: int) -> int:
    """Rank > 0 of a torchrun job (pyvlm.entrypoints.torchrun): no HTTP
    server, only this rank, serving rank 0's engine until it stops."""
    from pyvlm.config import engine_config
    from pyvlm.entrypoints.torchrun import serve_torchrun_rank as serve_rank

    return serve_rank(engine_config(**args.engine_kwargs()),
                      rank, (logging.getLogger().level, LOG_FORMAT))


def main(argv: Optional[List[str]] = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        return serve(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    if args.command == "ops":
        print("\n".join(list_ops()))
        return 0
    if args.command == "generate":
        return _report_errors(generate, args)
    return 0
