"""Latency and throughput of pyvlm's server beside transformers `generate`,
on a random-weight model of a real shape (no download), with the roofline of
the same run, printed as a markdown table for benchmarks/RESULTS.md:

- TTFT of one fresh image on an idle server (644x476: one 336-pixel tile
  for LLaVA-1.5, the base tile + a 2x2 grid for LLaVA-NeXT; Llama-3.2-
  Vision: 1120x840, which it cuts into 4 tiles);
- batch-1 decode tokens/s (with a published reference where one is known:
  SGLang's for Llama-3.2-11B-Vision);
- output tokens/s of concurrent requests with distinct images (pyvlm: 64 at
  a time; transformers: its best batch of --hf-batch-sizes).

  python benchmarks/bench_latency_vs_transformers.py --model qwen2-vl-7b --device cuda
  python benchmarks/bench_latency_vs_transformers.py --model llava-onevision-7b --device cuda
  python benchmarks/bench_latency_vs_transformers.py --model llama-3.2-11b-vision --device cuda
  python benchmarks/bench_latency_vs_transformers.py --model llava-1.5-7b --device cuda
  python benchmarks/bench_latency_vs_transformers.py --model llava-next-7b --device cuda
  python benchmarks/bench_latency_vs_transformers.py --model qwen2-vl-7b-narrow  # CPU

One process builds the model once (transformers' random init on the device,
bf16 on CUDA), measures transformers on it (benchmarks/offline/hf_baseline.py),
copies its weights into pyvlm's model, frees transformers' copy, and serves
pyvlm's with `python -m pyvlm`'s own Launcher on a free loopback port with
default flags; the HTTP client (benchmarks/load/serving_phases.py) runs in a
child process. The floors (benchmarks/offline/roofline.py) use the copy
bandwidth and matmul rate measured at the start of the run.
"""

import argparse
import asyncio
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
# Run as a script, its own folder leads sys.path, and benchmarks/kernels
# would shadow the `kernels` distribution that transformers imports when it
# is installed; the repository root takes its place.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]

from benchmarks.load.serve_random import SHAPES, config_for, launcher_for  # noqa: E402
from pyvlm.server.launch import run_loop  # noqa: E402
from benchmarks.load.serving_phases import PhaseResults, Plan, image_size_for  # noqa: E402
from benchmarks.offline import hf_baseline  # noqa: E402
from benchmarks.offline.roofline import (DeviceRates, Roofline, cost_for,  # noqa: E402
                                         measure_rates)

CPU_POOL_SLACK_TOKENS = 4096
# Published batch-1 decode tokens/s of the real model by another engine,
# printed beside the batch-1 row (not measured here: other card and setup).
PUBLISHED_DECODE = {
    # SGLang's batch-1 decode of meta-llama/Llama-3.2-11B-Vision-Instruct,
    # from the seed's own log (that run's card and settings, not this one's).
    "llama-3.2-11b-vision": ("SGLang", 33.6),
}


def log(message: str) -> None:
    print(f"[bench {datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=SHAPES)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--photos", type=Path, default=None,
                        help="folder of photos to crop the images from (default: the shared ones)")
    parser.add_argument("--num-ttft", type=int, default=8, help="sequential TTFT requests")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=None,
                        help="throughput phase requests (default: --concurrency)")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--hf-batch-sizes", default="16,32,64",
                        help="transformers batches tried for throughput (comma-separated)")
    parser.add_argument("--server-args", default="", help="more server flags, one string")
    parser.add_argument("--server-log-level", default="warning")
    parser.add_argument("--json-out", type=Path, default=None, help="every number, as JSON")
    args = parser.parse_args(argv)
    if args.photos is not None and not args.photos.is_dir():
        parser.error(f"--photos {args.photos}: no such folder")
    args.num_requests = args.num_requests or args.concurrency
    args.hf_batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",") if b]
    return args


def plan_of(args) -> Plan:
    return Plan(num_warmup=min(8, args.concurrency), num_ttft=args.num_ttft,
                decode_tokens=args.decode_tokens, num_requests=args.num_requests,
                concurrency=args.concurrency, output_tokens=args.output_tokens)


