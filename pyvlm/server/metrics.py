"""Prometheus metrics in the text exposition format (version 0.0.4), with no
client library: counters and histograms kept here, gauges read from the
engine's stats when /metrics is scraped."""

import bisect
from typing import Dict, List, Mapping, Optional, Sequence

from pyvlm.scheduling.types import step_paths_of
from pyvlm.server.generation import Timing

PREFIX = "pyvlm"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    """Cumulative buckets, sum and count (Prometheus histogram)."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        self.name, self.help_text, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, labels: str) -> List[str]:
        out = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, num in zip(self.buckets + (float("inf"),), self.counts):
            cumulative += num
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{self.name}_bucket{{{labels},le="{le}"}} {cumulative}')
        out += [f"{self.name}_sum{{{labels}}} {self.total!r}",
                f"{self.name}_count{{{labels}}} {self.count}"]
        return out


class ServerMetrics:
    """Token counters and latency histograms of finished choices."""

    def __init__(self, model_name: str):
        self.labels = f'model_name="{_escape(model_name)}"'
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_requests: Dict[str, int] = {}
        self.ttft = Histogram(f"{PREFIX}:time_to_first_token_seconds",
                              "Time to first token.", TTFT_BUCKETS)
        self.tpot = Histogram(f"{PREFIX}:time_per_output_token_seconds",
                              "Time per output token after the first.", TPOT_BUCKETS)
        self.e2e = Histogram(f"{PREFIX}:e2e_request_latency_seconds",
                             "End-to-end latency of a choice.", E2E_BUCKETS)

    def on_request(self, endpoint: str, status: int) -> None:
        key = f'endpoint="{_escape(endpoint)}",status="{status}"'
        self.num_requests[key] = self.num_requests.get(key, 0) + 1

    def on_choice(self, timing: Timing, meta: Optional[Mapping], count_prompt: bool) -> None:
        """Records a finished choice (meta: its last meta_info, if any)."""
        if meta is None or timing.end is None:
            return
        num_tokens = meta["completion_tokens"]
        self.num_generation_tokens += num_tokens
        self.num_prompt_tokens += meta["prompt_tokens"] if count_prompt else 0
        self.e2e.observe(timing.end - timing.start)
        if timing.first_token is not None:
            self.ttft.observe(timing.first_token - timing.start)
            if num_tokens > 1:
                self.tpot.observe((timing.end - timing.first_token) / (num_tokens - 1))

    def render(self, stats: Mapping[str, float]) -> str:
        """The exposition text; stats: the engine's get_stats()."""
        lines: List[str] = []
        gauges = [("num_running_reqs", "Requests running in the engine."),
                  ("num_queued_reqs", "Requests waiting in the engine."),
                  ("token_usage", "Fraction of KV cache pages in use."),
                  ("cache_hit_rate", "Prompt tokens served by the prefix cache, as a fraction.")]
        for key, help_text in gauges:
            lines += self._gauge_lines(key, help_text, stats)
        lines += _sample(f"{PREFIX}:prompt_tokens_total", "counter", "Prompt tokens processed.",
                         self.labels, self.num_prompt_tokens)
        lines += _sample(f"{PREFIX}:generation_tokens_total", "counter", "Tokens generated.",
                         self.labels, self.num_generation_tokens)
        lines += self._request_lines()
        lines += self._step_path_lines(stats)
        for histogram in (self.ttft, self.tpot, self.e2e):
            lines += histogram.lines(self.labels)
        return "\n".join(lines) + "\n"

    def _gauge_lines(self, key: str, help_text: str, stats: Mapping) -> List[str]:
        """One sample; with data-parallel replicas (stats["replicas"]), one
        per replica labelled replica="i" instead, as vLLM labels its
        engines (an unlabelled total beside them would be counted twice
        by sum())."""
        replicas = stats.get("replicas")
        if not replicas:
            return _sample(f"{PREFIX}:{key}", "gauge", help_text, self.labels, stats.get(key, 0))
        name = f"{PREFIX}:{key}"
        return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"] + [
            f'{name}{{{self.labels},replica="{r["replica"]}"}} {r.get(key, 0)}'
            for r in replicas]

    def _step_path_lines(self, stats: Mapping) -> List[str]:
        """The engine's model steps by the way they ran (step_paths_of: decode
        graph, piecewise graphs, eager), one counter labelled by path (summed
        over data-parallel replicas)."""
        paths = step_paths_of(stats)
        if not paths:
            return []
        name = f"{PREFIX}:model_steps_total"
        return [f"# HELP {name} Model steps run, by path (CUDA graph or eager).",
                f"# TYPE {name} counter"] + [
            f'{name}{{{self.labels},path="{path}"}} {count}' for path, count in sorted(paths.items())]

    def _request_lines(self) -> List[str]:
        name = f"{PREFIX}:http_requests_total"
        lines = [f"# HELP {name} HTTP requests answered.", f"# TYPE {name} counter"]
        return lines + [f"{name}{{{self.labels},{key}}} {num}"
                        for key, num in sorted(self.num_requests.items())]


def _sample(name: str, kind: str, help_text: str, labels: str, value: float) -> List[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
