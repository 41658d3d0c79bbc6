"""Long fuzz runs of the HTTP request parser and of the JSON body -> prompt path.

    python benchmarks/fuzz.py http --seconds 600 [--engine auto|atheris|hypothesis]
                                   [--corpus DIR] [--max-len 4096]
    python benchmarks/fuzz.py body --seconds 600 [--endpoint /generate] [--max-failures 5]

http: the targets of tests/http/fuzz_targets.py (events or a ProtocolError;
the same outcome whole, cut anywhere and byte by byte; counted work within
a linear bound; CPU time growing less than size ** 1.5 when a segment is
pumped 64x). With atheris installed (`pip install atheris`; --engine auto
picks it) the run is coverage-guided by libFuzzer over pyvlm.http's
instrumented bytecode, starting from seed_corpus() (plus --corpus DIR,
where new inputs are kept) with HTTP_TOKENS as its dictionary. It prints
libFuzzer's progress lines, then the executions, edge coverage (`cov`),
features (`ft`) and corpus size, the lines of parser.py, head.py and
receive_buffer.py the corpus runs, and the file holding a failing input
if one was found (replay: `PYTHONPATH=. python -c "from
tests.http.fuzz_targets import fuzz_one_input as f;
f(open('FILE','rb').read())"`). Without atheris, hypothesis runs the same
checks from its strategies in batches. The last 20% of the time pumps
corpus entries (libFuzzer's final corpus, or the seed corpus without it):
each byte in turn, then random segments (the pumping check is too slow to
run per libFuzzer execution).

body: tests/server/body_fuzz_targets.py against the real App and a
pyvlm.Engine on the tiny random-weight checkpoint (CPU, written to a
temporary directory): arbitrary JSON bodies to /v1/chat/completions,
/v1/completions and /generate, streamed and not. Every answer must be 2xx
or an OpenAI-shaped 4xx with nothing logged at ERROR; a normal request
must still succeed after every batch. Prints the examples run, how the
answers were distributed, and each distinct failure with hypothesis's
falsifying example.

Run from the repository root. Exit status: 0 when nothing failed, 1 otherwise.
"""

import argparse
import asyncio
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PUMP_SHARE = 0.2  # http: this share of the time pumps corpus entries afterwards


# ---- shared: hypothesis in batches until the time is up ----------------------
class Campaign:
    """Runs a hypothesis property in batches until a deadline; collects
    answer labels and distinct failures."""

    def __init__(self, seconds: float, max_failures: int, batch: int):
        self.deadline = time.monotonic() + seconds
        self.max_failures, self.batch = max_failures, batch
        self.labels = collections.Counter()
        self.failures = {}  # signature -> report

    @property
    def num_examples(self) -> int:
        return sum(self.labels.values())

    def is_done(self) -> bool:
        return time.monotonic() >= self.deadline or len(self.failures) >= self.max_failures

    def run(self, strategy, check, between_batches=lambda: None) -> None:
        from hypothesis import HealthCheck, given, settings

        @settings(max_examples=self.batch, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), print_blob=True)
        @given(strategy)
        def one(case):
            if time.monotonic() < self.deadline:  # past it: let the batch drain cheaply
                self.labels[check(case)] += 1

        while not self.is_done():
            try:
                one()
            except Exception as exc:  # a property failed: record it, keep fuzzing
                self._record(exc)
            between_batches()
            print(f"  {self.num_examples} examples, {len(self.failures)} failures", flush=True)

    def _record(self, exc: BaseException) -> None:
        """One failure per distinct error (hypothesis groups several)."""
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                self._record(inner)
            return
        message = str(exc)
        signature = (type(exc).__name__, re.sub(r"\d+", "N", message)[:200])
        if signature in self.failures:
            return
        where = traceback.extract_tb(exc.__traceback__)[-1]
        notes = "\n".join(getattr(exc, "__notes__", []))  # hypothesis: the falsifying example
        text = (f"{type(exc).__name__} at {where.filename}:{where.lineno}: {message[:3000]}\n"
                f"{notes}")
        self.failures[signature] = text
        print(f"FAILURE {len(self.failures)}:\n{text}", flush=True)

    def report(self, title: str, group=lambda label: label.split(":")[0]) -> int:
        """Prints the totals per group of labels, the commonest labels and
        the failures; returns the exit status."""
        print(f"\n== {title}: {self.num_examples} examples, {len(self.failures)} distinct failures")
        totals = collections.Counter()
        for label, count in self.labels.items():
            totals[group(label)] += count
        for name, count in sorted(totals.items()):
            print(f"  {count:8d}  {name}")
        print("  the commonest answers, then any other error event or 5xx:")
        common = self.labels.most_common(25)
        rare = [(label, count) for label, count in self.labels.items()
                if ("error" in label or " 5" in label) and (label, count) not in common]
        for label, count in common + rare:
            print(f"  {count:8d}  {label}")
        for number, text in enumerate(self.failures.values(), 1):
            print(f"\n-- failure {number} --\n{text}")
        return 1 if self.failures else 0