# --- pyvlm through its server ---------------------------------------------------------

def server_flags(args, folder: Path, port: int, pool_tokens: int) -> List[str]:
    flags = ["--model", str(folder), "--host", "127.0.0.1", "--port", str(port),
             "--device", args.device, "--served-model-name", args.model,
             "--log-level", args.server_log_level, *shlex.split(args.server_args)]
    if args.device == "cpu" and "--max-total-tokens" not in flags:
        flags += ["--max-total-tokens", str(pool_tokens)]  # the OS commits a CPU pool as written
    return flags


def client_command(args, base_url: str, json_out: Path) -> List[str]:
    plan = plan_of(args)
    width, height = image_size_for(args.model)
    command = [sys.executable, "-m", "benchmarks.load.serving_phases", "--base-url", base_url,
               "--model", args.model, "--json-out", str(json_out),
               "--image-size", f"{width}x{height}"]
    for name, value in asdict(plan).items():
        command += ["--" + name.replace("_", "-"), str(value)]
    return command + (["--photos", str(args.photos)] if args.photos else [])


async def serve_while_client_runs(launcher, command: List[str]) -> int:
    """Serves until the client process exits (or the server stops first,
    when it could not start: then the client is stopped); the client's exit
    status."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    serving = asyncio.ensure_future(launcher.run())
    child = await asyncio.create_subprocess_exec(*command, cwd=REPO, env=env)
    waiting = asyncio.ensure_future(child.wait())
    await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():
        child.terminate()
    status = await waiting
    launcher.stop.set()
    await serving
    return status


def measure_pyvlm(model, folder: Path, args, pool_tokens: int) -> PhaseResults:
    from benchmarks.load.server import free_port
    from pyvlm.cli import build_server_parser
    from pyvlm.server.args import server_args_from

    port = free_port()
    server_args = server_args_from(build_server_parser().parse_args(
        server_flags(args, folder, port, pool_tokens)))
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    server_args = replace(server_args, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="pyvlm-phases-") as scratch:
        json_out = Path(scratch) / "phases.json"
        command = client_command(args, f"http://127.0.0.1:{port}/v1", json_out)
        status = run_loop(serve_while_client_runs(launcher_for(server_args, model), command))
        if status != 0 or not json_out.exists():
            raise SystemExit(f"the serving phases failed (client exit status {status})")
        return PhaseResults(**json.loads(json_out.read_text()))


# --- the run ----------------------------------------------------------------------------

@dataclass
class Run:
    args: argparse.Namespace
    rates: DeviceRates
    roofline: Roofline
    theirs: hf_baseline.TransformersResults
    ours: PhaseResults


def main(argv=None) -> Run:
    args = parse_args(argv)
    logging.basicConfig(level=args.server_log_level.upper(), format="[%(asctime)s] %(message)s")
    rates = measure_rates(args.device)
    log(f"copy {_si(rates.copy_bytes_per_s, 'B/s')}, matmul "
        f"{_si(rates.matmul_flops_per_s, 'FLOP/s')}; building {args.model}")
    with tempfile.TemporaryDirectory(prefix=f"pyvlm-{args.model}-") as scratch:
        folder = Path(scratch)
        theirs, model = measure_transformers_then_copy(args, folder)
        cost = cost_for(model, config_for(args.model))
        log("pyvlm server")
        ours = measure_pyvlm(model, folder, args, cpu_pool_tokens(args, theirs))
        log("pyvlm done")
    run = Run(args, rates, Roofline(cost, rates), theirs, ours)
    print(report(run))
    if args.json_out:
        args.json_out.write_text(json.dumps(run_json(run), indent=1))
    return run


def measure_transformers_then_copy(args, folder: Path):
    """Writes the checkpoint metadata into folder, builds transformers'
    random model, measures it, and returns (its results, pyvlm's model with
    its weights); transformers' copy is freed."""
    from benchmarks.load.images import distinct_pictures
    from benchmarks.offline.random_models import (pyvlm_model_from, random_hf_model,
                                                  write_checkpoint_metadata)

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    config = config_for(args.model)
    write_checkpoint_metadata(folder, config)
    hf = random_hf_model(config, args.device, dtype)
    images = distinct_pictures(max(args.num_ttft, *args.hf_batch_sizes),
                               image_size_for(args.model), args.photos)
    log("transformers generate")
    theirs = hf_baseline.measure(hf, folder, images, args.num_ttft, args.decode_tokens,
                                 args.hf_batch_sizes, args.output_tokens)
    log(f"transformers done: {theirs}")
    model = pyvlm_model_from(hf, args.device, dtype)
    del hf
    _free(args.device)
    return theirs, model


