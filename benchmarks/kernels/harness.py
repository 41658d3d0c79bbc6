"""Timing and reporting helpers shared by the kernel benchmarks.

Each group module (attention.py, sampling.py, ...) exposes
`run(device: str) -> list[Row]`: for every case it times pyvlm's op and the
pure-torch alternative a user would write, in the same run, on the same data.
"""

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Row:
    op: str  # e.g. "paged_attention_decode"
    case: str  # shape summary, e.g. "b=64 ctx=4096 h=32/8 d=128 bf16"
    device: str
    ours_us: float
    baseline: str  # what the baseline is, e.g. "SDPA on gathered pages"
    baseline_us: float
    bytes_moved: int = 0  # fewest bytes the op must move (for bandwidth); 0 = n/a

    @property
    def speedup(self) -> float:
        return self.baseline_us / self.ours_us if self.ours_us > 0 else float("nan")


def time_us(fn: Callable[[], object], device: str, warmup: int = 3, repeat: int = 20,
            min_seconds: float = 0.0, calls_per_sample: int = 1) -> float:
    """Median wall time of fn() in microseconds (CUDA events on GPU).
    calls_per_sample (CUDA): back-to-back calls between one pair of events,
    the time divided among them, so a kernel shorter than its host launch
    is timed on the device (one call between events times the launch)."""
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        return _time_cuda_us(fn, repeat, calls_per_sample)
    samples = []
    start_all = time.perf_counter()
    while len(samples) < repeat or time.perf_counter() - start_all < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
        if len(samples) >= 10 * repeat:
            break
    return statistics.median(samples)


def _time_cuda_us(fn, repeat: int, calls_per_sample: int = 1) -> float:
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls_per_sample):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls_per_sample)
    return statistics.median(samples)


def measure_copy_bandwidth(device: str, nbytes: int = 1 << 30) -> Optional[float]:
    """Device-to-device copy bandwidth in bytes/s (read + write), or None on CPU."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device, warmup=3, repeat=20)
    return 2 * src.numel() / (us * 1e-6)


def format_table(rows, copy_bandwidth: Optional[float]) -> str:
    """A markdown table: ours, baseline, ratio and (CUDA) fraction of copy bandwidth."""
    header = "| op | case | device | pyvlm (us) | baseline | baseline (us) | speedup | % copy BW |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        bw = ""
        if copy_bandwidth and r.bytes_moved:
            bw = f"{100 * r.bytes_moved / (r.ours_us * 1e-6) / copy_bandwidth:.0f}%"
        lines.append(
            f"| {r.op} | {r.case} | {r.device} | {r.ours_us:,.1f} | {r.baseline} | "
            f"{r.baseline_us:,.1f} | {r.speedup:.2f}x | {bw} |"
        )
    return "\n".join(lines)
