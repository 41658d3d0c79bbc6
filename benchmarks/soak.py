"""Soak: a mixed load through the real server for a given time, then the
leak checks.

Closed-loop clients send text and image chats, /v1/completions and
/generate (whole and streamed), drop streams at random points, and
interleave malformed requests (benchmarks/load/workload.py). After a
warm-up that fills the steady-state caches (the KV pool on CPU, whose
pages the OS commits on first use; the encoder cache), the load runs until
the time is up, then the script waits until the server is idle and checks:
no 5xx (statuses or stream error events), every outcome as its kind
expects, no pages held beyond the prefix cache's (engine_stats
num_used_pages == 0, and 0 pages after /flush_cache), resident memory at
idle grown < 5% since the idle point after warm-up, no traceback in the
server log, the server still healthy. Exit status 1 if a check fails.

  python benchmarks/soak.py --seconds 600                       # demo model, CPU
  python benchmarks/soak.py --model DIR --device cpu --seconds 60
  python benchmarks/soak.py --serve-random llava-onevision-7b --device cuda --seconds 600
  python benchmarks/soak.py --base-url http://127.0.0.1:30000 --server-pid PID  # running server
"""

import argparse
import asyncio
import json
import random
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.load import client, server as srv  # noqa: E402
from benchmarks.load.client import Server  # noqa: E402
from benchmarks.load.images import generated_uris, photo_uris  # noqa: E402
from benchmarks.load.warmup import (fill_kv_pool, pool_flags,  # noqa: E402
                                    touch_every_image)
from benchmarks.load.report import (Check, checks_table, markdown, mib, outcome_table,  # noqa: E402
                                    window_table)
from benchmarks.load.workload import KINDS, Kind, KindDeck, Outcome, Workload, send  # noqa: E402

MAX_RSS_GROWTH = 0.05
WARMUP = Kind("warmup", 0, send)  # warm-up requests must simply succeed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    srv.add_target_arguments(p)
    load = p.add_argument_group("load")
    load.add_argument("--seconds", type=float, default=600.0,
                      help="load time, the warm-up's mixed load included (the cache fills not)")
    load.add_argument("--warmup-s", type=float, default=None, help="default: 10%% of it, <= 60")
    load.add_argument("--concurrency", type=int, default=8)
    load.add_argument("--max-tokens", type=int, default=16)
    load.add_argument("--num-generated-images", type=int, default=12)
    load.add_argument("--photos", type=Path, default=None,
                      help="folder of photos to send (default: /work/shared/data/images if found)")
    load.add_argument("--timeout", type=float, default=300.0, help="per request")
    load.add_argument("--window-s", type=float, default=60.0)
    load.add_argument("--seed", type=int, default=None, help="default: fresh each run")
    p.add_argument("--max-rss-growth", type=float, default=MAX_RSS_GROWTH,
                   help="idle RSS growth allowed after the warm-up (default %(default)s)")
    p.add_argument("--json-out", type=Path, default=None, help="write the summary here")
    p.add_argument("--log-dir", type=Path, default=None, help="where the server log goes")
    args = p.parse_args(argv)
    if args.warmup_s is None:
        args.warmup_s = min(60.0, args.seconds / 10)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    return args


# ---- the server ---------------------------------------------------------

def server_flags(args) -> List[str]:
    flags = ["--device", args.device, "--enable-metrics", *shlex.split(args.server_args)]
    return flags + pool_flags(args.device, args.max_total_tokens, flags)


def open_server(args) -> srv.ServerProcess:
    if args.base_url:
        return srv.ServerProcess(Server.from_url(args.base_url), pid=args.server_pid)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pyvlm-soak-"))
    command = srv.server_command(srv.free_port(), args.model, args.serve_random, server_flags(args))
    print("server:", shlex.join(command), flush=True)
    return srv.start_server(command, log_dir / "server.log", args.ready_timeout)


# ---- load ---------------------------------------------------------------

async def closed_loop(work: Workload, deadline: float, concurrency: int,
                      rng: random.Random) -> List[Outcome]:
    """`concurrency` clients, each sending the next kind as soon as its last
    request ended, until the deadline."""
    outcomes: List[Outcome] = []

    async def one_client(seed: int):
        crng = random.Random(seed)
        deck = KindDeck(crng)
        while time.perf_counter() < deadline:
            outcomes.append(await deck.draw().send(work, crng))

    await asyncio.gather(*(one_client(rng.randrange(2**31)) for _ in range(concurrency)))
    return outcomes