def cpu_pool_tokens(args, theirs) -> int:
    """A KV pool for every concurrent request with room to spare (used on
    CPU only, where the default pool follows free RAM). pyvlm's pool also
    holds each image's cross-attention K/V rows (Llama-3.2-Vision)."""
    per_request = theirs.num_prompt_tokens + args.output_tokens + theirs.num_image_rows
    return args.concurrency * per_request * 5 // 4 + CPU_POOL_SLACK_TOKENS


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --- the table ----------------------------------------------------------------------------

def header(run: Run) -> str:
    import transformers

    args, rates = run.args, run.rates
    width, height = image_size_for(args.model)
    return (f"**{args.model}** {'bf16' if args.device.startswith('cuda') else 'float32'}, "
            f"random weights · {card(args.device)} · {datetime.date.today().isoformat()} · "
            f"commit {commit()} · torch {torch.__version__}, transformers "
            f"{transformers.__version__} · measured copy bandwidth "
            f"{_si(rates.copy_bytes_per_s, 'B/s')}, matmul "
            f"{_si(rates.matmul_flops_per_s, 'FLOP/s')}"
            f" · prompt "
            f"{run.theirs.num_prompt_tokens} tokens (pyvlm's usage: {run.ours.num_prompt_tokens}),"
            f" one {width}x{height} image = {run.theirs.num_tower_tokens} "
            f"vision-tower rows{image_rows_note(run.theirs.num_image_rows)}")


def image_rows_note(num_image_rows: int) -> str:
    if not num_image_rows:
        return ""
    return (f" (transformers runs every tile slot, padded), {num_image_rows} cross-attention "
            "K/V rows read per decode step")


def ttft_row(run: Run) -> List[str]:
    theirs, ours = run.theirs, run.ours
    floor = run.roofline.ttft_s(theirs.num_prompt_tokens, theirs.num_tower_tokens,
                                theirs.num_image_rows) * 1e3
    ms_theirs, ms_ours = (hf_baseline.median_ms(t) for t in (theirs.ttft_s, ours.ttft_s))
    return [f"TTFT ms, one fresh image, idle server (p50 of {len(ours.ttft_s)})",
            f"{ms_theirs:.1f}", f"{ms_ours:.1f}", f"{ms_theirs / ms_ours:.2f}x", f"{floor:.1f}",
            _pct(floor / ms_theirs), _pct(floor / ms_ours)]


def decode_row(run: Run) -> List[str]:
    args, theirs, ours = run.args, run.theirs.decode_tokens_per_s, run.ours.decode_tokens_per_s
    roof = run.roofline.decode_tokens_per_s(run.theirs.num_prompt_tokens + args.decode_tokens / 2,
                                            run.theirs.num_image_rows)
    return [f"decode tok/s, batch 1 ({args.decode_tokens} tokens)", f"{theirs:.1f}",
            f"{ours:.1f}", f"{ours / theirs:.2f}x", f"{roof:.1f}", _pct(theirs / roof),
            _pct(ours / roof)]


