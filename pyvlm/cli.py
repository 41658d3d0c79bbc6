"""Command line of pyvlm.

`python -m pyvlm generate` runs the offline Engine on one prompt (with
images), on the demo model when no --model is given; `python -m pyvlm ops`
lists the extension's ops. The OpenAI-compatible server lands with the
serving work.
"""

import argparse
import logging
from typing import List, Optional

DESCRIPTION = (
    "pyvlm: a serving engine for vision-language models. "
    "The compiled extension provides torch.ops.pyvlm.* (paged attention, vision-tower "
    "batching, sampling) on CPU and CUDA; `generate` runs the offline engine "
    "(the OpenAI-compatible server is not built yet)."
)

DEMO_NOTICE = (
    "No --model given: using the demo model (SmolLM2-135M-Instruct with a random-weight "
    "SigLIP vision tower). It answers text questions; what it says about images is meaningless."
)


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
        devices = [key for key in ("CPU", "CUDA")
                   if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)]
        lines.append(f"{qualname.split('::')[1]:32s} {', '.join(devices) or '(no kernel)'}")
    return lines


def generate(args: argparse.Namespace) -> str:
    """Runs one chat turn through pyvlm.Engine and returns the answer."""
    from pyvlm import Engine

    if args.model is None:
        print(DEMO_NOTICE, flush=True)
    content = [{"type": "image_url", "image_url": {"url": url}} for url in args.image]
    content.append({"type": "text", "text": args.prompt})
    with Engine(model=args.model, device=args.device, dtype=args.dtype) as engine:
        result = engine.generate(messages=[{"role": "user", "content": content}],
                                 sampling_params={"max_new_tokens": args.max_new_tokens,
                                                  "temperature": args.temperature})
    return result["text"]


def _report_errors(command, args) -> int:
    """Runs a command; a user error (missing model, bad image, bad value) is
    one line on stderr and exit status 2, never a traceback."""
    import sys

    from pyvlm.runner.checkpoint import CheckpointError

    try:
        print(command(args))
        return 0
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    if args.command == "ops":
        print("\n".join(list_ops()))
        return 0
    if args.command == "generate":
        return _report_errors(generate, args)
    build_parser().print_help()
    return 0
