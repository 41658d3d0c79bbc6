"""The serving measurements of benchmarks/bench_e2e_gpu.py, against any
OpenAI-compatible server (streamed chat completions with one image each,
through benchmarks/bench_serving.py's client), in phases:

1. warmup: a few concurrent short requests;
2. ttft: TTFT on an idle server: sequential single requests, each a fresh
   image (one the server has never seen, so no encoder-cache hit), max_tokens 1;
3. decode: batch-1 decode: decode_runs streamed requests one after another,
   tokens/s after each one's first token; the median run is reported;
4. step: step_concurrency requests at once whose prompts are padded with
   words to ~step_context tokens, step_output_tokens each (ignore_eos): the
   mean time between tokens while all of them decode (full_batch_steps);
5. throughput: num_requests requests with distinct images, concurrency at a
   time, output_tokens each (ignore_eos): output tokens / wall time, and the
   inter-token latency (p50, p99) of all their streams.

A phase asked for 0 requests or tokens is skipped. Every request of every
phase carries its own picture (all of one size), so the phases never share
cache entries but for the chat template's text.

  python -m benchmarks.load.serving_phases --base-url http://127.0.0.1:30000/v1 \\
      --model qwen2-vl-7b --json-out phases.json

After each phase it prints everything measured so far as one JSON line
(PhaseResults) on stdout. It runs in its own process, so the client never
competes with the server for the interpreter lock.
"""

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.bench_serving import (RequestTiming, chat_target, image_data_uri,  # noqa: E402
                                      one_request, run_requests)
from benchmarks.load import client  # noqa: E402
from benchmarks.load.images import distinct_pictures  # noqa: E402
from benchmarks.load.report import percentile  # noqa: E402
from benchmarks.load.server import engine_stats  # noqa: E402
from benchmarks.load.workload import WORDS  # noqa: E402
from pyvlm.scheduling.types import step_paths_of  # noqa: E402

IMAGE_SIZE = (644, 476)  # width, height: 17 x 23 Qwen2-VL merged blocks, no resize
# Per model (by name, "-narrow" or not) where the default is a poor probe:
# Llama-3.2-Vision tiles 644x476 into 2 tiles of 560; a 4:3 1120x840 photo
# fills the 2x2 canvas (4 tiles, the most it takes) at scale 1, padded below.
IMAGE_SIZES = {"llama-3.2-11b-vision": (1120, 840)}
WARMUP_TOKENS = 4
# Each phase, in the order they run, and the Plan field whose 0 skips it.
PHASE_FIELDS = {"ttft": "num_ttft", "decode": "decode_tokens", "step": "step_concurrency",
                "throughput": "num_requests"}
PHASES = tuple(PHASE_FIELDS)
MIN_WINDOW_STEPS = 4  # fewer steps with every stream running: no step time


def image_size_for(model: str) -> Tuple[int, int]:
    """(width, height) of the benchmark's pictures for a served model name."""
    return IMAGE_SIZES.get(model.removesuffix("-narrow"), IMAGE_SIZE)


def parse_size(text: str) -> Tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height)."""
    width, height = (int(side) for side in text.lower().split("x"))
    return width, height


def decode_rate(run: Tuple[int, float]) -> float:
    """Tokens/s of a decode run (tokens, seconds from its first token to its last)."""
    tokens, seconds = run
    return (tokens - 1) / seconds


def median_run(runs: Sequence[Tuple[int, float]]) -> Tuple[int, float]:
    """The run of median rate (the upper middle one of an even count)."""
    return sorted(runs, key=decode_rate)[len(runs) // 2]


@dataclass(frozen=True)
class Plan:
    """How many requests and tokens each phase runs (0: the phase is skipped)."""

    num_warmup: int = 8
    num_ttft: int = 8
    decode_tokens: int = 128
    # Batch-1 decode runs, one after another with fresh images; the phase
    # reports the median run (one run of a 11B model read 55-82% of its
    # floor on one machine).
    decode_runs: int = 3
    num_requests: int = 256
    concurrency: int = 64
    output_tokens: int = 128
    step_concurrency: int = 64
    step_context: int = 3072
    # Long enough that the first requests still decode once the last prompt is
    # in: with --max-mixed-prefill-tokens 512, 64 x 3k prompts took ~440 mixed
    # steps to prefill while the earlier ones decode (~220 at 1024).
    step_output_tokens: int = 768

    @property
    def num_images(self) -> int:
        """Warm-up, TTFT, decode, the step phase's length probe and requests, throughput."""
        return (self.num_warmup + self.num_ttft + self.decode_runs + 1 + self.step_concurrency
                + self.num_requests)

    def phases(self) -> List[str]:
        """The phases this plan runs (those asked for any requests or tokens)."""
        return [phase for phase, name in PHASE_FIELDS.items() if getattr(self, name) > 0]

    def without(self, phases: Sequence[str]) -> "Plan":
        """This plan with those phases skipped."""
        return replace(self, **{PHASE_FIELDS[phase]: 0 for phase in phases})


