"""Host overhead (issue 12): with the model's work replaced by a runner that
returns at once, how many tokens/s pyvlm's server and engine sustain with 64
concurrent streamed requests through HTTP, against the token rate the GPU
produces at 64 concurrent (target: >= 5x).

  python benchmarks/bench_host_overhead.py --gpu-json e2e_qwen2-vl-7b.json
  python benchmarks/bench_host_overhead.py --gpu-tokens-per-s 2500

The server is `python -m pyvlm`'s, served in this process
(benchmarks/load/local_server.py) over a narrow shape's checkpoint (the real
vocabulary, tokenizer, chat template and image preprocessing; tiny widths;
--load-format dummy, on the CPU). startup.build_runner is wrapped where the
engine starts: the real runner is built, then replaced by InstantRunner.
With `--engine-process process` (the GPU's default, and this script's) that
is the spawned engine process, whose entry point is swapped for one that
wraps it there first; with `thread`, this process. All the rest is the server's own:
HTTP, request building (tokenizing; decoding every image, which a GPU engine's
front then leaves to the step to preprocess on the device),
scheduling, the prefix cache, detokenizing, SSE. Two phases of
benchmarks/load/serving_phases.py: the step phase (64 requests of ~3k-token
prompts decoding at once: 64 / the time between tokens) and the throughput
phase (256 requests, 64 concurrent, distinct images, 128 tokens each: output
tokens / wall time). The GPU's rates come from bench_e2e_gpu.py's --json-out
(the same phases) or --gpu-tokens-per-s (both rows). The client is one
Python process reading every event, so a rate here is a lower bound of the
server's.
"""

import argparse
import contextlib
import datetime
import json
import logging
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]

from benchmarks.load.report import markdown  # noqa: E402
from benchmarks.load.serve_random import SHAPES, config_for  # noqa: E402
from benchmarks.load.serving_phases import PhaseResults, Plan, image_size_for  # noqa: E402
from pyvlm.scheduling.types import ForwardBatch, SampleResult  # noqa: E402

MIN_HOST_OVER_GPU = 5.0  # issue 12's target
# Tokens the instant runner samples: ordinary words of every shape's vocabulary.
FIRST_TOKEN, NUM_TOKENS = 1000, 100


class InstantRunner:
    """A model runner that does no work: every chunk that samples gets a
    token at once (FIRST_TOKEN + its step % NUM_TOKENS). It stands in for a
    real runner: the pool geometry and every other attribute (set-up such as
    capturing CUDA graphs: none on a CPU) are the real one's, so the
    scheduler pages as it would; `forward` alone is replaced."""

    forwards = 0  # forward calls of every InstantRunner (0 after a run: not used)

    def __init__(self, real):
        self.real = real
        self.num_forwards = self.num_decode_steps = 0

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def forward(self, batch: ForwardBatch) -> List[Optional[SampleResult]]:
        self.num_forwards += 1
        self.num_decode_steps += batch.is_decode
        InstantRunner.forwards += 1
        return [SampleResult(FIRST_TOKEN + chunk.step % NUM_TOKENS) if chunk.sample else None
                for chunk in batch.chunks]

    def launch(self, batch: ForwardBatch) -> "Launched":
        """As forward (overlap scheduling launches; FUTURE_TOKEN inputs
        need nothing: the instant tokens depend on the step alone)."""
        return Launched(self.forward(batch))

    def free_encoder_cache(self) -> None:
        pass


class Launched:
    def __init__(self, results):
        self._results = results

    def wait(self):
        return self._results


# The engine process touches this file at its first instant step (its
# InstantRunner.forwards is not this process's).
MARK_ENV = "PYVLM_BENCH_INSTANT_MARK"


@contextlib.contextmanager
def instant_runners():
    """Engines started inside get an InstantRunner: here, and in engine
    processes started meanwhile (their entry point wraps it there)."""
    from pyvlm.entrypoints import core_client, startup

    restore_build = _wrap_build_runner()
    real_entry = core_client.run_engine_core
    core_client.run_engine_core = run_instant_engine_core
    # The front as a GPU engine's: images are decoded here and preprocessed
    # in the step, on the device (here: by the instant runner, at no cost).
    real_in_step = startup.prepares_images_in_step
    startup.prepares_images_in_step = lambda device: True
    try:
        yield
    finally:
        startup.prepares_images_in_step = real_in_step
        core_client.run_engine_core = real_entry
        restore_build()


