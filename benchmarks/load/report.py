"""Tables and numbers of the load tools: percentiles, outcomes by kind,
latency by time window, and the pass/fail checks."""

import math
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from benchmarks.load.workload import Outcome

LABEL_ORDER = ("ok", "cancelled", "refused", "client_error", "server_error", "stream_error",
               "incomplete", "timeout", "connection_error")


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The nearest-rank q-quantile (0 < q <= 1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered) - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def ms(values: Sequence[float], qs=(0.5, 0.9, 0.99)) -> str:
    """'p50 / p90 / p99' in milliseconds, 'n/a' for no values."""
    if not values:
        return "n/a"
    return " / ".join(f"{percentile(values, q) * 1e3:.0f}" for q in qs)


def markdown(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def outcome_table(outcomes: List[Outcome], unexpected: Dict[str, int]) -> str:
    """Requests by kind and label, and how many of each kind were unexpected."""
    by_kind: Dict[str, Counter] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, Counter())[o.label] += 1
    labels = [l for l in LABEL_ORDER if any(c[l] for c in by_kind.values())]
    rows = [[kind, sum(c.values()), *(c[l] for l in labels), unexpected.get(kind, 0)]
            for kind, c in sorted(by_kind.items())]
    total = Counter(o.label for o in outcomes)
    rows.append(["**all**", len(outcomes), *(total[l] for l in labels),
                 sum(unexpected.values())])
    return markdown(["kind", "requests", *labels, "unexpected"], rows)


def window_table(outcomes: List[Outcome], t0: float, window_s: float,
                 rss: Optional[Dict[int, str]] = None) -> str:
    """Per window of start time: requests, completed, TTFT, end-to-end and
    (given window index -> text) the server's peak memory."""
    windows: Dict[int, List[Outcome]] = {}
    for o in outcomes:
        windows.setdefault(int((o.start - t0) // window_s), []).append(o)
    rows = []
    for index in sorted(windows):
        done = [o for o in windows[index] if o.label == "ok"]
        ttft = [o.ttft for o in done if o.ttft is not None]
        rows.append([f"{index * window_s:.0f}-{(index + 1) * window_s:.0f} s", len(windows[index]),
                     len(done), len(ttft), ms(ttft), ms([o.e2e for o in done]),
                     (rss or {}).get(index, "n/a")])
    return markdown(["window", "requests", "ok", "streams", "TTFT ms p50/p90/p99",
                     "end-to-end ms p50/p90/p99", "peak RSS"], rows)


@dataclass
class Check:
    name: str
    passed: bool
    value: str

    def row(self):
        return [self.name, "pass" if self.passed else "**FAIL**", self.value]


def checks_table(checks: List[Check]) -> str:
    return markdown(["check", "result", "measured"], [c.row() for c in checks])


def mib(num_bytes: Optional[int]) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.0f} MiB"