@dataclass
class PhaseResults:
    """What the phases measured so far (phases: those done, in order); a
    phase not run leaves its fields at their defaults."""

    phases: List[str] = field(default_factory=list)
    num_prompt_tokens: int = 0  # of a one-image prompt, the server's usage
    ttft_s: List[float] = field(default_factory=list)
    decode_tokens: int = 0  # of the median run
    decode_s: float = 0.0  # the median run's, from its first streamed token to its last
    decode_runs_tokens_per_s: List[float] = field(default_factory=list)  # every run, in order
    step_num_requests: int = 0
    step_num_ok: int = 0
    step_prompt_tokens: float = 0.0  # mean of the step phase's prompts
    step_s: Optional[float] = None  # None: never every stream decoding at once
    step_num_steps: float = 0.0  # steps seen while every stream decoded
    step_context: float = 0.0  # mean context (prompt + generated) in those steps
    num_requests: int = 0
    num_ok: int = 0
    output_tokens: int = 0  # of the throughput phase, all requests
    wall_s: float = 0.0
    itl_p50_s: Optional[float] = None  # inter-token latency over every stream
    itl_p99_s: Optional[float] = None
    errors: List[str] = field(default_factory=list)
    # per phase, the server's model steps by path (decode_graph, piecewise_graphs,
    # eager: pyvlm.scheduling.types.step_paths_of); empty when the server has none
    steps_by_path: Dict[str, Dict[str, int]] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return decode_rate((self.decode_tokens, self.decode_s))

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def step_tokens_per_s(self) -> Optional[float]:
        """Output tokens/s of the step phase's full batch."""
        return None if self.step_s is None else self.step_num_requests / self.step_s


@dataclass(frozen=True)
class FullBatchSteps:
    """Decode steps while every stream of a batch was decoding."""

    step_s: float  # mean time between two tokens of one stream
    num_steps: float  # tokens per stream in the window
    mean_index: float  # mean output index of those tokens (context past the prompt)


def full_batch_steps(streams: Sequence[Sequence[float]]) -> Optional[FullBatchSteps]:
    """Token arrival times of each stream -> the steps of the window in
    which all of them were decoding: from the last stream's first token to
    the first stream's last one. The step time is the window over the mean
    number of tokens a stream received in it (robust to a token delivered
    late and the next early); None when the window holds fewer than
    MIN_WINDOW_STEPS."""
    if not streams or not all(streams):
        return None
    start, end = max(s[0] for s in streams), min(s[-1] for s in streams)
    inside = [[i for i, t in enumerate(s) if start < t <= end] for s in streams]
    num_steps = statistics.mean(len(indices) for indices in inside)
    if end <= start or num_steps < MIN_WINDOW_STEPS:
        return None
    mean_index = statistics.mean(i for indices in inside for i in indices)
    return FullBatchSteps((end - start) / num_steps, num_steps, mean_index)


def inter_token_gaps(timings: Sequence[RequestTiming]) -> List[float]:
    return [b - a for t in timings for a, b in zip(t.chunk_times, t.chunk_times[1:])]


def filler_text(num_words: int, seed: int = 0) -> str:
    """num_words common words after a space (about a token each)."""
    rng = random.Random(seed)
    return "".join(" " + rng.choice(WORDS) for _ in range(num_words))


def _checked(timing: RequestTiming, what: str) -> RequestTiming:
    if timing.error or not timing.chunk_times:
        raise RuntimeError(f"{what}: {timing.error or 'no text streamed'}")
    return timing


def _ok(timings: Sequence[RequestTiming]) -> List[RequestTiming]:
    return [t for t in timings if not t.error and t.chunk_times]


def _errors(timings: Sequence[RequestTiming]) -> List[str]:
    return [t.error for t in timings if t.error][:3]


async def wait_ready(base_url: str, timeout: float) -> None:
    """Polls GET /v1/models until 200 (the server answers 503 while loading)."""
    server, deadline = client.Server.from_url(base_url), time.monotonic() + timeout
    while True:
        try:
            if (await client.request(server, "GET", "/v1/models", timeout=10)).status == 200:
                return
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} was not ready within {timeout:.0f} s")
        await asyncio.sleep(0.5)


