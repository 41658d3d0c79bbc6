"""Where a decode step's time goes: torch.profiler over steady decode steps
of a random-weight model of a real shape (`--load-format dummy`), the
engine on a thread of this process with its default flags (CUDA graphs,
overlap). Prints, per batch size, the wall time per step against the device
time its kernels took (the gap is the host's, or idle device time) and the
kernels by total time, next to the step's bandwidth floor from the same
run's copy rate.

    python benchmarks/profile_decode.py --model qwen2-vl-7b --batches 1,64 --context 3072
    python benchmarks/profile_decode.py --model qwen2-vl-7b-narrow --device cpu --batches 1,4 \\
        --context 128 --steps 4
    python benchmarks/profile_decode.py --model qwen2-vl-7b --batches "" --throughput 128
    python benchmarks/profile_decode.py --model qwen2-vl-7b --batches "" --throughput 128 \
        --sync-debug --server-args max_mixed_prefill_tokens=1024

Graph replays show as their kernels when the profiler's CUPTI sees them
(CUDA 12+); a row named "cudaGraphLaunch" is the host side only.
"""

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]

from benchmarks.load.serve_random import SHAPES, config_for  # noqa: E402
from benchmarks.offline.roofline import Roofline, config_cost, measure_rates  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=SHAPES)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,64", help="running requests, comma-separated")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens per request")
    parser.add_argument("--image", action="store_true",
                        help="decode requests of one photo each (the e2e benchmark's prompt) "
                             "instead of --context text tokens")
    parser.add_argument("--steps", type=int, default=8, help="decode steps profiled per batch")
    parser.add_argument("--top", type=int, default=25, help="kernels listed per batch")
    parser.add_argument("--ttft", action="store_true",
                        help="also profile one fresh image's first token (the engine's whole "
                             "path: image preprocessing, tower, prefill)")
    parser.add_argument("--throughput", type=int, default=0, metavar="N",
                        help="also profile N requests with distinct images, --output-len tokens "
                             "each, submitted at once to an engine that runs --max-running of "
                             "them at a time (the serving benchmark's throughput phase without "
                             "HTTP): device busy time, kernels, and the steps by kind")
    parser.add_argument("--sync-debug", action="store_true",
                        help="with --throughput: also list where the host waited for the device "
                             "(torch's synchronizing operations, by pyvlm call site)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--photos", type=Path, default=None, help="photos for the images")
    parser.add_argument("--server-args", nargs="*", default=[],
                        help="more engine arguments as name=value (e.g. disable_cuda_graph=1)")
    return parser.parse_args(argv)


def engine_for(folder: Path, args, dtype: torch.dtype, max_batch: int):
    from pyvlm import Engine

    extra = {}
    for item in args.server_args:
        name, _, value = item.partition("=")
        extra[name] = int(value) if value.isdigit() else value
    running = max(max_batch, args.max_running if args.throughput else 1, 1)
    return Engine(str(folder), load_format="dummy", device=args.device,
                  dtype=str(dtype).replace("torch.", ""), engine_process="thread",
                  max_running_requests=running, **extra)


class StepProfiler:
    """Counts the runner's steps; profiles steps [first, first + count)."""

    def __init__(self, runner, first: int, count: int, device: str):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.steps, self.first, self.count = 0, first, count
        self.marks = []
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=max(first - 1, 0), warmup=1, active=count,
                                             repeat=1))
        self._wrap(runner)

    def _wrap(self, runner) -> None:
        inner = runner.launch  # forward() goes through launch() too

        def counted(batch):
            self.prof.step()
            self.steps += 1
            if self.first <= self.steps <= self.first + self.count:
                self.marks.append(time.perf_counter())
            return inner(batch)

        runner.launch = counted


def is_range(name: str) -> bool:
    """Whether a profiler event is the profiler's step range, not an
    operator or kernel (it also shows on the device's timeline)."""
    return name.startswith("ProfilerStep")


