"""Scheduling on a modeled GPU: the real engine (request builder, scheduler,
overlap) over a narrow checkpoint of a real shape (its tokenizer, image
tokens and preprocessing), its runner replaced by a device model that
takes the time a step of that composition takes on the card, without
computing anything. Launch returns at once and the step's wait sleeps
until the modeled device is done, so overlap scheduling behaves as on a
GPU. It measures what scheduling decides: inter-token latency, TTFT and
throughput at 64 concurrent streams with distinct images.

  python benchmarks/simulate_steps.py [--model qwen2-vl-7b-narrow] [--num-requests 256]
  python benchmarks/simulate_steps.py --device cuda --model qwen2-vl-7b --policy pyvlm
  python benchmarks/simulate_steps.py --device cuda --model qwen2-vl-7b --policy baseline

With --device cuda the runner is the real one (random weights of the real
shape, `--load-format dummy`, the engine on a thread of this process; one
policy per process, as an engine's memory stays with the process), so the
same workload and both policies measure what the card does; the
slowest steps are listed with what they ran, to say what the p99 is made of.

With --http the device (modeled or real) also serves the pyvlm policy's
workload through `python -m pyvlm`'s server (HTTP, the engine in its own
process, the client in a third: benchmarks/load/serving_phases.py's
throughput phase), so the inter-token tail that the front adds shows beside
the engine's own; --engine-process process puts the engine API's engine in
its own process too (the server's layout without HTTP). An engine process
appends its steps to a file, read back for the tables.

  python benchmarks/simulate_steps.py --device cuda --model qwen2-vl-7b --policy pyvlm \
      --engine-process process --http

Step time = decode_ms + decode_ms_per_request x chunks + prefill_ms_per_token x
prompt tokens + tower_ms_per_image_token x placeholder tokens of the images the
step encodes first (an encoder-cache hit costs nothing); with --cost-model
roofline the first and third terms become max(decode_ms, prefill_ms_per_token
x the step's rows): a prompt chunk of a few hundred rows then rides along the
decode step's weight reads, as on a GPU, where a linear layer reads its
weights once for every row of the step. The defaults are
Qwen2-VL-7B on an H100 (benchmarks/RESULTS.md: a 64-request decode step of
~6.3 ms, prefill at ~700 TFLOP/s, the tower's 1,564 rows of a 644x476 photo
in ~4.7 ms). The baseline, run in the same process, charges a chunk only
its own tokens when it starts an image (the policy before
pyvlm/scheduling/encoder_budget.py); the floor of the inter-token time is
the modeled decode step of all the streams.
"""

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, TextIO
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]

from benchmarks.load.report import markdown  # noqa: E402
from benchmarks.load.serve_random import SHAPES, config_for  # noqa: E402
from pyvlm.heap import tune_for_serving  # noqa: E402
from pyvlm.scheduling.types import ForwardBatch, SampleResult  # noqa: E402

FIRST_TOKEN, NUM_TOKENS = 1000, 100  # ordinary words of every shape's vocabulary
POLICIES = {"both": ("tokens only (before)", "pyvlm"), "baseline": ("tokens only (before)",),
            "pyvlm": ("pyvlm",)}


@dataclass(frozen=True)
class StepCosts:
    """The device model's costs, in milliseconds."""

    decode_ms: float = 5.0
    decode_ms_per_request: float = 0.02
    prefill_ms_per_token: float = 0.02
    tower_ms_per_image_token: float = 0.012
    # "additive": a step's prompt tokens cost on top of its weight reads;
    # "roofline": its linear layers take the longer of reading the weights
    # (decode_ms) and computing every row (prefill_ms_per_token x rows), so
    # a small chunk rides along a decode step's weight reads (Sarathi-Serve).
    model: str = "additive"

    def of(self, num_chunks: int, decodes: int, prefill: int, image_tokens: int) -> float:
        """The time of a step of num_chunks chunks (decodes of them decode
        tokens), prefill prompt tokens and image_tokens placeholder tokens
        of images it encodes first."""
        if self.model == "roofline":
            linear = max(self.decode_ms, self.prefill_ms_per_token * (prefill + decodes))
        elif self.model == "additive":
            linear = self.decode_ms + self.prefill_ms_per_token * prefill
        else:
            raise ValueError(f"unknown cost model {self.model!r}")
        return (linear + self.decode_ms_per_request * num_chunks
                + self.tower_ms_per_image_token * image_tokens)


