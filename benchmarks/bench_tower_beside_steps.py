"""Can a vision tower run beside the decode steps without slowing them?
On one GPU, in one run: a decode-like step (bandwidth-bound: 64 rows
through `--weights-gb` of bfloat16 weights) alone, a tower-like call
(compute-bound: Llama-3.2-Vision's 6,432 rows through 1280-wide GEMMs and
attention at head_dim 80) alone, and the step while the tower runs
  - in the step that carries it, on one stream (pyvlm's default: that
    step takes the step's time plus the tower's),
  - beside it on a side stream of lower priority than the step's (pyvlm's
    `--vision-side-stream`: on an H100 a Qwen2-VL decode step beside a
    tower took 29-31 ms against 6.9 alone, benchmarks/RESULTS.md),
  - beside it on a CUDA green context's stream of N SMs, the step keeping
    the rest (pyvlm's --vision-tower-sms N: pyvlm/runner/tower_stream.py;
    the rows say why where the build or driver cannot).
Each row gives the step's mean time while the tower runs, the tower's
time, and both against their times alone.

    python benchmarks/bench_tower_beside_steps.py [--sms 16,32,48,66] [--weights-gb 8]
"""

import argparse
import os
import statistics
import sys
from typing import Callable, List

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyvlm.runner.tower_stream import tower_side_stream  # noqa: E402

ROWS, WIDTH, MLP, HEADS, LAYERS = 6432, 1280, 5120, 16, 8  # the tower: 8 of mllama's 40 layers


def decode_step(weights: List[torch.Tensor], rows: torch.Tensor) -> Callable[[], None]:
    """64 rows through every weight matrix in turn: reads them all once."""
    def run():
        for weight in weights:
            torch.matmul(rows, weight)
    return run


def tower_call(device) -> Callable[[], None]:
    """LAYERS pre-norm layers of mllama's tower shape (no gates)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=gen) * 0.02

    hidden = rand(ROWS, WIDTH)
    qkv, out, up, down = rand(WIDTH, 3 * WIDTH), rand(WIDTH, WIDTH), rand(WIDTH, MLP), rand(MLP, WIDTH)

    def run():
        x = hidden
        for _ in range(LAYERS):
            q, k, v = (x @ qkv).view(1, ROWS, 3, HEADS, WIDTH // HEADS).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2))
            x = x + a.transpose(1, 2).reshape(ROWS, WIDTH) @ out
            x = x + F.gelu(F.layer_norm(x, (WIDTH,)) @ up) @ down
    return run


def timed_ms(run: Callable[[], None], stream: torch.cuda.Stream) -> Callable[[], float]:
    """run on stream between two events; the returned reader waits for them."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        run()
        end.record()
    return lambda: (end.synchronize(), start.elapsed_time(end))[1]


def alone_ms(run: Callable[[], None], stream: torch.cuda.Stream, repeats: int) -> float:
    for _ in range(2):
        timed_ms(run, stream)()
    return statistics.median(timed_ms(run, stream)() for _ in range(repeats))


def beside(step: Callable[[], None], step_stream: torch.cuda.Stream, tower: Callable[[], None],
           tower_stream: torch.cuda.Stream) -> tuple:
    """(mean step ms while the tower runs, tower ms, steps run): the tower
    is queued first, then steps back to back until it is done."""
    torch.cuda.synchronize()
    tower_done = timed_ms(tower, tower_stream)
    finished = torch.cuda.Event()
    finished.record(tower_stream)
    steps = []
    while not finished.query() or not steps:
        steps.append(timed_ms(step, step_stream)())
    return statistics.mean(steps), tower_done(), len(steps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sms", default="16,32,48,66", help="green contexts' SM counts")
    parser.add_argument("--weights-gb", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    count = max(1, int(args.weights_gb * 2**30 / (4096 * 14336 * 2)))
    weights = [torch.randn(4096, 14336, device=device, dtype=torch.bfloat16) for _ in range(count)]
    rows = torch.randn(64, 4096, device=device, dtype=torch.bfloat16)
    step, tower = decode_step(weights, rows), tower_call(device)
    main_stream = torch.cuda.current_stream(device)
    high, low = torch.cuda.Stream(device, priority=-1), torch.cuda.Stream(device, priority=0)
    step_alone, tower_alone = alone_ms(step, main_stream, args.repeats), alone_ms(tower, main_stream,
                                                                                  args.repeats)
    nbytes = count * 4096 * 14336 * 2
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}: step "
          f"{step_alone:.2f} ms alone ({nbytes / step_alone / 1e9:.0f} GB/s), tower "
          f"{tower_alone:.2f} ms alone\n")
    print("| tower runs | step ms while it runs (x alone) | tower ms (x alone) | steps beside it |")
    print("|---|---|---|---|")
    carrying = step_alone + tower_alone
    print(f"| in the step that carries it, one stream (pyvlm's default) | {carrying:.2f} "
          f"({carrying / step_alone:.2f}x, that one step) | {tower_alone:.2f} (1.00x) | 0 |")
    rows_out = [("beside, priority streams (step -1, tower 0)", high, low)]
    for num_sms in (int(s) for s in args.sms.split(",") if s and int(s) > 0):
        try:
            stream = tower_side_stream(device, num_sms)  # pyvlm's --vision-tower-sms
        except (RuntimeError, ValueError) as exc:  # no green-context streams, an old driver
            print(f"| green context of {num_sms} SMs | n/a: {str(exc)[:160]} | | |")
            continue
        rows_out.append((f"beside, green context of {num_sms} SMs (step on the rest)", high, stream))
    for label, step_stream, tower_stream in rows_out:
        try:
            beside(step, step_stream, tower, tower_stream)  # warm-up of the pair
            step_ms, tower_ms, num_steps = beside(step, step_stream, tower, tower_stream)
        except RuntimeError as exc:  # e.g. events across a green context refused by the driver
            print(f"| {label} | failed: {str(exc).splitlines()[0][:160]} | | |")
            continue
        print(f"| {label} | {step_ms:.2f} ({step_ms / step_alone:.2f}x) | {tower_ms:.2f} "
              f"({tower_ms / tower_alone:.2f}x) | {num_steps} |")


if __name__ == "__main__":
    main()
