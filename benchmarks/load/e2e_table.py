"""The table of benchmarks/bench_e2e_gpu.py: one row per metric with pyvlm's
number, transformers' (where it has one), the floor of the same run
(benchmarks/offline/roofline.py), pyvlm's % of the floor, pyvlm against
transformers, and the GPU-speed issue's target (issue 12) with its verdict.

% of floor is always "floor / time" or "rate / floor", so 100% is the
floor itself; "vs transformers" is transformers' time / pyvlm's (or pyvlm's
rate / transformers'), so above 1x pyvlm is faster.
"""

import datetime
import statistics
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

from benchmarks.load.serving_phases import PhaseResults, Plan

# issue 12's targets
DECODE_MIN_OF_FLOOR = 0.85  # batch-1 decode tokens/s, of the roofline
STEP_MIN_OF_FLOOR = 0.70  # decode step at 64 running x ~3k context, of its floor
THROUGHPUT_MIN_OF_FLOOR = 0.75  # 256 requests @ 64 concurrent, output tokens/s
THROUGHPUT_MIN_VS_TRANSFORMERS = 12.0  # ... against transformers' best batched generate
ITL_MAX_P99_OVER_P50 = 3.0
TTFT_MAX_OVER_FLOOR = 1.5

HEAD = ["metric", "pyvlm", "transformers", "floor", "pyvlm % of floor", "pyvlm vs transformers",
        "target", "verdict"]


@dataclass(frozen=True)
class Row:
    """One metric: a time in ms (lower is better) or a rate (higher is).
    pyvlm None: not measured, and pyvlm_text says why."""

    metric: str
    is_time: bool
    target: str
    pyvlm: Optional[float] = None
    transformers: Optional[float] = None
    floor: Optional[float] = None
    is_met: Optional[bool] = None  # None: nothing to judge
    pyvlm_text: Optional[str] = None  # in place of the number

    @property
    def of_floor(self) -> Optional[float]:
        if self.pyvlm is None or self.floor is None:
            return None
        return self.floor / self.pyvlm if self.is_time else self.pyvlm / self.floor

    @property
    def vs_transformers(self) -> Optional[float]:
        if self.pyvlm is None or self.transformers is None:
            return None
        return (self.transformers / self.pyvlm if self.is_time
                else self.pyvlm / self.transformers)

    def cells(self) -> List[str]:
        verdict = {None: "n/a", True: "met", False: "**not met**"}[self.is_met]
        return [self.metric, self.pyvlm_text or _num(self.pyvlm), _num(self.transformers),
                _num(self.floor), _pct(self.of_floor), _times(self.vs_transformers),
                self.target, verdict]


@dataclass
class Measured:
    """Everything a row reads: the plan, the floors, one prompt's shape
    (hf_baseline.PromptShape), transformers' results (None: skipped),
    pyvlm's (PhaseResults, phases done so far) and the phases skipped."""

    plan: Plan
    roofline: object  # benchmarks.offline.roofline.Roofline
    shape: object
    theirs: Optional[object]
    ours: PhaseResults
    skipped: Tuple[str, ...] = ()

    def missing(self, phase: str) -> Optional[str]:
        """Why pyvlm has no number for the phase; None when it has."""
        if phase in self.ours.phases:
            return None
        return "skipped" if phase in self.skipped else "not run"


def ttft_row(m: Measured) -> Row:
    row = Row(f"TTFT ms, one fresh image, idle server (p50 of {m.plan.num_ttft})", True,
              f"<= {TTFT_MAX_OVER_FLOOR:g}x floor")
    if m.missing("ttft"):
        return replace(row, pyvlm_text=m.missing("ttft"))
    s = m.shape
    floor = m.roofline.ttft_s(s.num_prompt_tokens, s.num_tower_tokens, s.num_image_rows,
                              tower_attention=s.tower_attention) * 1e3
    ours = _median_ms(m.ours.ttft_s)
    return replace(row, pyvlm=ours, transformers=_median_ms(m.theirs.ttft_s) if m.theirs else None,
                   floor=floor, is_met=ours <= TTFT_MAX_OVER_FLOOR * floor)


def decode_row(m: Measured) -> Row:
    runs = f", median of {m.plan.decode_runs} runs" if m.plan.decode_runs > 1 else ""
    row = Row(f"decode tok/s, batch 1 ({m.plan.decode_tokens} tokens{runs})", False,
              f">= {_pct(DECODE_MIN_OF_FLOOR)} of floor")
    if m.missing("decode"):
        return replace(row, pyvlm_text=m.missing("decode"))
    s, ours = m.shape, m.ours.decode_tokens_per_s
    floor = m.roofline.decode_tokens_per_s(s.num_prompt_tokens + m.plan.decode_tokens / 2,
                                           s.num_image_rows)
    return replace(row, pyvlm=ours, transformers=m.theirs.decode_tokens_per_s if m.theirs else None,
                   floor=floor, is_met=ours >= DECODE_MIN_OF_FLOOR * floor)