@dataclass
class StepTrace:
    """Per step: when it was launched (perf_counter), its decodes, prefill
    tokens and the tokens of the images it encodes first (its chunks' and
    those it encodes ahead for waiting requests)."""

    steps: List[tuple] = field(default_factory=list)
    encoded: set = field(default_factory=set)  # image hashes already encoded
    path: Optional[str] = None  # each step also appended there, a line each (engine processes)
    _sink: Optional[TextIO] = field(default=None, repr=False)

    def record(self, batch: ForwardBatch) -> tuple:
        """Adds the step; returns it: (launch time, decodes, prefill
        tokens, new image tokens)."""
        decodes = sum(1 for c in batch.chunks if c.num_new_tokens == 1 and c.step > 0)
        prefill = sum(c.num_new_tokens for c in batch.chunks) - decodes
        items = [item for c in batch.chunks for item in c.mm_items] + list(batch.encode_ahead)
        new_images = {item.hash: item.length for item in items if item.hash not in self.encoded}
        self.encoded.update(new_images)
        step = (time.perf_counter(), decodes, prefill, sum(new_images.values()))
        self.steps.append(step)
        if self.path is not None:
            if self._sink is None:
                self._sink = open(self.path, "a", buffering=1)  # a line reaches the file whole
            self._sink.write(" ".join(map(str, step)) + "\n")
        return step

    @staticmethod
    def read(path: str) -> List[tuple]:
        """The steps another process appended to path (perf_counter is
        CLOCK_MONOTONIC: one clock for every process of the host)."""
        if not os.path.exists(path):
            return []
        with open(path) as source:
            return [(float(t), *map(int, rest)) for t, *rest in
                    (line.split() for line in source if line.strip())]

    def walls(self, end: float) -> List[tuple]:
        """(wall ms to the next launch, decodes, prefill tokens, new image tokens) per step."""
        launches = [s[0] for s in self.steps[1:]] + [end]
        return [((until - start) * 1e3, *rest) for (start, *rest), until in zip(self.steps, launches)]


@dataclass
class ModeledDevice:
    """One device: steps run one after another, each for its modeled time;
    its trace records them (and which images are encoded already)."""

    costs: StepCosts
    free_at: float = 0.0
    trace: StepTrace = field(default_factory=StepTrace)

    def run(self, batch: ForwardBatch) -> float:
        """Records and queues the step; returns when (perf_counter) it ends."""
        _, decodes, prefill, image_tokens = self.trace.record(batch)
        cost = self.costs.of(len(batch.chunks), decodes, prefill, image_tokens)
        self.free_at = max(time.perf_counter(), self.free_at) + cost / 1e3
        return self.free_at


class ModeledRunner:
    """A runner whose steps take the device model's time and compute
    nothing: every sampled chunk gets FIRST_TOKEN + its step % NUM_TOKENS;
    everything else (the pool geometry) is the real runner's."""

    def __init__(self, real, device: ModeledDevice):
        self.real, self.device = real, device

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def launch(self, batch: ForwardBatch) -> "Launched":
        done = self.device.run(batch)
        return Launched(done, [SampleResult(FIRST_TOKEN + c.step % NUM_TOKENS) if c.sample
                               else None for c in batch.chunks])

    def forward(self, batch: ForwardBatch):
        return self.launch(batch).wait()

    def free_encoder_cache(self) -> None:
        pass


class TracedRunner:
    """The real runner, its steps recorded in a StepTrace."""

    def __init__(self, real, trace: StepTrace):
        self.real, self.trace = real, trace

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def launch(self, batch: ForwardBatch):
        self.trace.record(batch)
        return self.real.launch(batch)

    def forward(self, batch: ForwardBatch):
        return self.launch(batch).wait()