def throughput_row(run: Run) -> List[str]:
    """pyvlm's concurrent requests against transformers' best batch (each
    as a fraction of the roofline of its own batching)."""
    args, best = run.args, run.theirs.best_batch
    shape = (run.theirs.num_prompt_tokens, run.theirs.num_tower_tokens, args.output_tokens,
             run.theirs.num_image_rows)
    roof = run.roofline.throughput_tokens_per_s(args.num_requests, args.concurrency, *shape)
    ours = run.ours.output_tokens_per_s
    label = (f"output tok/s, {args.num_requests} requests x {args.output_tokens} tokens, "
             f"{args.concurrency} concurrent, distinct images (transformers: batch {best})")
    if best is None:
        return [label, "OOM", f"{ours:.1f}", "n/a", f"{roof:.1f}", "n/a", _pct(ours / roof)]
    theirs = run.theirs.batched_tokens_per_s[best]
    theirs_roof = run.roofline.throughput_tokens_per_s(best, best, *shape)
    return [label, f"{theirs:.1f}", f"{ours:.1f}", f"{ours / theirs:.2f}x", f"{roof:.1f}",
            _pct(theirs / theirs_roof), _pct(ours / roof)]


def rows(run: Run) -> List[List[str]]:
    return [ttft_row(run), decode_row(run), throughput_row(run)]


def notes(run: Run) -> str:
    ours = run.ours
    sweep = ", ".join(f"batch {b}: {_num(t)}" for b, t in run.theirs.batched_tokens_per_s.items())
    errors = f"; errors: {ours.errors}" if ours.errors else ""
    return (f"transformers batched output tok/s: {sweep}. pyvlm: {ours.num_ok}/{ours.num_requests}"
            f" requests ok in {ours.wall_s:.2f} s{errors}. TTFT: pyvlm's at the HTTP client "
            "(upload, JPEG decode and preprocessing included), transformers' generate of one "
            "token on prepared inputs (its processor and the copy to the device took "
            f"{hf_baseline.median_ms(run.theirs.preprocess_s):.1f} ms more, p50). Roofline: "
            "benchmarks/offline/roofline.py (transformers' throughput against its own batch's).")


def report(run: Run) -> str:
    head = ["metric", "transformers", "pyvlm", "pyvlm vs transformers", "roofline",
            "transformers % of roofline", "pyvlm % of roofline"]
    lines = [header(run), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(run)]
    reference = published_line(run)
    return "\n".join(lines + ([""] + [reference] if reference else []) + ["", notes(run)])


def published_line(run: Run) -> Optional[str]:
    """The batch-1 row beside another engine's published number for the
    real model (none for the narrow shapes: another model)."""
    if run.args.model not in PUBLISHED_DECODE:
        return None
    engine, tokens_per_s = PUBLISHED_DECODE[run.args.model]
    ours = run.ours.decode_tokens_per_s
    return (f"Reference for the batch-1 decode row: {engine}'s published {tokens_per_s:.1f} "
            f"tok/s for this model (its own run and card, not this run's); pyvlm here "
            f"{ours:.1f} tok/s = {ours / tokens_per_s:.2f}x of it, transformers "
            f"{run.theirs.decode_tokens_per_s / tokens_per_s:.2f}x.")


def _si(value: float, unit: str) -> str:
    """3 significant digits in G or T units: 4.08 TB/s, 61.2 GFLOP/s."""
    scale, prefix = (1e12, "T") if value >= 1e12 else (1e9, "G")
    return f"{value / scale:.3g} {prefix}{unit}"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def _num(value: Optional[float]) -> str:
    return "OOM" if value is None else f"{value:.1f}"


def card(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO,
                              check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_json(run: Run) -> dict:
    return {"model": run.args.model, "device": card(run.args.device), "commit": commit(),
            "rates": asdict(run.rates), "cost": asdict(run.roofline.cost),
            "transformers": asdict(run.theirs), "pyvlm": asdict(run.ours), "rows": rows(run),
            "published_decode": PUBLISHED_DECODE.get(run.args.model),
            "decode_step_bytes": run.roofline.decode_step_bytes(
                1, run.theirs.num_prompt_tokens + run.args.decode_tokens / 2,
                run.theirs.num_image_rows)}


if __name__ == "__main__":
    main()