def device_kernels(events):
    """The device's kernel events (no ranges)."""
    return [e for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and not is_range(e.name)]


def kernel_rows(prof, device: str):
    """(name, total us, calls) of device kernels; on a CPU, of operators by
    their self time."""
    if not device.startswith("cuda"):
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()
                if not is_range(e.key)]
        return sorted(rows, key=lambda r: -r[1])
    totals, calls = defaultdict(float), defaultdict(int)
    for event in device_kernels(prof.events()):
        totals[event.name] += event.device_time
        calls[event.name] += 1
    return sorted(((n, totals[n], calls[n]) for n in totals), key=lambda r: -r[1])


def decode_requests(batch: int, args):
    """generate() keyword arguments for batch requests: token prompts of
    args.context tokens, or with --image one chat each with its own photo."""
    if not args.image:
        vocab = 1000
        return {"prompt": [[(17 * i + 31 * j) % vocab + 10 for j in range(args.context)]
                           for i in range(batch)]}
    from benchmarks.load.images import distinct_pictures
    from benchmarks.load.serving_phases import image_size_for

    pictures = distinct_pictures(batch, image_size_for(args.model), args.photos)
    return {"messages": [[{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "Describe this image."}]}]
        for image in pictures]}


def profile_batch(engine, runner, batch: int, args, roofline) -> None:
    requests = decode_requests(batch, args)
    steps_needed = 4 + args.steps
    params = {"max_new_tokens": steps_needed + 4, "ignore_eos": True, "temperature": 0.0}
    outs = engine.generate(sampling_params=[params] * batch, **requests)  # warm: same shapes
    engine.flush_cache()  # caches filled, then flushed
    context = sum(o["meta_info"]["prompt_tokens"] for o in outs) // batch
    # Prefill takes ceil(batch * context / chunk) steps; start after them.
    prefill_steps = -(-batch * context // 512) + 2
    profiler = StepProfiler(runner, prefill_steps + 2, args.steps, args.device)
    with profiler.prof:
        engine.generate(sampling_params=[{**params, "max_new_tokens":
                                          prefill_steps + steps_needed + 4}] * batch, **requests)
    marks = profiler.marks
    wall_us = (marks[-1] - marks[0]) / max(len(marks) - 1, 1) * 1e6
    rows = kernel_rows(profiler.prof, args.device)
    busy = sum(us for _, us, _ in rows) / args.steps
    floor_us = roofline.decode_step_s(batch, context) * 1e6
    shown = f"{context} (with its image)" if args.image else str(context)
    print(f"\n### batch {batch}, context {shown}: {wall_us:,.0f} us per step (wall), "
          f"{busy:,.0f} us of kernels per step, floor {floor_us:,.0f} us "
          f"({floor_us / wall_us:.0%} of floor at the wall, {floor_us / max(busy, 1e-9):.0%} "
          f"on the device)\n")
    print_rows(rows, args.top, args.steps, "kernel (per step)")


def print_rows(rows, count: int, per: int, label: str) -> None:
    print(f"| {label} | us | calls | share |")
    print("|---|---|---|---|")
    total = sum(us for _, us, _ in rows) or 1.0
    for name, us, calls in rows[:count]:
        print(f"| {name[:110]} | {us / per:,.1f} | {calls / per:.1f} | {us / total:.1%} |")


def profile_ttft(engine, args) -> None:
    """One fresh image's first token, timed without and then with the
    profiler (a fourth image, so neither hits the caches), after two
    warm-up images of the same size (the second one captures the vision
    tower's CUDA graph for that size, as a server's warm-up does)."""
    from benchmarks.load.images import distinct_pictures
    from benchmarks.load.serving_phases import image_size_for

    pictures = distinct_pictures(4, image_size_for(args.model), args.photos)
    warm_ups, plain, profiled = pictures[:2], pictures[2], pictures[3]
    params = {"max_new_tokens": 1, "temperature": 0.0}

    def first_token(image) -> float:
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "Describe this image."}]}]
        start = time.perf_counter()
        engine.generate(messages=messages, sampling_params=params)
        return time.perf_counter() - start

    for image in warm_ups:
        first_token(image)
    launches = []
    runner = engine.state.runner
    inner = runner.launch

    def timed_launch(batch):
        launches.append(time.perf_counter())
        return inner(batch)

    runner.launch = timed_launch
    start = time.perf_counter()
    plain_ms = first_token(plain) * 1e3
    runner.launch = inner
    if launches:
        print(f"\nhost: the request's first step launched {(launches[0] - start) * 1e3:.2f} ms "
              f"after generate() was called (front, submit, scheduling), {len(launches)} step(s)")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("ttft_request"):
            profiled_ms = first_token(profiled) * 1e3
    print(f"\n### TTFT, one fresh image: {plain_ms:,.1f} ms (engine API, no HTTP); "
          f"{profiled_ms:,.1f} ms under the profiler\n")
    if args.device.startswith("cuda"):
        rows = kernel_rows(prof, args.device)
        print(f"device kernels: {sum(us for _, us, _ in rows) / 1e3:,.1f} ms in all\n")
        print_device_timeline(prof.events())
        print_rows(rows, args.top, 1, "kernel")
        print()
    cpu = sorted(((e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()),
                 key=lambda r: -r[1])
    print_rows(cpu, args.top, 1, "host op (self time)")


def print_device_timeline(events, min_gap_us: float = 20.0, top: int = 8) -> None:
    """Where one request's wall time went: host time before its first
    kernel, device idle gaps between its kernels (with the host calls made
    during each of the largest), and time after its last kernel."""
    request = next((e for e in events if e.name == "ttft_request"), None)
    kernels = sorted((e.time_range.start, e.time_range.end) for e in device_kernels(events))
    if request is None or not kernels:
        return
    t0, t1 = request.time_range.start, request.time_range.end
    gaps, busy_end = [], kernels[0][1]
    for start, end in kernels[1:]:
        if start - busy_end > min_gap_us:
            gaps.append((start - busy_end, busy_end, start))
        busy_end = max(busy_end, end)
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU
            and e.name != "ttft_request"]
    print(f"timeline (ms from the request's start): first kernel at "
          f"{(kernels[0][0] - t0) / 1e3:.2f}, last kernel ends at {(busy_end - t0) / 1e3:.2f}, "
          f"request returns at {(t1 - t0) / 1e3:.2f}; device idle in gaps > {min_gap_us:.0f} us "
          f"between them: {sum(g for g, _, _ in gaps) / 1e3:.2f} ms in {len(gaps)} gaps\n")
    print("| idle gap (us) | at (ms) | host calls during it |")
    print("|---|---|---|")
    for gap, start, end in sorted(gaps, reverse=True)[:top]:
        during = defaultdict(float)
        for e in host:
            overlap = min(e.time_range.end, end) - max(e.time_range.start, start)
            if overlap > 0:
                during[e.name] += overlap
        names = ", ".join(f"{n[:40]} {us:.0f}" for n, us in
                          sorted(during.items(), key=lambda kv: -kv[1])[:4])
        print(f"| {gap:,.0f} | {(start - t0) / 1e3:.2f} | {names} |")
    print()