# ---- http --------------------------------------------------------------------
def http_label(outcome) -> str:
    if hasattr(outcome, "time_ratio"):
        if not outcome.reference_factor:
            return "pumped 64x: time not compared (no smaller input took the same path)"
        return f"pumped 64x: time compared with the {outcome.reference_factor}x smaller input"
    num_requests = sum(type(e).__name__ == "EndOfRequest" for e in outcome.events)
    ending = f"error {outcome.error_status}" if outcome.error_status else "closed"
    return f"split: {min(num_requests, 3)}{'+' if num_requests > 3 else ''} requests, {ending}"


def http_with_hypothesis(args) -> int:
    from hypothesis import strategies as st

    from tests.http import fuzz_targets as ft

    splits = ft.split_cases.map(lambda case: ("split", case))
    cases = st.one_of(splits, splits, ft.pump_cases.map(lambda case: ("pump", case)),
                      st.binary(max_size=args.max_len).map(lambda buf: ("raw", buf)))

    def check(case):
        kind, value = case
        if kind == "raw":
            return http_label(ft.fuzz_one_input(value))
        return http_label(ft.check_splits(*value) if kind == "split" else ft.check_linear(*value))

    campaign = Campaign(args.seconds * (1 - PUMP_SHARE), args.max_failures, batch=2000)
    campaign.run(cases, check)
    status = campaign.report("http parser (hypothesis)")
    return max(status, pump_corpus(ft.seed_corpus(), args.seconds * PUMP_SHARE, args.max_failures))


def http_with_atheris(args) -> int:
    """libFuzzer in a child process (it exits the process when done); its
    output is echoed and its final statistics summarised."""
    from tests.http.fuzz_targets import HTTP_TOKENS, seed_corpus

    work = Path(tempfile.mkdtemp(prefix="pyvlm-fuzz-http-"))
    corpus = Path(args.corpus) if args.corpus else work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for number, entry in enumerate(seed_corpus()):
        (corpus / f"seed-{number}").write_bytes(entry)
    dictionary = work / "http.dict"
    dictionary.write_text("".join(f'"{_dict_escape(token)}"\n' for token in HTTP_TOKENS))
    fuzz_seconds = max(1, int(args.seconds * (1 - PUMP_SHARE)))
    command = [sys.executable, __file__, "_atheris_worker", f"-max_total_time={fuzz_seconds}",
               f"-max_len={args.max_len}", f"-dict={dictionary}", f"-artifact_prefix={work}/",
               "-print_final_stats=1", "-timeout=60", str(corpus)]
    print("running:", " ".join(command), flush=True)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=REPO, errors="replace")
    lines = []
    for line in child.stdout:
        lines.append(line.rstrip("\n"))
        if not line.startswith("#") or "NEW" not in line:  # NEW lines are too many to echo
            print(line, end="", flush=True)
    child.wait()
    status = _summarise_libfuzzer(lines, child.returncode, corpus)
    entries = [path.read_bytes() for path in corpus.iterdir()]
    print_line_coverage(entries)
    return max(status, pump_corpus(entries, args.seconds * PUMP_SHARE, args.max_failures))