class Launched:
    def __init__(self, done: float, results):
        self._done, self._results = done, results

    def wait(self):
        delay = self._done - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return self._results


@contextlib.contextmanager
def wrapped_runners(wrap, prepare_in_step: bool):
    """Engines built inside get wrap(their runner); prepare_in_step: images
    are prepared in the step whatever the device (as on a GPU, where the
    device model makes them free)."""
    from pyvlm.entrypoints import startup

    in_step = mock.patch.object(startup, "prepares_images_in_step", lambda device: True) \
        if prepare_in_step else contextlib.nullcontext()
    with mock.patch.object(startup, "build_runner", _wrapping(startup.build_runner, wrap)), \
            in_step:
        yield


@contextlib.contextmanager
def tokens_only_charging():
    """The baseline policy: a chunk that starts an image pays only its own
    tokens (no charge for the tower's work, never cut for it)."""
    from pyvlm.scheduling import scheduler

    with mock.patch.object(scheduler, "fit_chunk",
                           lambda items, start, n, left, can_cut, must_run: (n, 0)):
        yield


COSTS_ENV = "PYVLM_SIM_STEP_COSTS"  # a modeled engine process's StepCosts, as JSON
TRACE_ENV = "PYVLM_SIM_STEP_TRACE"  # where an engine process appends its steps


def run_wrapped_engine_core(*args, **kwargs):
    """The engine process's entry point with its runner wrapped: a
    ModeledRunner of the costs in COSTS_ENV, else a TracedRunner; either
    appends its steps to TRACE_ENV's file (spawn imports this module by
    name in the child, then calls this)."""
    from pyvlm.entrypoints import startup
    from pyvlm.entrypoints.engine_core import run_engine_core

    trace = StepTrace(path=os.environ[TRACE_ENV])
    if os.environ.get(COSTS_ENV):
        device = ModeledDevice(StepCosts(**json.loads(os.environ[COSTS_ENV])), trace=trace)
        wrap = lambda real: ModeledRunner(real, device)  # noqa: E731
        startup.prepares_images_in_step = lambda device: True
    else:
        wrap = lambda real: TracedRunner(real, trace)  # noqa: E731
    startup.build_runner = _wrapping(startup.build_runner, wrap)
    return run_engine_core(*args, **kwargs)


@contextlib.contextmanager
def wrapped_engine_processes(trace_path: str, costs: Optional[StepCosts]):
    """Engine processes started inside run run_wrapped_engine_core; with
    costs (the modeled device) the front also leaves images to the step."""
    from pyvlm.entrypoints import core_client, startup

    env = {TRACE_ENV: trace_path, COSTS_ENV: json.dumps(vars(costs)) if costs else ""}
    in_step = mock.patch.object(startup, "prepares_images_in_step", lambda device: True) \
        if costs else contextlib.nullcontext()
    with mock.patch.dict(os.environ, env), in_step, \
            mock.patch.object(core_client, "run_engine_core", run_wrapped_engine_core):
        yield


def _wrapping(build_runner, wrap):
    def built(*args, **kwargs):
        model, runner = build_runner(*args, **kwargs)
        return model, wrap(runner)

    return built


def modeled_costs(args) -> Optional[StepCosts]:
    """The device model's costs (None on a real device)."""
    if args.device != "model":
        return None
    return StepCosts(args.decode_ms, args.decode_ms_per_request, args.prefill_ms_per_token,
                     args.tower_ms_per_image_token, args.cost_model)


def extra_engine_args(server_args: str) -> dict:
    """The engine keywords that --server-args' flags set (the server's own
    parser reads them; only the flags given count)."""
    from pyvlm.server.args import add_server_arguments, server_args_from

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    given = shlex.split(server_args)
    if not given:
        return {}
    defaults = server_args_from(parser.parse_args([])).engine_kwargs()
    chosen = server_args_from(parser.parse_args(given)).engine_kwargs()
    return {name: value for name, value in chosen.items() if value != defaults[name]}


def device_flags(args) -> List[str]:
    if args.device == "model":
        return ["--device", "cpu", "--max-total-tokens", str(args.concurrency * 8192)]
    return ["--device", args.device, "--dtype", "bfloat16"]


