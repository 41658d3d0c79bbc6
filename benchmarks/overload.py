"""Overload: the server at 10x its sustainable rate, through the real server.

First the sustainable rate is measured (closed loop: --concurrency clients,
default --max-running-requests, sending the same short chat back to back,
half of them streamed, fixed output length); then requests arrive open-loop
(Poisson) at --factor times that rate for --seconds. Throughout, a separate
process probes /health every 100 ms, and the server's resident memory is
sampled. The sustainable phase is the baseline the overload is compared with.

Checks: every /health probe answered 200, and at most --max-slow-fraction of
them slower than --health-limit-ms (slowest reported); every admitted request
ended complete (whole answer, or stream ending in [DONE]); every refusal a
429 with Retry-After; no 5xx, timeout or connection error; the overload was
real (some 429s); peak memory during the overload within --max-rss-growth of
the sustainable phase's peak; afterwards idle with no pages held outside the
prefix cache. Exit status 1 if a check fails.

  python benchmarks/overload.py --seconds 60                     # demo model, CPU
  python benchmarks/overload.py --model DIR --seconds 15
  python benchmarks/overload.py --serve-random llava-onevision-7b --device cuda
"""

import argparse
import asyncio
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.load import client, server as srv  # noqa: E402
from benchmarks.load.client import Server  # noqa: E402
from benchmarks.load.images import generated_uris  # noqa: E402
from benchmarks.load.report import Check, checks_table, markdown, mib, ms, percentile  # noqa: E402
from benchmarks.load.warmup import (fill_kv_pool, pool_flags,  # noqa: E402
                                    touch_every_image)
from benchmarks.load.workload import Outcome, Workload, chat_body, send  # noqa: E402

FAILURES = ("server_error", "stream_error", "incomplete", "timeout", "connection_error",
            "client_error")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    srv.add_target_arguments(p, extra=[
        (("--max-running-requests",), dict(type=int, default=8)),
        (("--max-queued-requests",), dict(type=int, default=8))])
    load = p.add_argument_group("load")
    load.add_argument("--measure-s", type=float, default=20.0, help="sustainable-rate phase")
    load.add_argument("--seconds", type=float, default=60.0, help="overload phase")
    load.add_argument("--factor", type=float, default=10.0)
    load.add_argument("--concurrency", type=int, default=None,
                      help="closed-loop clients (default: --max-running-requests)")
    load.add_argument("--max-tokens", type=int, default=16)
    load.add_argument("--image-fraction", type=float, default=0.0,
                      help="share of requests with one small generated image")
    load.add_argument("--max-outstanding", type=int, default=4096,
                      help="client-side bound on requests in flight (beyond: not sent, counted)")
    load.add_argument("--timeout", type=float, default=300.0, help="per request")
    load.add_argument("--seed", type=int, default=None, help="default: fresh each run")
    checks = p.add_argument_group("checks")
    checks.add_argument("--health-limit-ms", type=float, default=100.0)
    checks.add_argument("--max-slow-fraction", type=float, default=0.01,
                        help="share of /health probes allowed over the limit")
    checks.add_argument("--max-median-ms", type=float, default=None,
                        help="also require the median /health under this (default: no check)")
    checks.add_argument("--max-rss-growth", type=float, default=0.10)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--log-dir", type=Path, default=None)
    args = p.parse_args(argv)
    args.concurrency = args.concurrency or args.max_running_requests
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    return args


def open_server(args) -> srv.ServerProcess:
    if args.base_url:
        return srv.ServerProcess(Server.from_url(args.base_url), pid=args.server_pid)
    flags = ["--device", args.device, "--enable-metrics",
             "--max-running-requests", str(args.max_running_requests),
             "--max-queued-requests", str(args.max_queued_requests), *shlex.split(args.server_args)]
    flags += pool_flags(args.device, args.max_total_tokens, flags)
    command = srv.server_command(srv.free_port(), args.model, args.serve_random, flags)
    print("server:", shlex.join(command), flush=True)
    return srv.start_server(command, args.log_dir / "server.log", args.ready_timeout)


# ---- the request and the two phases -------------------------------------

