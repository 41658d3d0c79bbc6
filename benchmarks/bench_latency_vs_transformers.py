"""Latency and throughput of pyvlm's server beside transformers `generate`:
benchmarks/bench_e2e_gpu.py with the settings of the tables of RESULTS.md
made before it (its step phase left out, as many throughput requests as
concurrent ones), so their commands still run:

  python benchmarks/bench_latency_vs_transformers.py --model qwen2-vl-7b --device cuda
  python benchmarks/bench_latency_vs_transformers.py --model qwen2-vl-7b-narrow  # CPU

Every flag of bench_e2e_gpu.py is taken (--skip "" brings the step phase back).
"""

import sys
from pathlib import Path

sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from benchmarks import bench_e2e_gpu  # noqa: E402

# None: --concurrency requests
DEFAULTS = {"skip": "step", "num_requests": None}


def main(argv=None) -> bench_e2e_gpu.E2ERun:
    return bench_e2e_gpu.main(argv, DEFAULTS)


if __name__ == "__main__":
    main()