def _wrap_build_runner():
    from pyvlm.entrypoints import startup

    real_build = startup.build_runner

    def build_runner(*args, **kwargs):
        model, runner = real_build(*args, **kwargs)
        return model, InstantRunner(runner)

    startup.build_runner = build_runner
    return lambda: setattr(startup, "build_runner", real_build)


def run_instant_engine_core(*args, **kwargs):
    """The engine process's entry point with InstantRunner in place (spawn
    imports this module by name in the child, then calls this)."""
    from pyvlm.entrypoints.engine_core import run_engine_core

    _wrap_build_runner()
    mark = os.environ.get(MARK_ENV)
    if mark:
        _mark_first_forward(Path(mark))
    return run_engine_core(*args, **kwargs)


def _mark_first_forward(mark: Path) -> None:
    """Touches mark at this process's first InstantRunner forward, then
    takes itself out of the way: a check per forward (a stat system call)
    was 6% of the engine process's time, none of it pyvlm's."""
    real_forward = InstantRunner.forward

    def forward(self, batch):
        InstantRunner.forward = real_forward
        mark.touch()
        return real_forward(self, batch)

    InstantRunner.forward = forward


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2-vl-7b-narrow",
                        choices=[s for s in SHAPES if s.endswith("-narrow")])
    parser.add_argument("--photos", type=Path, default=None)
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument("--gpu-json", type=Path, default=None,
                     help="bench_e2e_gpu.py's --json-out of the GPU run")
    gpu.add_argument("--gpu-tokens-per-s", type=float, default=None,
                     help="the GPU's token rate at 64 concurrent (both rows)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--step-context", type=int, default=3072)
    parser.add_argument("--step-output-tokens", type=int, default=1024,
                        help="long: requests are built (3k words, an image) slower than "
                        "instant steps finish them, and all 64 must decode at once")
    parser.add_argument("--engine-process", choices=["process", "thread"], default="process",
                        help="where the engine runs (default process: the GPU's default)")
    parser.add_argument("--server-log-level", default="warning")
    parser.add_argument("--json-out", type=Path, default=None)
    return parser.parse_args(argv)


def plan_of(args) -> Plan:
    return Plan(num_warmup=min(8, args.concurrency), num_ttft=0, decode_tokens=0,
                num_requests=args.num_requests, concurrency=args.concurrency,
                output_tokens=args.output_tokens, step_concurrency=args.concurrency,
                step_context=args.step_context, step_output_tokens=args.step_output_tokens)