def step_kind(is_decode: bool, decodes: int) -> str:
    return "decode path" if is_decode else ("prefill + decodes" if decodes else "prefill only")


class StepLog:
    """Wraps runner.launch: per step, when it was launched, its kind (the
    decode path, prefill + decodes, prefill only), its prefill tokens and
    its decodes (1-token chunks). On CUDA each launch also sits between two
    timing events on the launching stream: the second minus the first is
    the device time from the end of the work queued before the step to the
    end of the step's own, i.e. the step's kernels plus the device's idle
    time waiting for them to be launched."""

    def __init__(self, runner, device: str):
        self.steps, self.events, self.images = [], [], []
        timed = device.startswith("cuda")
        inner = runner.launch

        def logged(batch):
            prefill = sum(len(c.token_ids) for c in batch.chunks if len(c.token_ids) > 1)
            decodes = sum(1 for c in batch.chunks if len(c.token_ids) == 1)
            self.steps.append((time.perf_counter(), step_kind(batch.is_decode, decodes),
                               prefill, decodes))
            self.images.append((towers_started(batch), len(batch.encode_ahead)))
            if not timed:
                return inner(batch)
            before, after = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            before.record()
            launched = inner(batch)
            after.record()
            self.events.append((before, after))
            return launched

        runner.launch = logged

    def summary(self, end: float):
        """{kind: (steps, wall seconds, device seconds, prefill tokens,
        decodes)}; a step's wall time runs to the next launch (the last
        one's to `end`); device seconds are 0 without timing events."""
        if self.events:
            torch.cuda.synchronize()
        kinds = defaultdict(lambda: [0, 0.0, 0.0, 0, 0])
        for i, (start, kind, prefill, decodes) in enumerate(self.steps):
            until = self.steps[i + 1][0] if i + 1 < len(self.steps) else end
            row = kinds[kind]
            row[0] += 1
            row[1] += until - start
            if self.events:
                before, after = self.events[i]
                row[2] += before.elapsed_time(after) / 1e3
            row[3] += prefill
            row[4] += decodes
        return dict(kinds)

    def device_ms(self):
        """Each step's device milliseconds (as in summary), in launch order."""
        torch.cuda.synchronize()
        return [before.elapsed_time(after) for before, after in self.events]

    def print_distribution(self, slowest: int = 10) -> None:
        """Per step kind, the device time's percentiles (what an inter-token
        latency p99 is made of), then the slowest steps with what they held:
        prefill tokens, decodes, images whose tower ran in the step, images
        encoded ahead in it."""
        if not self.events:
            return
        times = self.device_ms()
        by_kind = defaultdict(list)
        for (_, kind, _, _), ms in zip(self.steps, times):
            by_kind[kind].append(ms)
        print("| step kind | steps | device ms p50 | p90 | p99 | max |")
        print("|---|---|---|---|---|---|")
        for kind, values in sorted(by_kind.items()):
            p50, p90, p99 = (percentile(values, q) for q in (50, 90, 99))
            print(f"| {kind} | {len(values)} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {max(values):.1f} |")
        print("\n| step | kind | device ms | prefill tokens | decodes | towers run | encoded ahead |")
        print("|---|---|---|---|---|---|---|")
        order = sorted(range(len(times)), key=lambda i: -times[i])[:slowest]
        for i in order:
            _, kind, prefill, decodes = self.steps[i]
            towers, ahead = self.images[i]
            print(f"| {i} | {kind} | {times[i]:.1f} | {prefill} | {decodes} | {towers} | {ahead} |")
        print()


