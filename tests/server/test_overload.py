"""benchmarks/overload.py on the tiny checkpoint: the sustainable rate is
measured, then requests arrive at 10x that rate for 12 s against
`python -m pyvlm --max-running-requests 8 --max-queued-requests 8`.

Asserted: every admitted request ends complete (whole answer, or a stream
ending in [DONE]); every refusal is a 429 with Retry-After, and there are
refusals (the overload was real); no 5xx, timeout or connection error;
/health answers every probe (10 a second, 2 s timeout each) with a median
under 25 ms and at most 20% of probes over 100 ms; peak memory within 10%
of the sustainable phase's; idle afterwards with no pages held outside the
prefix cache.

Why those /health bounds: on the 2-core machine this was written on, shared
with other jobs (load average 4-10), six runs of this exact configuration
gave medians of 1.2-4.0 ms, 0-11% of probes over 100 ms and a slowest probe
of 45-1205 ms (the slow ones come in bursts when the cores are taken), so
"p99 < 100 ms" or a bound on the maximum would fail on noise alone; a
server whose event loop waits for the engine (the regression this guards
against) has a median in the hundreds of ms, or probes that time out. The
full 60 s run with the 1% bound is benchmarks/overload.py's default.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OVERLOAD_S = 12


def test_ten_times_the_sustainable_rate_on_the_tiny_model(tiny_checkpoint_qwen2, tmp_path):
    out = tmp_path / "summary.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/overload.py", "--model", str(tiny_checkpoint_qwen2),
         "--device", "cpu", "--measure-s", "8", "--seconds", str(OVERLOAD_S), "--factor", "10",
         "--max-tokens", "64", "--max-running-requests", "8", "--max-queued-requests", "8",
         "--health-limit-ms", "100", "--max-slow-fraction", "0.2", "--max-median-ms", "25",
         "--max-rss-growth", "0.1", "--log-dir", str(tmp_path), "--json-out", str(out),
         "--server-args", "--page-size 4 --context-length 1024 --max-total-tokens 8192"],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    summary = json.loads(out.read_text()) if out.exists() else {}
    report = f"seed {summary.get('seed')}\n{run.stdout[-5000:]}\n{run.stderr[-3000:]}"
    assert run.returncode == 0, report
    base, over = summary["phases"]
    assert set(over["outcomes"]) == {"ok", "refused"}, report
    assert over["outcomes"]["refused"] > over["outcomes"]["ok"] > 0, report  # 10x: most refused
    assert over["missing_retry_after"] == 0 and over["num_probe_failures"] == 0, report
    assert summary["stats_idle"]["num_used_pages"] == 0, report