def run_through_http(args, scratch: str) -> "HttpRun":
    """The pyvlm policy's workload through the server, the runner (modeled
    or real, traced) in the engine process: tok/s, the client's
    inter-token gaps and the engine's steps."""
    from benchmarks.load.local_server import measure_server
    from benchmarks.load.serving_phases import Plan

    plan = Plan(num_warmup=0 if args.device == "model" else min(8, args.concurrency),
                num_ttft=0, decode_tokens=0, decode_runs=0, num_requests=args.num_requests,
                concurrency=args.concurrency, output_tokens=args.output_tokens,
                step_concurrency=0)
    flags = ["--model", scratch, "--load-format", "dummy", *device_flags(args),
             "--engine-process", "process", "--max-mixed-prefill-tokens",
             str(args.max_mixed_prefill_tokens), "--log-level", "warning",
             *shlex.split(args.server_args)]
    trace_path = os.path.join(scratch, "http-steps.txt")
    with wrapped_engine_processes(trace_path, modeled_costs(args)):
        results = measure_server(flags, plan, args.model, tuple(args.image_size))
    if results.errors or results.num_ok != args.num_requests:
        raise SystemExit(f"the HTTP run failed: {results.num_ok}/{args.num_requests} ok, "
                         f"{'; '.join(results.errors)}")
    steps = StepTrace.read(trace_path)
    return HttpRun("pyvlm through HTTP", results.output_tokens_per_s, results.itl_p50_s * 1e3,
                   results.itl_p99_s * 1e3,
                   StepTrace(steps).walls(steps[-1][0] if steps else 0.0))


def mixed_step_walls(steps: List[tuple]) -> List[float]:
    """Wall ms of the steps (StepTrace.walls) that ran prefill tokens with decodes."""
    return [ms for ms, decodes, prefill, _ in steps if decodes and prefill]


@dataclass
class HttpRun:
    policy: str
    tok_s: float
    p50_ms: float
    p99_ms: float
    steps: List[tuple]  # StepTrace.walls of the engine process (warm-up included)

    @property
    def mixed_ms(self) -> List[float]:
        return mixed_step_walls(self.steps)


@dataclass
class Run:
    policy: str
    tok_s: float
    gaps: List[float]
    ttfts: List[float]
    steps: List[tuple]  # StepTrace.walls

    def gap_ms(self, q: float) -> float:
        return self.gaps[min(len(self.gaps) - 1, int(q * len(self.gaps)))] * 1e3

    @property
    def mixed_ms(self) -> List[float]:
        return mixed_step_walls(self.steps)


def run_once(args, policy: str, scratch: str, images) -> Run:
    """One policy's workload through the engine API (the engine on a thread
    of this process or in its own, --engine-process)."""
    import pyvlm

    baseline = tokens_only_charging() if policy != "pyvlm" else contextlib.nullcontext()
    trace = StepTrace()
    trace_path = os.path.join(scratch, f"steps-{policy.split()[0]}.txt")
    if args.engine_process == "process":
        runners = wrapped_engine_processes(trace_path, modeled_costs(args))
    elif args.device == "model":
        device = ModeledDevice(modeled_costs(args), trace=trace)
        runners = wrapped_runners(lambda real: ModeledRunner(real, device), prepare_in_step=True)
    else:
        runners = wrapped_runners(lambda real: TracedRunner(real, trace), prepare_in_step=False)
    device_args = {"device": "cpu", "max_total_tokens": args.concurrency * 8192} \
        if args.device == "model" else {"device": args.device, "dtype": "bfloat16"}
    with runners, baseline:
        engine = pyvlm.Engine(model=scratch, load_format="dummy",
                              engine_process=args.engine_process, overlap_schedule=True,
                              max_mixed_prefill_tokens=args.max_mixed_prefill_tokens,
                              **device_args, **extra_engine_args(args.server_args))
        # As the server's processes do (pyvlm/heap.py): without it, full
        # collections of this process's heap (~0.1-0.25 s) show as steps.
        restore_gc = tune_for_serving()
        try:
            if args.device != "model":  # CUDA graphs, kernels' first calls, on images of their own
                asyncio.run(stream_all(engine, args, images[args.num_requests:]))
            start = time.perf_counter()
            gaps, ttfts, wall, end = asyncio.run(stream_all(engine, args,
                                                            images[:args.num_requests]))
        finally:
            restore_gc()
            engine.shutdown()
    steps = StepTrace.read(trace_path) if args.engine_process == "process" else trace.steps
    gaps.sort()
    return Run(policy, args.num_requests * args.output_tokens / wall, gaps, ttfts,
               StepTrace([step for step in steps if step[0] >= start]).walls(end))


