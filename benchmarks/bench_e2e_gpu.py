"""End to end on one device, the benchmark of issue 12 item 9: a random-weight
model of a real shape (no download), transformers `generate` on it, the
device's copy bandwidth and matmul rate, and pyvlm through its own server,
in one run (under 10 minutes per model on a GPU); ONE markdown table per
model (benchmarks/load/e2e_table.py): pyvlm, transformers, the floor of this
run, pyvlm's % of it, pyvlm against transformers, and the issue's target
with its verdict, for

- TTFT of one fresh image on an idle server (floor: tower + prefill FLOPs,
  linear layers and attention);
- batch-1 decode tokens/s (floor: weights + KV bytes per step);
- the decode step while 64 requests of ~3k-token prompts decode (floor:
  weights + 64 x 3k KV bytes per step);
- output tokens/s of 256 requests, 64 concurrent, distinct images, 128
  tokens each (floor: prefill FLOPs + decode bytes), against transformers'
  best batch of --hf-batch-sizes, and their inter-token latency p50 / p99.

  python benchmarks/bench_e2e_gpu.py --model qwen2-vl-7b --device cuda
  python benchmarks/bench_e2e_gpu.py --model llava-onevision-7b --device cuda
  python benchmarks/bench_e2e_gpu.py --model llama-3.2-11b-vision --device cuda
  (also llava-1.5-7b, llava-next-7b; each with -narrow for a CPU:)
  python benchmarks/bench_e2e_gpu.py --model qwen2-vl-7b-narrow --num-ttft 2 \\
      --decode-tokens 16 --step-concurrency 8 --step-context 1024 --step-output-tokens 32 \\
      --num-requests 16 --concurrency 8 --output-tokens 16 --hf-batch-sizes 8

One process: the rates; a checkpoint folder with the config, tokenizer and
preprocessor but no weights (benchmarks/offline/random_models.py);
transformers' random model on the device, measured
(benchmarks/offline/hf_baseline.py) and freed; then pyvlm served here by
`python -m pyvlm`'s Launcher with default flags but `--load-format dummy`
(random weights of the same shape from config.json), transformers' dtype
and, on a CPU, a KV pool sized for the load; its client
(benchmarks/load/serving_phases.py) runs in a child process. Rows print as
their phase finishes, so a run cut short keeps what it measured; --skip
leaves phases out; --write-results adds the table to benchmarks/RESULTS.md.
"""

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List

import torch

REPO = Path(__file__).resolve().parents[1]
# Run as a script, its own folder leads sys.path, and benchmarks/kernels
# would shadow the `kernels` distribution that transformers imports when it
# is installed; the repository root takes its place.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]

from benchmarks.load import e2e_table as table  # noqa: E402
from benchmarks.load.serve_random import SHAPES, config_for  # noqa: E402
from benchmarks.load.serving_phases import PHASES, PhaseResults, Plan, image_size_for  # noqa: E402
from benchmarks.offline import hf_baseline  # noqa: E402
from benchmarks.offline.roofline import (DeviceRates, Roofline, config_cost,  # noqa: E402
                                         measure_rates)

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SKIPPABLE = ("transformers", *PHASES)
CPU_POOL_SLACK_TOKENS = 4096