@dataclass(frozen=True)
class CpuSeconds:
    """CPU time (user + system) of this process (the server and its engine
    thread) and of its waited-for children (the client), and wall time."""

    server: float
    client: float
    wall: float

    @classmethod
    def now(cls) -> "CpuSeconds":
        own, children = (resource.getrusage(who) for who in
                         (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return cls(own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime,
                   time.perf_counter())

    def since(self, start: "CpuSeconds") -> "CpuSeconds":
        return CpuSeconds(self.server - start.server, self.client - start.client,
                          self.wall - start.wall)


def measure_host(args, plan: Plan) -> PhaseResults:
    from benchmarks.load.local_server import measure_server
    from benchmarks.offline.random_models import write_checkpoint_metadata

    config = config_for(args.model)
    # never written (the runner does nothing), so never committed by the OS
    pool_tokens = args.concurrency * max(args.step_context + args.step_output_tokens, 8192) * 2
    with tempfile.TemporaryDirectory(prefix="pyvlm-host-") as scratch, instant_runners():
        write_checkpoint_metadata(Path(scratch), config)
        mark = Path(scratch) / "instant-runner-ran"
        os.environ[MARK_ENV] = str(mark)
        flags = ["--model", scratch, "--load-format", "dummy", "--device", "cpu",
                 "--engine-process", args.engine_process, "--max-total-tokens", str(pool_tokens),
                 "--log-level", args.server_log_level]
        results = measure_server(flags, plan, args.model, image_size_for(args.model),
                                 args.photos)
        ran = InstantRunner.forwards > 0 or mark.exists()
    if not ran:
        raise SystemExit("the engine never ran an InstantRunner step: has "
                         "pyvlm.entrypoints.startup.build_runner changed?")
    return results


@dataclass(frozen=True)
class Rates:
    """Tokens/s of the step phase's full batch and of the throughput phase."""

    step: Optional[float]
    throughput: Optional[float]

    @classmethod
    def of(cls, results: PhaseResults) -> "Rates":
        throughput = results.output_tokens_per_s if results.wall_s else None
        return cls(results.step_tokens_per_s, throughput)


def gpu_rates(args) -> Rates:
    if args.gpu_json is not None:
        run = json.loads(args.gpu_json.read_text())
        return Rates.of(PhaseResults(**run["pyvlm"]))
    return Rates(args.gpu_tokens_per_s, args.gpu_tokens_per_s)


def verdict(host: Optional[float], gpu: Optional[float]) -> List[str]:
    """[host / GPU, met or not] (n/a without both)."""
    if host is None or gpu is None:
        return ["n/a", "n/a"]
    ratio = host / gpu
    return [f"{ratio:.2f}x", "met" if ratio >= MIN_HOST_OVER_GPU else "**not met**"]


def report(args, host: Rates, gpu: Rates, results: PhaseResults, cpu: CpuSeconds) -> str:
    def num(value):
        return "n/a" if value is None else f"{value:,.0f}"

    rows = [[f"decode tok/s, {args.concurrency} running x ~{results.step_prompt_tokens:,.0f}"
             "-token prompts", num(host.step), num(gpu.step), *verdict(host.step, gpu.step)],
            [f"output tok/s, {args.num_requests} requests x {args.output_tokens} tokens, "
             f"{args.concurrency} concurrent, distinct images", num(host.throughput),
             num(gpu.throughput), *verdict(host.throughput, gpu.throughput)]]
    table = markdown(["rate", "host only (instant runner)", "GPU", "host / GPU",
                      f"target >= {MIN_HOST_OVER_GPU:g}x"], rows)
    source = (f"GPU: {args.gpu_json}" if args.gpu_json else
              f"GPU: --gpu-tokens-per-s {args.gpu_tokens_per_s}" if args.gpu_tokens_per_s
              else "GPU: none given")
    return (f"**host overhead** · {args.model} checkpoint, instant runner · "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n{table}\n\n"
            f"{source}. Step phase: {results.step_num_ok}/{results.step_num_requests} ok, "
            f"{results.step_num_steps:.0f} steps with all decoding. Throughput phase: "
            f"{results.num_ok}/{results.num_requests} ok in {results.wall_s:.2f} s, inter-token "
            f"p50 {_ms(results.itl_p50_s)} / p99 {_ms(results.itl_p99_s)} ms. CPU time over "
            f"the {cpu.wall:.1f} s run (start-up included): server process {cpu.server:.1f} s, "
            f"{_children(args)} {cpu.client:.1f} s; engine in a {args.engine_process}; "
            f"{os.cpu_count()} cores."
            + (f" Errors: {'; '.join(results.errors)}." if results.errors else ""))


def _children(args) -> str:
    """What the child processes' CPU time covers."""
    return "client and engine process" if args.engine_process == "process" else "client"


def _ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f}"


def main(argv=None) -> Rates:
    args = parse_args(argv)
    logging.basicConfig(level=args.server_log_level.upper(), format="[%(asctime)s] %(message)s")
    start = CpuSeconds.now()
    results = measure_host(args, plan_of(args))
    cpu = CpuSeconds.now().since(start)
    host, gpu = Rates.of(results), gpu_rates(args)
    print(report(args, host, gpu, results, cpu), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"host": host.__dict__, "gpu": gpu.__dict__,
                                             "phases": results.__dict__}, indent=1))
    return host


if __name__ == "__main__":
    main()