class Phases:
    """Runs the phases of a plan in order, each on its own images."""

    def __init__(self, base_url: str, model: str, plan: Plan, uris: List[str]):
        self.target, self.model, self.plan = chat_target(base_url), model, plan
        self._uris: Iterator[str] = iter(uris)
        self.results = PhaseResults()

    def _take(self, count: int) -> List[str]:
        return [next(self._uris) for _ in range(count)]

    def _done(self, phase: str) -> PhaseResults:
        self.results.phases.append(phase)
        return self.results

    async def warmup(self) -> None:
        uris = self._take(self.plan.num_warmup)
        for timing in await run_requests(self.target, self.model, uris, WARMUP_TOKENS,
                                         len(uris) or 1):
            _checked(timing, "warm-up")

    async def ttft(self) -> PhaseResults:
        for i, uri in enumerate(self._take(self.plan.num_ttft)):
            timing = _checked(await one_request(self.target, self.model, uri, 1, i),
                              "TTFT request")
            self.results.ttft_s.append(timing.chunk_times[0] - timing.start)
            self.results.num_prompt_tokens = timing.num_prompt_tokens
        return self._done("ttft")

    async def decode(self) -> PhaseResults:
        runs = []
        for i, uri in enumerate(self._take(max(self.plan.decode_runs, 1))):
            timing = _checked(await one_request(self.target, self.model, uri,
                                                self.plan.decode_tokens, i), "decode request")
            runs.append((timing.num_output_tokens, timing.chunk_times[-1] - timing.chunk_times[0]))
            self.results.num_prompt_tokens = timing.num_prompt_tokens
        r = self.results
        r.decode_runs_tokens_per_s = [decode_rate(run) for run in runs]
        r.decode_tokens, r.decode_s = median_run(runs)
        return self._done("decode")

    async def step(self) -> PhaseResults:
        """A probe learns the one-image prompt's length; the batch's prompts
        are padded with words up to step_context tokens."""
        plan, r = self.plan, self.results
        probe_uri, = self._take(1)
        probe = _checked(await one_request(self.target, self.model, probe_uri, 1, 0),
                         "step-phase probe")
        filler = filler_text(max(0, plan.step_context - probe.num_prompt_tokens))
        timings = await run_requests(self.target, self.model, self._take(plan.step_concurrency),
                                     plan.step_output_tokens, plan.step_concurrency, filler)
        ok = _ok(timings)
        r.step_num_requests, r.step_num_ok = len(timings), len(ok)
        r.step_prompt_tokens = statistics.mean(t.num_prompt_tokens for t in ok) if ok else 0.0
        steps = full_batch_steps([t.chunk_times for t in timings]) if len(ok) == len(timings) \
            else None
        if steps is not None:
            r.step_s, r.step_num_steps = steps.step_s, steps.num_steps
            r.step_context = r.step_prompt_tokens + steps.mean_index
        r.errors += _errors(timings)
        return self._done("step")

    async def throughput(self) -> PhaseResults:
        plan, r = self.plan, self.results
        start = time.perf_counter()
        timings = await run_requests(self.target, self.model, self._take(plan.num_requests),
                                     plan.output_tokens, plan.concurrency)
        r.wall_s = time.perf_counter() - start
        ok = _ok(timings)
        r.num_requests, r.num_ok = len(timings), len(ok)
        r.output_tokens = sum(t.num_output_tokens for t in ok)
        gaps = inter_token_gaps(ok)
        r.itl_p50_s, r.itl_p99_s = percentile(gaps, 0.5), percentile(gaps, 0.99)
        r.errors += _errors(timings)
        return self._done("throughput")


async def run_phases(base_url: str, model: str, plan: Plan, photos=None,
                     image_size: Tuple[int, int] = IMAGE_SIZE, on_phase=None) -> PhaseResults:
    """Every planned phase; on_phase(results) after each."""
    uris = [image_data_uri(p) for p in distinct_pictures(plan.num_images, image_size, photos)]
    phases = Phases(base_url, model, plan, uris)
    await phases.warmup()
    before = await step_paths(base_url)
    for name in plan.phases():
        results = await getattr(phases, name)()
        after = await step_paths(base_url)
        if after:
            results.steps_by_path[name] = {path: count - before.get(path, 0)
                                           for path, count in after.items()}
        before = after
        if on_phase is not None:
            on_phase(results)
    return phases.results


async def step_paths(base_url: str) -> Dict[str, int]:
    """The server's model steps so far by path (a pyvlm server's engine
    stats, step_paths_of); {} when it reports none."""
    try:
        stats = await engine_stats(client.Server.from_url(base_url))
    except (OSError, ValueError, KeyError, RuntimeError, asyncio.TimeoutError):
        return {}
    return step_paths_of(stats)


def print_results(results: PhaseResults) -> None:
    print(json.dumps(asdict(results)), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--image-size", type=parse_size, default=None,
                        help="WIDTHxHEIGHT of every picture (default: image_size_for(--model))")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    for name, value in asdict(Plan()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    args = parser.parse_args(argv)
    plan = Plan(**{name: getattr(args, name) for name in asdict(Plan())})

    async def go():
        await wait_ready(args.base_url, args.ready_timeout)
        return await run_phases(args.base_url, args.model, plan, args.photos,
                                args.image_size or image_size_for(args.model), print_results)

    results = asyncio.run(go())
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(asdict(results)))


if __name__ == "__main__":
    main()