COVERED_MODULES = ("pyvlm/http/parser.py", "pyvlm/http/head.py", "pyvlm/http/receive_buffer.py")


def print_line_coverage(entries) -> None:
    """Which lines of the parser's functions replaying the corpus runs (a
    settrace tracer; the executable lines come from the code objects)."""
    from tests.http.fuzz_targets import fuzz_one_input

    paths = {str(REPO / name): name for name in COVERED_MODULES}
    hit = collections.defaultdict(set)

    def trace_lines(frame, event, arg):
        if event == "line":
            hit[paths[frame.f_code.co_filename]].add(frame.f_lineno)
        return trace_lines

    sys.settrace(lambda frame, event, arg: trace_lines if frame.f_code.co_filename in paths else None)
    try:
        for entry in entries:
            try:
                fuzz_one_input(entry)
            except AssertionError:
                pass  # libFuzzer reported it
    finally:
        sys.settrace(None)
    print("\n== line coverage of the corpus (function bodies)")
    for path, name in paths.items():
        module = compile(Path(path).read_text(), path, "exec")
        lines = set().union(*(_lines(c) for c in module.co_consts if hasattr(c, "co_lines")))
        missed = sorted(lines - hit[name])
        print(f"  {name}: {len(lines) - len(missed)}/{len(lines)} lines; not run: {missed}")


def _lines(code) -> set:
    """The lines of the functions in a code object (itself, nested ones, a
    class body's methods; a class body's own lines run at import)."""
    lines = set()
    if code.co_flags & inspect.CO_OPTIMIZED:  # a function, not a class body
        lines = {line for _, _, line in code.co_lines() if line not in (None, code.co_firstlineno)}
    for const in code.co_consts:
        if hasattr(const, "co_lines"):
            lines |= _lines(const)
    return lines


def pump_corpus(entries, seconds: float, max_failures: int) -> int:
    """The linear-time check on corpus entries until the time is up: first
    each byte of each entry (shortest entries first) pumped 64x, then random
    segments of random entries."""
    import random

    from tests.http.fuzz_targets import check_linear

    entries = sorted(entries, key=len)
    rng, deadline = random.Random(), time.monotonic() + seconds
    num_checks, failures, worst = 0, [], 0.0
    for pump in _pumps(entries, rng):
        if time.monotonic() >= deadline or len(failures) >= max_failures:
            break
        num_checks += 1
        try:
            worst = max(worst, check_linear(*pump).time_ratio)
        except AssertionError as exc:
            failures.append(f"{pump!r:.400}\n" + "".join(traceback.format_exception(exc)))
    print(f"\n== pumping the corpus: {num_checks} checks on {len(entries)} entries, "
          f"{len(failures)} failures; worst CPU time ratio {worst:.1f} (against a 64x smaller input "
          f"linear is <= 64 plus noise, the bound 512; against an 8x smaller one: 8 and 22.6)")
    for text in failures:
        print(f"-- failure on (prefix, segment, suffix, piece size) = {text}")
    return 1 if failures else 0


def _pumps(entries, rng):
    from tests.http.fuzz_targets import byte_pumps, segment_pump

    for entry in entries:
        yield from byte_pumps(entry)
    while entries:
        yield segment_pump(rng.choice(entries), rng)


def _dict_escape(token: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token)