def the_request(work: Workload, rng: random.Random, args) -> dict:
    """The same short chat every time (fixed output length), half streamed."""
    num_images = 1 if work.images and rng.random() < args.image_fraction else 0
    return chat_body(work, rng, num_images, rng.random() < 0.5, max_tokens=args.max_tokens,
                     ignore_eos=True, temperature=0.0)


async def overload_request(work, rng, args) -> Outcome:
    return await send("overload", work, "/v1/chat/completions", the_request(work, rng, args))


async def closed_loop(work, args, rng, deadline: float) -> List[Outcome]:
    outcomes = []

    async def one_client(crng):
        while time.perf_counter() < deadline:
            outcomes.append(await overload_request(work, crng, args))

    await asyncio.gather(*(one_client(random.Random(rng.randrange(2**31)))
                           for _ in range(args.concurrency)))
    return outcomes


def steady_rate(outcomes: List[Outcome], deadline: float) -> float:
    """Completions per second of a closed loop in its steady state: from the
    first completion to the deadline (the ramp-up before it and the drain
    after the deadline left out, both of which would bias the rate low)."""
    ends = sorted(o.end for o in outcomes if o.label == "ok" and o.end <= deadline)
    if len(ends) < 2:
        raise RuntimeError(f"{len(ends)} requests completed in the measuring phase; "
                           "give a longer --measure-s")
    return (len(ends) - 1) / (deadline - ends[0])


async def open_loop(work, args, rng, rate: float, seconds: float, counts: dict) -> List[Outcome]:
    """Poisson arrivals at `rate` for `seconds`, each sent at once whatever
    is in flight (up to --max-outstanding); waits for all to end."""
    outcomes, tasks = [], set()
    start = time.perf_counter()
    at = start
    while True:
        at += rng.expovariate(rate)
        if at > start + seconds:
            break
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        if len(tasks) >= args.max_outstanding:
            counts["not_sent"] += 1
            continue
        counts["sent"] += 1
        task = asyncio.ensure_future(overload_request(work, random.Random(rng.random()), args))
        task.add_done_callback(lambda t: (tasks.discard(t), outcomes.append(t.result())))
        tasks.add(task)
    counts["arrivals_s"] = time.perf_counter() - start
    await asyncio.gather(*list(tasks))
    return outcomes


# ---- probes and memory --------------------------------------------------

def start_probe(server: Server, seconds: float, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(srv.REPO))
    return subprocess.Popen([sys.executable, "-m", "benchmarks.load.probe", "--host", server.host,
                             "--port", str(server.port), "--seconds", str(seconds),
                             "--out", str(out)], cwd=srv.REPO, env=env)


def read_probes(path: Path) -> List[list]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def sample_rss(handle, samples: List, stop: asyncio.Event, interval: float = 0.5) -> None:
    while not stop.is_set():
        samples.append((time.monotonic(), handle.rss_bytes()))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


# ---- the run ------------------------------------------------------------

@dataclass
class Phase:
    """One phase's numbers (times are time.monotonic())."""

    name: str
    start: float
    end: float
    outcomes: Dict[str, int] = field(default_factory=dict)
    offered_rate: Optional[float] = None
    completed_rate: float = 0.0
    sent: int = 0
    sent_rate: float = 0.0  # achieved arrivals: below offered when the client cannot keep up
    not_sent: int = 0
    e2e_ms: str = "n/a"
    ttft_ms: str = "n/a"
    num_probes: int = 0
    num_probe_failures: int = 0
    num_probes_slow: int = 0
    health_ms: Dict[str, Optional[float]] = field(default_factory=dict)
    rss_peak: Optional[int] = None
    missing_retry_after: int = 0


def describe_phase(phase: Phase, outcomes: List[Outcome], probes, rss, limit_s: float) -> Phase:
    for o in outcomes:
        phase.outcomes[o.label] = phase.outcomes.get(o.label, 0) + 1
        phase.missing_retry_after += o.label == "refused" and o.retry_after is None
    ok = [o for o in outcomes if o.label == "ok"]
    phase.completed_rate = len(ok) / (phase.end - phase.start)
    phase.e2e_ms = ms([o.e2e for o in ok])
    phase.ttft_ms = ms([o.ttft for o in ok if o.ttft is not None])
    mine = [p for p in probes if phase.start <= p[0] < phase.end]
    latencies = [p[1] for p in mine if p[1] is not None and p[2] == 200]
    phase.num_probes = len(mine)
    phase.num_probe_failures = len(mine) - len(latencies)
    phase.num_probes_slow = sum(1 for x in latencies if x > limit_s)
    phase.health_ms = {q: None if not latencies else round(percentile(latencies, v) * 1e3, 1)
                       for q, v in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}
    phase.rss_peak = max((r for t, r in rss if phase.start <= t <= phase.end and r), default=None)
    return phase