def step_row(m: Measured) -> Row:
    """The decode step while every request of the step phase decodes; its
    floor reads the weights and each request's KV at the window's mean
    context (and, mllama, its image K/V)."""
    p, ours = m.plan, m.ours
    row = Row(f"decode step ms, {p.step_concurrency} running x ~{p.step_context:,}-token "
              "prompts", True, f">= {_pct(STEP_MIN_OF_FLOOR)} of floor")
    if m.missing("step"):
        return replace(row, pyvlm_text=m.missing("step"))
    if ours.step_s is None:
        return replace(row, pyvlm_text=f"n/a: {ours.step_num_ok}/{ours.step_num_requests} ok, "
                       "never all decoding at once")
    floor = m.roofline.decode_step_s(ours.step_num_requests, ours.step_context,
                                     m.shape.num_image_rows) * 1e3
    step_ms = ours.step_s * 1e3
    return replace(row, pyvlm=step_ms, floor=floor, is_met=floor >= STEP_MIN_OF_FLOOR * step_ms)


def throughput_row(m: Measured) -> Row:
    """pyvlm's requests against transformers' best batch of its sweep (the
    12x part of the target is judged only where transformers ran)."""
    p, s, ours = m.plan, m.shape, m.ours
    best = m.theirs.best_batch if m.theirs else None
    row = Row(f"output tok/s, {p.num_requests} requests x {p.output_tokens} tokens, "
              f"{p.concurrency} concurrent, distinct images (transformers: "
              f"{f'best batch {best}' if best else 'none'})", False,
              f">= {_pct(THROUGHPUT_MIN_OF_FLOOR)} of floor and >= "
              f"{THROUGHPUT_MIN_VS_TRANSFORMERS:g}x transformers")
    if m.missing("throughput"):
        return replace(row, pyvlm_text=m.missing("throughput"))
    floor = m.roofline.throughput_tokens_per_s(p.num_requests, p.concurrency,
                                               s.num_prompt_tokens, s.num_tower_tokens,
                                               p.output_tokens, s.num_image_rows,
                                               tower_attention=s.tower_attention)
    theirs = m.theirs.batched_tokens_per_s[best] if best else None
    rate = ours.output_tokens_per_s
    met = rate >= THROUGHPUT_MIN_OF_FLOOR * floor and (
        theirs is None or rate >= THROUGHPUT_MIN_VS_TRANSFORMERS * theirs)
    return replace(row, pyvlm=rate, transformers=theirs, floor=floor, is_met=met)


def itl_row(m: Measured) -> Row:
    """Inter-token latency of the throughput phase's streams; the floor is
    one decode step of `concurrency` requests at half the output."""
    p, s, ours = m.plan, m.shape, m.ours
    row = Row(f"inter-token ms p50 / p99, the same {p.num_requests} requests", True,
              f"p99 <= {ITL_MAX_P99_OVER_P50:g}x p50")
    if m.missing("throughput"):
        return replace(row, pyvlm_text=m.missing("throughput"))
    floor = m.roofline.decode_step_s(p.concurrency, s.num_prompt_tokens + p.output_tokens / 2,
                                     s.num_image_rows) * 1e3
    p50, p99 = ours.itl_p50_s * 1e3, ours.itl_p99_s * 1e3
    return replace(row, pyvlm=p50, floor=floor, is_met=p99 <= ITL_MAX_P99_OVER_P50 * p50,
                   pyvlm_text=f"{p50:.1f} / {p99:.1f} (p99 = {p99 / p50:.2f}x p50)")


ROWS_OF_PHASE: Dict[str, List[Callable[[Measured], Row]]] = {
    "ttft": [ttft_row], "decode": [decode_row], "step": [step_row],
    "throughput": [throughput_row, itl_row]}


def rows_of(phase: str, m: Measured) -> List[Row]:
    return [row(m) for row in ROWS_OF_PHASE[phase]]


def all_rows(m: Measured) -> List[Row]:
    """Every metric, in the order the phases run."""
    return [row for phase in ROWS_OF_PHASE for row in rows_of(phase, m)]


def markdown_line(cells: List[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def head_lines() -> List[str]:
    return [markdown_line(HEAD), "|" + "---|" * len(HEAD)]


def section_heading(model: str, card: str, torch_version: str, transformers_version: str,
                    commit: str, when: Optional[datetime.datetime] = None) -> str:
    """The RESULTS.md heading of one model's table."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    return (f"## End to end: {model} against transformers and its floors · "
            f"{when:%Y-%m-%d %H:%M} UTC · {card} · torch {torch_version}, transformers "
            f"{transformers_version} · commit {commit}")


def _median_ms(seconds) -> float:
    return statistics.median(seconds) * 1e3


def _num(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def _pct(fraction: Optional[float]) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def _times(ratio: Optional[float]) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"