def _summarise_libfuzzer(lines, returncode: int, corpus: Path) -> int:
    stats = [line for line in lines if re.search(r"\bcov: \d+", line)]
    done = [line for line in lines if line.startswith("Done ")]
    crashes = [line for line in lines if "Test unit written to" in line]
    print("\n== http parser (atheris, coverage-guided)")
    print("  last status:", stats[-1] if stats else "(none)")
    print("  ", done[-1] if done else f"(no 'Done' line; exit status {returncode})")
    print(f"  corpus: {len(list(corpus.iterdir()))} inputs in {corpus}")
    for line in lines:
        if line.startswith("stat::"):
            print("  ", line)
    if crashes or returncode != 0:
        print("  FAILURE:", *crashes, sep="\n    ")
        start = next((i for i, line in enumerate(lines) if "Uncaught Python exception" in line), None)
        if start is not None:
            print("\n".join(lines[start : start + 40]))
        return 1
    print("  no failures")
    return 0


def atheris_worker(libfuzzer_args) -> None:
    import atheris

    with atheris.instrument_imports(include=["pyvlm.http"]):
        import pyvlm.http.head  # noqa: F401
        import pyvlm.http.parser  # noqa: F401
        import pyvlm.http.receive_buffer  # noqa: F401
    from tests.http.fuzz_targets import fuzz_one_input

    atheris.Setup([sys.argv[0]] + libfuzzer_args, fuzz_one_input)
    atheris.Fuzz()


def has_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


# ---- body --------------------------------------------------------------------
def body_fuzz(args) -> int:
    import pyvlm
    from hypothesis import strategies as st

    from pyvlm.server.app import App
    from pyvlm.server.args import ServerArgs
    from tests.server import body_fuzz_targets as bf
    from tests.server.conftest import ENGINE_ARGS
    from tests.tiny_checkpoints import write_checkpoint

    checkpoint = write_checkpoint(Path(tempfile.mkdtemp(prefix="pyvlm-fuzz-ckpt-")), "qwen2", seed=0)
    endpoints = bf.ENDPOINTS if args.endpoint == "all" else (args.endpoint,)
    cases = st.one_of(*(bf.requests_for(e, s) for e in endpoints for s in (None, False, True)))
    with pyvlm.Engine(model=str(checkpoint), **ENGINE_ARGS) as engine:
        app = App(engine, ServerArgs(model=str(checkpoint), served_model_name="tiny",
                                     max_running_requests=8))
        errors = bf.watch_errors()
        loop = asyncio.new_event_loop()

        def check(case):
            endpoint, raw = case
            return f"{endpoint} " + loop.run_until_complete(bf.post_and_check(app, endpoint, raw, errors))

        def still_serving():
            loop.run_until_complete(bf.assert_still_serving(app))

        campaign = Campaign(args.seconds, args.max_failures, batch=300)
        campaign.run(cases, check, between_batches=still_serving)
        still_serving()
        bf.unwatch_errors(errors)
    return campaign.report("JSON body -> prompt (hypothesis, tiny engine)",
                           group=lambda label: " ".join(label.split()[:2])[:-2] + "xx"
                           + (" stream" if " 200 stream" in label else ""))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_atheris_worker":
        atheris_worker(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=["http", "body"])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto",
                        help="http: the fuzzer (auto: atheris when installed)")
    parser.add_argument("--corpus", help="http with atheris: a corpus folder to keep and reuse")
    parser.add_argument("--max-len", type=int, default=4096, help="http: the longest input")
    parser.add_argument("--endpoint", default="all", help="body: one endpoint, or all")
    parser.add_argument("--max-failures", type=int, default=5,
                        help="hypothesis runs stop after this many distinct failures")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.target == "body":
        return body_fuzz(args)
    engine = args.engine if args.engine != "auto" else ("atheris" if has_atheris() else "hypothesis")
    print(f"http parser fuzz with {engine} for {args.seconds:g} s", flush=True)
    return http_with_atheris(args) if engine == "atheris" else http_with_hypothesis(args)


if __name__ == "__main__":
    sys.exit(main())