@dataclass
class Summary:
    seed: int
    sustainable_rate: float = 0.0
    phases: List[dict] = field(default_factory=list)
    rss: Dict[str, Optional[int]] = field(default_factory=dict)
    stats_idle: dict = field(default_factory=dict)
    tracebacks: List[str] = field(default_factory=list)
    healthy_at_end: bool = False
    checks: List[dict] = field(default_factory=list)


async def warm_up(work: Workload, args, rng: random.Random) -> None:
    if args.device == "cpu":  # the KV pool's memory committed before RSS is compared
        await fill_kv_pool(work)
    await touch_every_image(work)
    for _ in range(args.concurrency):  # allocator, kernels
        await overload_request(work, rng, args)
    await srv.wait_idle(work.server)


async def two_phases(work: Workload, args, rng, summary: Summary) -> dict:
    """The closed-loop measurement, then the open loop at factor x its
    rate; the times, outcomes and arrival counts of both."""
    t1, deadline = time.monotonic(), time.perf_counter() + args.measure_s
    base = await closed_loop(work, args, rng, deadline)
    t2 = time.monotonic()
    rate = summary.sustainable_rate = steady_rate(base, deadline)
    print(f"sustainable: {rate:.2f} req/s; overload at {args.factor:g}x = "
          f"{rate * args.factor:.1f} req/s for {args.seconds:g} s", flush=True)
    counts = {"sent": 0, "not_sent": 0}
    over = await open_loop(work, args, rng, rate * args.factor, args.seconds, counts)
    return dict(t1=t1, t2=t2, t3=time.monotonic(), base=base, over=over, counts=counts, rate=rate)


async def run_phases(handle, args, summary: Summary, log_dir: Path) -> List[Phase]:
    rng = random.Random(args.seed)
    images = generated_uris(rng, 8) if args.image_fraction > 0 else []
    work = Workload(handle.server, images, max_tokens=args.max_tokens, timeout=args.timeout)
    await warm_up(work, args, rng)
    summary.rss["start"] = handle.rss_bytes()
    probe_file = log_dir / "probes.jsonl"
    probe = start_probe(handle.server, args.measure_s + args.seconds + args.timeout, probe_file)
    samples, stop = [], asyncio.Event()
    sampler = asyncio.ensure_future(sample_rss(handle, samples, stop))
    try:
        await asyncio.sleep(1.0)  # the prober is up
        run = await two_phases(work, args, rng, summary)
    finally:
        stop.set()
        await sampler
        probe.terminate()
        probe.wait(30)
    return describe_phases(run, read_probes(probe_file), samples, args)


def describe_phases(run: dict, probes, samples, args) -> List[Phase]:
    limit, counts = args.health_limit_ms / 1e3, run["counts"]
    first = describe_phase(Phase("sustainable (closed loop)", run["t1"], run["t2"]), run["base"],
                           probes, samples, limit)
    second = describe_phase(Phase(f"overload ({args.factor:g}x, open loop)", run["t2"],
                                  run["t3"]), run["over"], probes, samples, limit)
    first.sent = len(run["base"])
    second.offered_rate = run["rate"] * args.factor
    second.sent, second.not_sent = counts["sent"], counts["not_sent"]
    second.sent_rate = counts["sent"] / counts["arrivals_s"]
    return [first, second]


async def run_overload(args) -> Summary:
    args.log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pyvlm-overload-"))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    handle = await asyncio.get_running_loop().run_in_executor(None, open_server, args)
    summary = Summary(args.seed)
    try:
        phases = await run_phases(handle, args, summary, args.log_dir)
        summary.phases = [asdict(p) for p in phases]
        summary.stats_idle = await srv.wait_idle(handle.server)
        summary.rss["end"] = handle.rss_bytes()
        health = await client.request(handle.server, "GET", "/health", timeout=10)
        summary.healthy_at_end = health.status == 200 and handle.is_alive()
    finally:
        handle.stop()
    summary.tracebacks = handle.log_tracebacks()
    summary.checks = [asdict(c) for c in overload_checks(summary, args)]
    return summary