async def stream_all(engine, args, images):
    """Every request streamed, args.concurrency at a time: (inter-token
    gaps, TTFTs, wall seconds)."""
    gaps, ttfts = [], []
    prompt = f"{engine.builder.image_token}\n" + " ".join(["describe this photo"] * 6)
    params = {"max_new_tokens": args.output_tokens, "temperature": 0, "ignore_eos": True}
    slots = asyncio.Semaphore(args.concurrency)

    async def one(index: int):
        async with slots:
            started, last = time.perf_counter(), None
            async for delta in engine.async_generate(prompt, params, image_data=images[index]):
                now = time.perf_counter()
                if last is None:
                    ttfts.append(now - started)
                else:  # a delta of n tokens: one gap, then n - 1 that arrived with it
                    gaps.extend([now - last] + [0.0] * (len(delta["token_ids"]) - 1))
                last = now

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(images))))
    end = time.perf_counter()
    return gaps, ttfts, end - started, end


def distinct_images(count: int, size):
    """count images that differ (their content keys differ), of one size."""
    import torch
    from PIL import Image

    base = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8)
    images = []
    for index in range(count):
        pixels = base.clone()
        pixels[0, :4, 0] = torch.tensor([index & 255, index >> 8, 1, 2], dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy()))
    return images


def report(args, runs: List[Run], http: Optional[HttpRun] = None) -> str:
    modeled = args.device == "model"
    floor_ms = args.decode_ms + args.decode_ms_per_request * args.concurrency
    rows = []
    for run in runs:
        p50, p99 = run.gap_ms(0.5), run.gap_ms(0.99)
        rows.append([run.policy, f"{run.tok_s:,.0f}", f"{p50:.1f}", f"{run.gap_ms(0.9):.1f}",
                     f"{p99:.1f}", f"{p99 / p50:.2f}x",
                     f"{floor_ms / p50:.0%}" if modeled else "n/a",
                     f"{statistics.median(run.ttfts) * 1e3:.0f}",
                     f"{max(run.mixed_ms, default=0):.1f}", str(len(run.mixed_ms))])
    if http is not None:
        rows.append([http.policy, f"{http.tok_s:,.0f}", f"{http.p50_ms:.1f}", "n/a",
                     f"{http.p99_ms:.1f}", f"{http.p99_ms / http.p50_ms:.2f}x",
                     f"{floor_ms / http.p50_ms:.0%}" if modeled else "n/a",
                     "n/a", f"{max(http.mixed_ms, default=0):.1f}", str(len(http.mixed_ms))])
    table = markdown(["policy", "output tok/s", "ITL p50 ms", "p90", "p99", "p99 / p50",
                      "floor / p50", "TTFT p50 ms", "largest mixed step ms", "mixed steps"], rows)
    device = (f"modeled device: decode {args.decode_ms} ms + {args.decode_ms_per_request} "
              f"ms/request, prefill {args.prefill_ms_per_token} ms/token, tower "
              f"{args.tower_ms_per_image_token} ms/image token, {args.cost_model}" if modeled
              else f"the real runner on {args.device} (random weights, bfloat16)")
    text = (f"**{args.model}**, {device}; {args.num_requests} requests x {args.output_tokens} "
            f"tokens, {args.concurrency} concurrent, distinct {args.image_size[0]}x"
            f"{args.image_size[1]} images, --max-mixed-prefill-tokens "
            f"{args.max_mixed_prefill_tokens}"
            + (f"; ITL floor {floor_ms:.2f} ms (a decode step of all the streams)" if modeled
               else "; a step's wall time runs from its launch to the next one's")
            + f"; the engine API's engine in a {args.engine_process}"
            + f"\n\n{table}")
    for run in runs + ([http] if http is not None else []):
        text += f"\n\n{run.policy}: steps by kind\n\n{steps_by_kind(run.steps)}"
        text += f"\n\n{run.policy}: the {args.slowest} slowest steps\n\n"
        text += slowest_steps(run.steps, args.slowest)
    return text