async def sample_rss(handle: srv.ServerProcess, samples: List, stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append((time.perf_counter(), handle.rss_bytes()))
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except asyncio.TimeoutError:
            pass


# ---- the run ------------------------------------------------------------

@dataclass
class Summary:
    seed: int
    seconds: float
    max_rss_growth: float = MAX_RSS_GROWTH
    outcomes: Dict[str, Dict[str, int]] = field(default_factory=dict)
    unexpected: Dict[str, int] = field(default_factory=dict)
    unexpected_examples: List[str] = field(default_factory=list)
    num_5xx: int = 0
    rss: Dict[str, Optional[int]] = field(default_factory=dict)
    stats_idle: dict = field(default_factory=dict)
    stats_flushed: dict = field(default_factory=dict)
    tracebacks: List[str] = field(default_factory=list)
    healthy_at_end: bool = False
    checks: List[dict] = field(default_factory=list)


def count_outcomes(outcomes: List[Outcome], summary: Summary) -> None:
    for o in outcomes:
        summary.outcomes.setdefault(o.kind, {}).setdefault(o.label, 0)
        summary.outcomes[o.kind][o.label] += 1
        summary.num_5xx += o.label == "server_error"
        if not KINDS.get(o.kind, WARMUP).is_expected(o):
            summary.unexpected[o.kind] = summary.unexpected.get(o.kind, 0) + 1
            if len(summary.unexpected_examples) < 10:
                summary.unexpected_examples.append(f"{o.kind}: {o.label} {o.status} {o.detail}")


async def warm_up(work: Workload, args, rng) -> List[Outcome]:
    outcomes = await fill_kv_pool(work) if args.device == "cpu" else []
    outcomes += await touch_every_image(work)
    outcomes += await closed_loop(work, time.perf_counter() + args.warmup_s, args.concurrency, rng)
    return outcomes


async def run_soak(args) -> Summary:
    rng = random.Random(args.seed)
    handle = await asyncio.get_running_loop().run_in_executor(None, open_server, args)
    summary = Summary(args.seed, args.seconds, args.max_rss_growth)
    try:
        await soak_on(handle, args, rng, summary)
    finally:
        handle.stop()
    summary.tracebacks = handle.log_tracebacks()
    summary.checks = [asdict(c) for c in soak_checks(summary)]
    return summary


async def soak_on(handle, args, rng, summary: Summary) -> None:
    images = photo_uris(args.photos) + generated_uris(rng, args.num_generated_images)
    print(f"{len(images) - args.num_generated_images} photos, "
          f"{args.num_generated_images} generated images", flush=True)
    work = Workload(handle.server, images, max_tokens=args.max_tokens, timeout=args.timeout)
    summary.rss["start"] = handle.rss_bytes()
    warm = await warm_up(work, args, rng)
    await srv.wait_idle(handle.server)
    summary.rss["after_warmup"] = handle.rss_bytes()
    samples, stop = [], asyncio.Event()
    sampler = asyncio.ensure_future(sample_rss(handle, samples, stop))
    t_load = time.perf_counter()
    load = await closed_loop(work, t_load + args.seconds - args.warmup_s, args.concurrency, rng)
    stop.set()
    await sampler
    summary.stats_idle = await srv.wait_idle(handle.server)
    summary.rss["end"] = handle.rss_bytes()
    summary.rss["peak_under_load"] = max((r for _, r in samples if r), default=None)
    await srv.flush_cache(handle.server)
    summary.stats_flushed = await srv.engine_stats(handle.server)
    health = await client.request(handle.server, "GET", "/health", timeout=10)
    summary.healthy_at_end = health.status == 200 and handle.is_alive()
    count_outcomes(warm + load, summary)
    print_tables(warm + load, load, t_load, samples, summary, args)


def soak_checks(s: Summary) -> List[Check]:
    warm, end = s.rss.get("after_warmup"), s.rss.get("end")
    growth = None if not warm or not end else end / warm - 1
    missing = [k for k in KINDS if not s.outcomes.get(k)]
    return [
        Check("no 5xx", s.num_5xx == 0, str(s.num_5xx)),
        Check("every outcome expected by its kind", not s.unexpected,
              json.dumps(s.unexpected) if s.unexpected else "0"),
        Check("every kind sent", not missing, ", ".join(missing) or "all"),
        Check("idle: no pages held outside the prefix cache",
              s.stats_idle.get("num_used_pages") == 0,
              f"num_used_pages {s.stats_idle.get('num_used_pages')}, "
              f"num_cached_pages {s.stats_idle.get('num_cached_pages')}"),
        Check("after /flush_cache: no pages at all",
              s.stats_flushed.get("num_used_pages") == 0
              and s.stats_flushed.get("num_cached_pages") == 0,
              f"used {s.stats_flushed.get('num_used_pages')}, "
              f"cached {s.stats_flushed.get('num_cached_pages')}"),
        Check(f"idle RSS growth after warm-up < {s.max_rss_growth:.0%}",
              growth is not None and growth < s.max_rss_growth,
              "unknown" if growth is None else f"{mib(warm)} -> {mib(end)} ({growth:+.1%})"),
        Check("no traceback in the server log", not s.tracebacks,
              "; ".join(s.tracebacks[:3]) or "0"),
        Check("healthy at the end", s.healthy_at_end, "/health 200" if s.healthy_at_end else "no"),
    ]


def print_tables(all_outcomes, load, t_load, samples, summary: Summary, args) -> None:
    print(f"\nseed {args.seed}; {len(all_outcomes)} requests "
          f"({len(load)} after warm-up), concurrency {args.concurrency}\n")
    print(outcome_table(all_outcomes, summary.unexpected))
    print(f"\nLatency of completed requests after warm-up, by {args.window_s:.0f} s window "
          "(TTFT: streams only)\n")
    print(window_table(load, t_load, args.window_s, rss_by_window(samples, t_load, args.window_s)))
    print("\n" + markdown(["RSS start", "after warm-up (idle)", "peak under load", "end (idle)"],
                          [[mib(summary.rss.get(k)) for k in
                            ("start", "after_warmup", "peak_under_load", "end")]]))
    for example in summary.unexpected_examples:
        print("unexpected:", example)


def rss_by_window(samples, t0: float, window_s: float) -> Dict[int, str]:
    peaks: Dict[int, int] = {}
    for at, rss in samples:
        if rss:
            index = int((at - t0) // window_s)
            peaks[index] = max(peaks.get(index, 0), rss)
    return {i: mib(v) for i, v in peaks.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(run_soak(args))
    print("\n" + checks_table([Check(**c) for c in summary.checks]))
    if args.json_out:
        args.json_out.write_text(json.dumps(asdict(summary), indent=1))
    return 0 if all(c["passed"] for c in summary.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
