"""Host time of one decode step's index lists through HostUpload, against
the same HostUpload turning its lists into tensors with torch.tensor, as
it did before (the baseline, in the same run): the lists of a step of
`--requests` running requests of `--context` tokens in pages of
`--page-size` (token ids, positions, slots, sequence lengths, sampling
parameters, and the block table, which is most of the numbers). CPU only:
the device copy is the same either way.

    python benchmarks/bench_host_upload.py [--requests 64] [--context 3072] [--page-size 16]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyvlm.ops import host_upload  # noqa: E402
from pyvlm.ops.host_upload import HostUpload  # noqa: E402


def step_lists(requests: int, context: int, page_size: int):
    """(values, dtype) of a decode step's lists, as the runner stages them."""
    width = context // page_size
    table = [[r * width + p for p in range(width)] for r in range(requests)]
    longs = [list(range(requests)) for _ in range(5)]  # ids, positions, slots, seeds, steps
    ints = [[context] * requests, [0] * requests, [40] * requests]  # lengths, top_k ...
    floats = [[0.7] * requests, [0.9] * requests]  # temperature, top_p
    return ([(v, torch.int64) for v in longs] + [(v, torch.int32) for v in ints]
            + [(table, torch.int32)] + [(v, torch.float32) for v in floats])


def through_host_upload(lists) -> None:
    upload = HostUpload()
    for values, dtype in lists:
        upload.add(values, dtype)
    upload.to("cpu")


def through_torch_tensor(lists) -> None:
    """HostUpload with its lists turned into tensors by torch.tensor."""
    fast = host_upload._list_tensor
    host_upload._list_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype)
    try:
        through_host_upload(lists)
    finally:
        host_upload._list_tensor = fast


def time_us(fn, lists, repeats: int, samples: int) -> float:
    for _ in range(repeats // 10):
        fn(lists)
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(repeats):
            fn(lists)
        times.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--context", type=int, default=3072)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=7)
    args = parser.parse_args()
    lists = step_lists(args.requests, args.context, args.page_size)
    numbers = sum(len(v) * (len(v[0]) if v and isinstance(v[0], list) else 1) for v, _ in lists)
    ours = time_us(through_host_upload, lists, args.repeats, args.samples)
    baseline = time_us(through_torch_tensor, lists, args.repeats, args.samples)
    print("| step lists | numbers | HostUpload (us) | with torch.tensor (us) | speedup |")
    print("|---|---|---|---|---|")
    print(f"| {args.requests} requests x {args.context} tokens, page {args.page_size} | "
          f"{numbers:,} | {ours:.1f} | {baseline:.1f} | {baseline / ours:.2f}x |")


if __name__ == "__main__":
    main()