def log(message: str) -> None:
    print(f"[e2e {datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None, defaults=None) -> argparse.Namespace:
    """defaults: other default values (bench_latency_vs_transformers.py's)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=SHAPES)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--photos", type=Path, default=None,
                        help="folder of photos to crop the images from (default: the shared ones)")
    parser.add_argument("--num-ttft", type=int, default=8, help="sequential TTFT requests")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-runs", type=int, default=Plan.decode_runs,
                        help="batch-1 decode requests in turn; the median is reported")
    parser.add_argument("--step-concurrency", type=int, default=64,
                        help="requests decoding at once in the step phase")
    parser.add_argument("--step-context", type=int, default=3072,
                        help="prompt tokens of each step-phase request (padded with words)")
    parser.add_argument("--step-output-tokens", type=int, default=Plan.step_output_tokens)
    parser.add_argument("--num-requests", type=int, default=256,
                        help="throughput phase requests (0: --concurrency)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--hf-batch-sizes", default="16,32,64",
                        help="transformers batches tried for throughput (comma-separated)")
    parser.add_argument("--skip", default="", help=f"phases left out: {','.join(SKIPPABLE)}")
    parser.add_argument("--server-args", default="", help="more server flags, one string")
    parser.add_argument("--server-log-level", default="warning")
    parser.add_argument("--json-out", type=Path, default=None, help="every number, as JSON")
    parser.add_argument("--write-results", type=Path, nargs="?", const=RESULTS, default=None,
                        help=f"add the table to this file (default {RESULTS.relative_to(REPO)})")
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    if args.photos is not None and not args.photos.is_dir():
        parser.error(f"--photos {args.photos}: no such folder")
    args.skip = tuple(p for p in args.skip.split(",") if p)
    if set(args.skip) - set(SKIPPABLE):
        parser.error(f"--skip: unknown phases {set(args.skip) - set(SKIPPABLE)}")
    args.num_requests = args.num_requests or args.concurrency
    args.hf_batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",") if b]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def plan_of(args) -> Plan:
    """Every phase's plan (the client runs it without the skipped ones)."""
    return Plan(num_warmup=min(8, args.concurrency), num_ttft=args.num_ttft,
                decode_tokens=args.decode_tokens, decode_runs=args.decode_runs,
                num_requests=args.num_requests,
                concurrency=args.concurrency, output_tokens=args.output_tokens,
                step_concurrency=args.step_concurrency, step_context=args.step_context,
                step_output_tokens=args.step_output_tokens)


def dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


# --- the run ----------------------------------------------------------------------------

@dataclass
class E2ERun:
    args: argparse.Namespace
    rates: DeviceRates
    measured: table.Measured


def main(argv=None, defaults=None) -> E2ERun:
    args = parse_args(argv, defaults)
    logging.basicConfig(level=args.server_log_level.upper(), format="[%(asctime)s] %(message)s")
    rates = measure_rates(args.device)
    log(f"copy {_si(rates.copy_bytes_per_s, 'B/s')}, matmul "
        f"{_si(rates.matmul_flops_per_s, 'FLOP/s')}; {args.model}")
    config, dtype, plan = config_for(args.model), dtype_for(args.device), plan_of(args)
    with tempfile.TemporaryDirectory(prefix=f"pyvlm-{args.model}-") as scratch:
        folder = Path(scratch)
        measured = measure_transformers_and_floors(args, config, dtype, folder, plan, rates)
        run = E2ERun(args, rates, measured)
        print("\n".join([title(run), ""] + table.head_lines()), flush=True)
        client_plan = plan.without(tuple(p for p in args.skip if p in PHASES))
        if client_plan.phases():
            measured.ours = measure_pyvlm(args, folder, client_plan, dtype,
                                          measured)
    for phase in PHASES:
        if phase not in measured.ours.phases:
            print_rows(table.rows_of(phase, measured))
    print("\n" + notes(run), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(run_json(run), indent=1))
    if args.write_results:
        add_section(args.write_results, section(run))
        log(f"table added to {args.write_results}")
    return run


def measure_transformers_and_floors(args, config, dtype, folder: Path, plan: Plan,
                                    rates: DeviceRates) -> table.Measured:
    """Writes the checkpoint folder (no weights); the prompt's shape and the
    floors; transformers' random model on the device measured (unless
    skipped) and freed. pyvlm's results are yet to come."""
    from benchmarks.load.images import distinct_pictures
    from benchmarks.offline.random_models import random_hf_model, write_checkpoint_metadata

    write_checkpoint_metadata(folder, config)
    images = distinct_pictures(max(args.num_ttft, *args.hf_batch_sizes),
                               image_size_for(args.model), args.photos)
    shape = hf_baseline.prompt_shape(folder, config, images[0])
    roofline = Roofline(config_cost(config, dtype), rates)
    theirs = None
    if "transformers" not in args.skip:
        log("transformers generate")
        hf = random_hf_model(config, args.device, dtype)
        theirs = hf_baseline.measure(hf, folder, images, args.num_ttft, args.decode_tokens,
                                     args.hf_batch_sizes, args.output_tokens)
        log(f"transformers done: {theirs}")
        del hf
        _free(args.device)
    return table.Measured(plan, roofline, shape, theirs, PhaseResults(), args.skip)


def measure_pyvlm(args, folder: Path, plan: Plan, dtype: torch.dtype,
                  measured: table.Measured) -> PhaseResults:
    """pyvlm's server with default flags but the dummy weights, the dtype,
    the CPU's pool and --server-args; each phase's rows print as it ends.
    When no phase ends (the server did not start), no results but the
    reason, and the run goes on: transformers' numbers stay."""
    from benchmarks.load.local_server import measure_server

    extra = shlex.split(args.server_args)
    flags = ["--model", str(folder), "--load-format", "dummy", "--device", args.device,
             "--dtype", str(dtype).replace("torch.", ""), "--log-level", args.server_log_level]
    if args.device == "cpu" and "--max-total-tokens" not in extra:
        # the OS commits a CPU pool as written; the default follows free RAM
        flags += ["--max-total-tokens", str(cpu_pool_tokens(plan, measured.shape))]

    def on_phase(results: PhaseResults) -> None:
        measured.ours = results
        log(f"pyvlm {results.phases[-1]} done")
        print_rows(table.rows_of(results.phases[-1], measured))

    log("pyvlm server")
    try:
        return measure_server(flags + extra, plan, args.model, image_size_for(args.model),
                              args.photos, on_phase)
    except SystemExit as exc:
        log(f"pyvlm: {exc}")
        return PhaseResults(errors=[str(exc)])


def cpu_pool_tokens(plan: Plan, shape) -> int:
    """A KV pool for every concurrent request of the largest phase with room
    to spare; it also holds each image's cross-attention K/V rows (mllama)."""
    per_request = shape.num_image_rows + max(
        shape.num_prompt_tokens + plan.output_tokens,
        plan.step_context + plan.step_output_tokens)
    return (max(plan.concurrency, plan.step_concurrency) * per_request * 5 // 4
            + CPU_POOL_SLACK_TOKENS)


def print_rows(rows: List[table.Row]) -> None:
    print("\n".join(table.markdown_line(row.cells()) for row in rows), flush=True)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --- the report -----------------------------------------------------------------------

def title(run: E2ERun) -> str:
    args, rates, shape = run.args, run.rates, run.measured.shape
    width, height = image_size_for(args.model)
    cross = (f", {shape.num_image_rows} cross-attention K/V rows read per decode step"
             if shape.num_image_rows else "")
    return (f"**{args.model}** {str(dtype_for(args.device)).replace('torch.', '')}, random "
            f"weights · copy {_si(rates.copy_bytes_per_s, 'B/s')}, matmul "
            f"{_si(rates.matmul_flops_per_s, 'FLOP/s')} (this run) · prompt "
            f"{shape.num_prompt_tokens} tokens with one {width}x{height} image = "
            f"{shape.num_tower_tokens} vision-tower rows{cross}")


def notes(run: E2ERun) -> str:
    theirs, ours = run.measured.theirs, run.measured.ours
    parts = []
    if theirs is not None:
        sweep = ", ".join(f"batch {b}: {'OOM' if t is None else f'{t:.1f}'}"
                          for b, t in theirs.batched_tokens_per_s.items())
        parts.append(f"transformers batched output tok/s: {sweep}; its TTFT is generate of "
                     "one token on prepared inputs (its processor and the copy to the device "
                     f"took {hf_baseline.median_ms(theirs.preprocess_s):.1f} ms more, p50).")
    if ours.num_prompt_tokens:
        parts.append(f"pyvlm's usage for the one-image prompt: {ours.num_prompt_tokens} tokens; "
                     "its TTFT is at the HTTP client (upload, JPEG decode, preprocessing).")
    if "step" in ours.phases:
        parts.append(f"Step phase: {ours.step_num_ok}/{ours.step_num_requests} requests ok, "
                     f"prompts of {ours.step_prompt_tokens:.0f} tokens (mean), "
                     f"{ours.step_num_steps:.0f} steps with all decoding at a mean context of "
                     f"{ours.step_context:.0f} tokens.")
    if "throughput" in ours.phases:
        parts.append(f"Throughput phase: {ours.num_ok}/{ours.num_requests} requests ok in "
                     f"{ours.wall_s:.2f} s.")
    if ours.steps_by_path:
        parts.append("Model steps by path (decode graph / piecewise graphs / eager): " + "; ".join(
            f"{phase} {paths.get('decode_graph', 0)} / {paths.get('piecewise_graphs', 0)} / "
            f"{paths.get('eager', 0)}" for phase, paths in ours.steps_by_path.items()) + ".")
    if ours.errors:
        parts.append(f"Errors: {'; '.join(ours.errors)}.")
    parts.append("Random weights: transformers' own init for it, `--load-format dummy` for "
                 "pyvlm (uniform in +-1e-3). Floors: benchmarks/offline/roofline.py at this "
                 "run's rates (decode: weight and KV bytes at the copy bandwidth; prefill: "
                 "FLOPs of the linear layers and of attention (the vision tower's within its "
                 "segments, the prompt's causal self-attention, mllama's cross-attention; "
                 "no padding rows), vision tower included, at the matmul rate).")
    return " ".join(parts)


def section(run: E2ERun) -> str:
    """The RESULTS.md section: heading, command, title, table, notes."""
    import transformers

    rows = table.all_rows(run.measured)
    lines = [table.section_heading(run.args.model, card(run.args.device), torch.__version__,
                                   transformers.__version__, commit()), "",
             "`python benchmarks/bench_e2e_gpu.py " + shlex.join(run.args.argv) + "`", "",
             title(run), "", *table.head_lines(),
             *(table.markdown_line(row.cells()) for row in rows), "", notes(run)]
    return "\n".join(lines) + "\n"


def add_section(path: Path, text: str) -> None:
    """Puts text before the first section of path (newest first, as
    RESULTS.md keeps them), or at its end when it has none."""
    old = path.read_text() if path.exists() else ""
    at = old.find("\n## ")
    new = old + ("\n" if old else "") + text if at < 0 else \
        old[:at + 1] + text + "\n" + old[at + 1:]
    path.write_text(new)


def run_json(run: E2ERun) -> dict:
    m = run.measured
    return {"model": run.args.model, "device": card(run.args.device), "commit": commit(),
            "argv": run.args.argv, "rates": asdict(run.rates), "cost": asdict(m.roofline.cost),
            "shape": asdict(m.shape), "plan": asdict(m.plan),
            "transformers": None if m.theirs is None else asdict(m.theirs),
            "pyvlm": asdict(m.ours), "rows": [r.cells() for r in table.all_rows(m)]}


def _si(value: float, unit: str) -> str:
    """3 significant digits in G or T units: 4.08 TB/s, 61.2 GFLOP/s."""
    scale, prefix = (1e12, "T") if value >= 1e12 else (1e9, "G")
    return f"{value / scale:.3g} {prefix}{unit}"


def card(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def commit() -> str:
    """HEAD's short hash, "-dirty" when tracked files differ from it."""
    def git(*words) -> str:
        return subprocess.run(["git", *words], cwd=REPO, check=True, capture_output=True,
                              text=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short=7", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
