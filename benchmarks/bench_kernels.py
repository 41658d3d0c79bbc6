"""Times every pyvlm op against the pure-torch alternative, on CPU and CUDA.

    python benchmarks/bench_kernels.py [--device cpu|cuda|all] [--only GROUP ...]

Prints a markdown table (ours, baseline, speedup and, on CUDA, the achieved
fraction of the measured device copy bandwidth) ready for RESULTS.md.
"""

import argparse
import importlib
import os
import platform
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels.harness import format_table, measure_copy_bandwidth  # noqa: E402

GROUPS = ["activation", "layers", "linear", "attention", "prefill", "sampling", "preprocess"]


def describe(device: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    what = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    return f"device: {what}; torch {torch.__version__}; commit {commit}; threads {torch.get_num_threads()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--only", nargs="*", default=None, help=f"groups among {GROUPS}")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    groups = args.only or GROUPS
    for device in devices:
        rows = []
        for group in groups:
            try:
                module = importlib.import_module(f"benchmarks.kernels.{group}")
            except ModuleNotFoundError as e:
                print(f"skipping {group}: {e}", file=sys.stderr)
                continue
            rows += module.run(device)
        bw = measure_copy_bandwidth(device)
        print(f"\n## {device}: {describe(device)}")
        if bw:
            print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s")
        print(format_table(rows, bw))


if __name__ == "__main__":
    main()
