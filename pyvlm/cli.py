"""Command line of pyvlm.

The OpenAI-compatible server lands with the serving work; today the command
line inspects the compiled extension: `python -m pyvlm ops` lists every op of
torch.ops.pyvlm with the devices it has kernels for.
"""

import argparse
from typing import List, Optional

DESCRIPTION = (
    "pyvlm: a serving engine for vision-language models. "
    "The compiled extension provides torch.ops.pyvlm.* (paged attention, vision-tower "
    "batching, sampling) on CPU and CUDA; the OpenAI-compatible server is not built yet."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pyvlm", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("ops", help="list the extension's ops and the devices each has kernels for")
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "ops":
        print("\n".join(list_ops()))
        return 0
    build_parser().print_help()
    return 0