def overload_checks(s: Summary, args) -> List[Check]:
    base, over = (Phase(**p) for p in s.phases)
    limit, allowed = args.health_limit_ms, args.max_slow_fraction
    failures = {k: v for k, v in over.outcomes.items() if k in FAILURES}
    growth = None if not base.rss_peak or not over.rss_peak else over.rss_peak / base.rss_peak - 1
    return [
        Check("/health: every probe answered 200", over.num_probe_failures == 0,
              f"{over.num_probe_failures} of {over.num_probes} failed"),
        Check(f"/health: <= {allowed:.1%} of probes over {limit:g} ms",
              over.num_probes_slow <= allowed * over.num_probes,
              f"{over.num_probes_slow} of {over.num_probes}; p99 {over.health_ms['p99']} ms, "
              f"max {over.health_ms['max']} ms"),
        *([Check(f"/health: median under {args.max_median_ms:g} ms",
                 over.health_ms["p50"] is not None and over.health_ms["p50"] < args.max_median_ms,
                 f"{over.health_ms['p50']} ms")] if args.max_median_ms else []),
        Check("admitted requests all complete; no 5xx, timeout, connection error",
              not failures and not any(k in FAILURES for k in base.outcomes),
              json.dumps(failures) if failures else f"{over.outcomes.get('ok', 0)} ok"),
        Check("every refusal is a 429 with Retry-After", over.missing_retry_after == 0,
              f"{over.outcomes.get('refused', 0)} refused, {over.missing_retry_after} without"),
        Check("the overload was real (some 429s)", over.outcomes.get("refused", 0) > 0,
              f"{over.outcomes.get('refused', 0)} of {over.sent}"),
        Check(f"peak RSS within {args.max_rss_growth:.0%} of the sustainable phase's",
              growth is not None and growth <= args.max_rss_growth,
              "unknown" if growth is None else
              f"{mib(base.rss_peak)} -> {mib(over.rss_peak)} ({growth:+.1%})"),
        Check("idle after: no pages held outside the prefix cache",
              s.stats_idle.get("num_used_pages") == 0,
              f"num_used_pages {s.stats_idle.get('num_used_pages')}"),
        Check("no traceback in the server log", not s.tracebacks,
              "; ".join(s.tracebacks[:3]) or "0"),
        Check("healthy at the end", s.healthy_at_end, "/health 200" if s.healthy_at_end else "no"),
    ]


PHASE_COLUMNS = ["phase", "s", "offered (sent) req/s", "sent", "ok", "429", "failed", "ok req/s",
                 "TTFT ms p50/p90/p99", "e2e ms p50/p90/p99", "/health probes",
                 "/health ms p50/p99/max", "probes > limit", "peak RSS"]


def phase_row(p: Phase) -> list:
    offered = "closed" if p.offered_rate is None else f"{p.offered_rate:.1f} ({p.sent_rate:.1f})"
    failed = sum(v for k, v in p.outcomes.items() if k in FAILURES)
    health = f"{p.health_ms['p50']} / {p.health_ms['p99']} / {p.health_ms['max']}"
    return [p.name, f"{p.end - p.start:.1f}", offered, p.sent, p.outcomes.get("ok", 0),
            p.outcomes.get("refused", 0), failed, f"{p.completed_rate:.2f}", p.ttft_ms, p.e2e_ms,
            p.num_probes, health, p.num_probes_slow, mib(p.rss_peak)]


def phase_table(s: Summary) -> str:
    return markdown(PHASE_COLUMNS, [phase_row(Phase(**p)) for p in s.phases])


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(run_overload(args))
    print("\n" + phase_table(summary) + "\n")
    print(checks_table([Check(**c) for c in summary.checks]))
    if args.json_out:
        args.json_out.write_text(json.dumps(asdict(summary), indent=1))
    return 0 if all(c["passed"] for c in summary.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