def towers_started(batch) -> int:
    """Images whose first placeholder token is in one of the batch's chunks
    (their tower runs in the step unless the encoder cache holds them)."""
    return sum(1 for c in batch.chunks for item in c.mm_items
               if c.start_pos <= item.offset < c.start_pos + len(c.token_ids))


def percentile(values, q: float) -> float:
    """The q-th percentile by the nearest rank: the smallest value that at
    least q% of the values do not exceed."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class SyncSites:
    """Counts torch's synchronizing CUDA operations (sync debug mode "warn")
    by their innermost pyvlm call sites while active."""

    def __init__(self):
        self.sites = defaultdict(int)

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(*exc)

    def _record(self, message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/pyvlm/" in f.filename]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                           for f in reversed(frames[-3:]))
        self.sites[where or f"{Path(filename).name}:{lineno}"] += 1

    def print(self) -> None:
        total = sum(self.sites.values())
        print(f"synchronizing operations (torch's sync debug mode): {total}\n")
        if total:
            print("| calls | where (innermost pyvlm frames first) |")
            print("|---|---|")
            for where, calls in sorted(self.sites.items(), key=lambda kv: -kv[1]):
                print(f"| {calls} | {where} |")
            print()


def profile_throughput(engine, runner, args, roofline) -> None:
    """N image requests at once, profiled whole: wall time against the
    device's busy time and the workload floor, the kernels by time, and
    the steps by kind (decode path, prefill + decodes, prefill only)."""
    from benchmarks.load.images import distinct_pictures
    from benchmarks.load.serving_phases import image_size_for

    n = args.throughput
    images = distinct_pictures(2 * n, image_size_for(args.model), args.photos)
    params = {"max_new_tokens": args.output_len, "ignore_eos": True, "temperature": 0.0}

    def chats(pictures):
        return [[{"role": "user", "content": [{"type": "image", "image": image},
                                              {"type": "text", "text": "Describe this image."}]}]
                for image in pictures]

    engine.generate(messages=chats(images[:n]), sampling_params=[params] * n)  # warm-up
    engine.flush_cache()
    log = StepLog(runner, args.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    syncs = SyncSites() if args.sync_debug and args.device.startswith("cuda") else None
    with torch.profiler.profile(activities=activities) as prof:
        with syncs or contextlib.nullcontext():
            start = time.perf_counter()
            outs = engine.generate(messages=chats(images[n:]), sampling_params=[params] * n)
            wall = time.perf_counter() - start
    prompt_tokens = sum(o["meta_info"]["prompt_tokens"] for o in outs) / n
    output_tokens = sum(len(o["output_ids"]) for o in outs)
    rows = kernel_rows(prof, args.device)
    busy = sum(us for _, us, _ in rows) / 1e6
    print(f"\n### throughput: {n} requests with distinct images, {args.output_len} tokens each, "
          f"{args.max_running} running at most ({prompt_tokens:.0f} prompt tokens each)\n")
    print(f"wall {wall:.2f} s under the profiler = {output_tokens / wall:,.0f} output tok/s; "
          f"device kernels {busy:.2f} s ({busy / wall:.0%} of the wall)\n")
    print("| step kind | steps | wall s | wall ms per step | device ms per step | prefill tokens "
          "| decodes |")
    print("|---|---|---|---|---|---|---|")
    for kind, (count, seconds, on_device, prefill, decodes) in sorted(
            log.summary(start + wall).items()):
        device_ms = f"{on_device / count * 1e3:.1f}" if on_device else "n/a"
        print(f"| {kind} | {count} | {seconds:.2f} | {seconds / count * 1e3:.1f} | {device_ms} | "
              f"{prefill:,} | {decodes:,} |")
    print("\n(device ms: from the end of the work queued before the step to the end of its own)\n")
    log.print_distribution()
    print_rows(rows, args.top, 1, "kernel (whole run)")
    if syncs is not None:
        print()
        syncs.print()


def main(argv=None):
    args = parse_args(argv)
    from benchmarks.offline.random_models import write_checkpoint_metadata

    batches = [int(b) for b in args.batches.split(",") if b]
    config = config_for(args.model)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    rates = measure_rates(args.device)
    roofline = Roofline(config_cost(config, dtype), rates)
    print(f"## {args.model} decode profile · {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}"
          f" · copy {rates.copy_bytes_per_s / 1e12:.2f} TB/s")
    with tempfile.TemporaryDirectory(prefix="pyvlm-profile-") as scratch:
        folder = Path(scratch)
        write_checkpoint_metadata(folder, config)
        engine = engine_for(folder, args, dtype, max(batches, default=1))
        try:
            runner = engine.state.runner
            for batch in batches:
                profile_batch(engine, runner, batch, args, roofline)
            if args.ttft:
                profile_ttft(engine, args)
            if args.throughput:
                profile_throughput(engine, runner, args, roofline)
        finally:
            engine.shutdown()
    os._exit(0)  # the profiler's threads may linger


if __name__ == "__main__":
    main()