def step_kind(decodes: int, prefill: int, image_tokens: int) -> str:
    if not prefill:
        return "decode"
    kind = "mixed" if decodes else "prefill only"
    return kind + (", starts images" if image_tokens else "")


def steps_by_kind(steps: List[tuple]) -> str:
    kinds = {}
    for ms, *composition in steps:
        kinds.setdefault(step_kind(*composition), []).append(ms)
    rows = []
    for kind, walls in sorted(kinds.items()):
        walls.sort()
        rows.append([kind, str(len(walls)), f"{statistics.median(walls):.1f}",
                     f"{walls[min(len(walls) - 1, int(0.99 * len(walls)))]:.1f}",
                     f"{walls[-1]:.1f}", f"{sum(walls) / 1e3:.2f}"])
    return markdown(["step kind", "steps", "wall ms p50", "p99", "max", "total s"], rows)


def slowest_steps(steps: List[tuple], count: int) -> str:
    """The count slowest steps with what they ran and their place in the
    run (the first steps meet captures and cold caches)."""
    order = sorted(range(len(steps)), key=lambda i: steps[i], reverse=True)[:count]
    rows = [[f"{steps[i][0]:.1f}", f"{i + 1} of {len(steps)}", *map(str, steps[i][1:])]
            for i in order]
    return markdown(["wall ms", "step", "decodes", "prefill tokens", "new image tokens"], rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2-vl-7b-narrow", choices=SHAPES,
                        help="a -narrow shape for the modeled device, any for --device cuda")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--image-size", type=int, nargs=2, default=(644, 476))
    parser.add_argument("--max-mixed-prefill-tokens", type=int, default=1024)
    parser.add_argument("--device", default="model",
                        help="model: the modeled device (the StepCosts flags); cuda: the real "
                             "runner on a random-weight checkpoint of --model")
    parser.add_argument("--policy", choices=POLICIES, default="both",
                        help="both in one process (the modeled device), or one (a real device "
                             "keeps the first engine's memory: run each in its own process)")
    parser.add_argument("--engine-process", choices=["thread", "process"], default="thread",
                        help="where the engine API's engine runs (the server's is a process)")
    parser.add_argument("--http", action="store_true",
                        help="also serve the pyvlm policy's workload through the HTTP server")
    parser.add_argument("--slowest", type=int, default=8, help="slowest steps listed per policy")
    parser.add_argument("--server-args", default="",
                        help="more server flags, one string (--device cuda: the engine API's "
                             "engine takes them too), e.g. '--piecewise-cuda-graph-max-tokens 0'")
    for name, default in vars(StepCosts()).items():
        if isinstance(default, float):
            parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=default)
    parser.add_argument("--cost-model", choices=["additive", "roofline"], default="additive",
                        help="how a modeled step's prompt rows add to its weight reads (StepCosts)")
    return parser.parse_args(argv)


def main(argv=None) -> List[Run]:
    from benchmarks.offline.random_models import write_checkpoint_metadata

    args = parse_args(argv)
    warmup = args.concurrency if args.device != "model" else 0
    images = distinct_images(args.num_requests + warmup, args.image_size)
    runs = []
    with tempfile.TemporaryDirectory(prefix="pyvlm-sim-") as scratch:
        write_checkpoint_metadata(Path(scratch), config_for(args.model))
        for policy in POLICIES[args.policy]:
            runs.append(run_once(args, policy, scratch, images))
        http = run_through_http(args, scratch) if args.http else None
    print(report(args, runs, http), flush=True)
    return runs


if __name__ == "__main__":
    main()
