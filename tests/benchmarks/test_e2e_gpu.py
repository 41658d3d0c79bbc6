"""The arithmetic and verdicts of benchmarks/bench_e2e_gpu.py without a GPU:
the floors against a hand computation from their formulas, each target's
verdict on both sides of its threshold, the step phase's full-batch window,
where --write-results puts the table, the latency wrapper's settings, and
bench_host_overhead's instant runner really standing in for the model."""

import pytest

from benchmarks import bench_e2e_gpu, bench_latency_vs_transformers
from benchmarks.load import e2e_table as table
from benchmarks.load.serving_phases import (PhaseResults, Plan, decode_rate, full_batch_steps,
                                            median_run)
from benchmarks.offline.hf_baseline import PromptShape, TransformersResults
from benchmarks.offline.roofline import AttentionSegments, DeviceRates, ModelCost, Roofline

# A 7B-like model: 14 GB of decoder weights, 57,344 KV bytes per token
# (Qwen2-7B's 2 x 28 layers x 4 heads x 128 x 2 bytes), Qwen2-VL's attention
# widths (a 1280-wide tower; 28 layers x 3584 in the decoder), on 3 TB/s and
# 800 TFLOP/s; its tower's 1564 rows attend together in 32 layers.
COST = ModelCost(decoder_bytes=14e9, decoder_matmul_params=6.5e9, lm_head_params=0.5e9,
                 vision_bytes=1.3e9, vision_matmul_params=0.6e9, kv_bytes_per_token=57344,
                 tower_attention_width=1280, prompt_attention_width=28 * 3584)
ROOFLINE = Roofline(COST, DeviceRates(copy_bytes_per_s=3e12, matmul_flops_per_s=8e14))
TOWER = (AttentionSegments(num_layers=32, rows=(1564,)),)
SHAPE = PromptShape(num_prompt_tokens=411, num_tower_tokens=1564, tower_attention=TOWER)
PLAN = Plan(num_ttft=8, decode_tokens=128, num_requests=256, concurrency=64, output_tokens=128,
            step_concurrency=64, step_context=3072, step_output_tokens=256)


def test_the_floors_by_hand():
    # decode step, 64 x 3,000 context: bytes bound (FLOPs 2 x 7e9 x 64 / 8e14 = 1.1 ms)
    assert ROOFLINE.decode_step_s(64, 3000) == pytest.approx((14e9 + 64 * 3000 * 57344) / 3e12)
    assert ROOFLINE.decode_step_s(64, 3000) == pytest.approx(8.337e-3, rel=1e-3)
    # batch 1 at 475 tokens of context
    assert ROOFLINE.decode_tokens_per_s(475) == pytest.approx(3e12 / (14e9 + 475 * 57344))
    # TTFT: FLOPs bound (the weights, 15.3 GB, take 5.1 ms): linear layers
    # 2 x (6.5e9 x 411 + 0.5e9 + 0.6e9 x 1564) = 7.2208e12, the tower's attention
    # 4 x 1564^2 x 1280 x 32 = 4.0077e11, the prompt's causal half square
    # 2 x 411^2 x 28 x 3584 = 3.390e10: 7.6555e12 / 8e14 = 9.569 ms
    flops = 7.2208e12 + 4 * 1564 ** 2 * 1280 * 32 + 2 * 411 ** 2 * 28 * 3584
    assert ROOFLINE.prefill_flops(411, 1564, tower_attention=TOWER) == pytest.approx(flops)
    assert ROOFLINE.ttft_s(411, 1564, tower_attention=TOWER) == pytest.approx(9.569e-3, rel=1e-3)
    # 256 requests @ 64: 256 prefills (2.450 s of FLOPs) + 4 waves x 127 steps of
    # 64 x (411 + 64) context (5.248 ms each) = 5.116 s for 256 x 128 tokens
    throughput = ROOFLINE.throughput_tokens_per_s(256, 64, 411, 1564, 128, tower_attention=TOWER)
    assert throughput == pytest.approx(
        256 * 128 / (256 * flops / 8e14 + 4 * 127 * (14e9 + 64 * 475 * 57344) / 3e12), rel=1e-4)
    assert throughput == pytest.approx(6405, rel=1e-3)


def measured(batch_32_tokens_per_s: float = 250.0, **ours) -> table.Measured:
    """pyvlm's results (every phase done) beside transformers': TTFT 50 ms,
    decode 10 tok/s, batch 16 100 tok/s, batch 64 out of memory."""
    theirs = TransformersResults(ttft_s=[0.05], decode_tokens_per_s=10.0,
                                 batched_tokens_per_s={16: 100.0, 32: batch_32_tokens_per_s,
                                                       64: None},
                                 preprocess_s=[0.01], shape=SHAPE)
    phases = ["ttft", "decode", "step", "throughput"]
    return table.Measured(PLAN, ROOFLINE, SHAPE, theirs, PhaseResults(phases=phases, **ours))


@pytest.mark.parametrize("fraction, met", [(0.86, True), (0.84, False)])
def test_batch_1_decode_needs_85_percent_of_its_floor(fraction, met):
    floor = ROOFLINE.decode_tokens_per_s(411 + 64)
    row = table.decode_row(measured(decode_tokens=129, decode_s=128 / (fraction * floor)))
    assert row.is_met is met and row.cells()[4] == f"{100 * fraction:.0f}%"
    assert row.vs_transformers == pytest.approx(fraction * floor / 10.0)


@pytest.mark.parametrize("over_floor, met", [(1.49, True), (1.51, False)])
def test_ttft_within_one_and_a_half_floors(over_floor, met):
    floor = ROOFLINE.ttft_s(411, 1564, tower_attention=TOWER)
    row = table.ttft_row(measured(ttft_s=[over_floor * floor] * 3))
    assert row.is_met is met and row.of_floor == pytest.approx(1 / over_floor)
    assert row.vs_transformers == pytest.approx(0.05 / (over_floor * floor))


@pytest.mark.parametrize("fraction, met", [(0.71, True), (0.69, False)])
def test_the_64_x_3k_step_needs_70_percent_of_its_floor(fraction, met):
    floor = ROOFLINE.decode_step_s(64, 3200)
    row = table.step_row(measured(step_num_requests=64, step_num_ok=64, step_s=floor / fraction,
                                  step_context=3200.0, step_num_steps=200))
    assert row.is_met is met and row.floor == pytest.approx(floor * 1e3)
    never = table.step_row(measured(step_num_requests=64, step_num_ok=64, step_s=None))
    assert never.is_met is None and never.pyvlm is None and "never all" in never.cells()[1]


@pytest.mark.parametrize("fraction, vs_theirs, met", [
    (0.76, 12.5, True), (0.76, 11.0, False), (0.74, 20.0, False)])
def test_256_at_64_needs_75_percent_and_12x_transformers(fraction, vs_theirs, met):
    """Against transformers' best batch: 32 here (64 ran out of memory)."""
    rate = fraction * ROOFLINE.throughput_tokens_per_s(256, 64, 411, 1564, 128,
                                                       tower_attention=TOWER)
    row = table.throughput_row(measured(rate / vs_theirs, num_requests=256, num_ok=256,
                                        output_tokens=256 * 128, wall_s=256 * 128 / rate))
    assert row.is_met is met and "best batch 32" in row.metric
    assert row.vs_transformers == pytest.approx(vs_theirs)


@pytest.mark.parametrize("p99_over_p50, met", [(2.9, True), (3.1, False)])
def test_inter_token_p99_within_three_p50(p99_over_p50, met):
    row = table.itl_row(measured(itl_p50_s=0.010, itl_p99_s=0.010 * p99_over_p50))
    assert row.is_met is met and f"p99 = {p99_over_p50:.2f}x p50" in row.cells()[1]


def test_a_skipped_phase_keeps_its_row():
    row = table.step_row(table.Measured(PLAN, ROOFLINE, SHAPE, None, PhaseResults(), ("step",)))
    assert row.cells()[1] == "skipped" and row.cells()[-1] == "n/a"
    assert row.metric == "decode step ms, 64 running x ~3,072-token prompts"


def test_the_step_window_is_while_every_stream_decodes():
    """Tokens every 10 ms; the second stream starts 100 ms late, the first
    ends at 490 ms: 39 steps each in (100, 490]."""
    early = [k * 0.01 for k in range(50)]
    late = [0.10 + k * 0.01 for k in range(70)]
    steps = full_batch_steps([early, late])
    assert steps.step_s == pytest.approx(0.01) and steps.num_steps == pytest.approx(39)
    assert steps.mean_index == pytest.approx((30 + 20) / 2)  # indices 11..49 and 1..39
    assert full_batch_steps([early, [0.6 + k * 0.01 for k in range(5)]]) is None  # apart
    assert full_batch_steps([early, [0.47 + k * 0.01 for k in range(9)]]) is None  # 2 steps


def test_the_table_goes_before_the_newest_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nintro\n\n## older\n\nold\n")
    bench_e2e_gpu.add_section(results, "## newer\n\nnew\n")
    assert results.read_text() == ("# Benchmark results\n\nintro\n\n## newer\n\nnew\n\n"
                                   "## older\n\nold\n")
    empty = tmp_path / "new.md"
    bench_e2e_gpu.add_section(empty, "## first\n")
    assert empty.read_text() == "## first\n"


def test_the_latency_wrapper_keeps_its_settings():
    argv = ["--model", "qwen2-vl-7b-narrow", "--concurrency", "16"]
    latency = bench_e2e_gpu.parse_args(argv, bench_latency_vs_transformers.DEFAULTS)
    assert latency.skip == ("step",) and latency.num_requests == 16
    e2e = bench_e2e_gpu.parse_args(argv)
    assert e2e.skip == () and e2e.num_requests == 256 and e2e.step_concurrency == 64
    assert bench_e2e_gpu.plan_of(latency).without(latency.skip).phases() == [
        "ttft", "decode", "throughput"]


@pytest.mark.parametrize("engine_process", ["thread", "process"])
def test_the_instant_runner_stands_in_for_the_model(tmp_path, engine_process):
    """Engines started inside instant_runners() sample its tokens (so the
    host benchmark measures no model work), in this process or in the
    engine process; outside, the real runner."""
    from benchmarks.bench_host_overhead import FIRST_TOKEN, InstantRunner, instant_runners
    from benchmarks.load.serve_random import config_for
    from benchmarks.offline.random_models import write_checkpoint_metadata
    from pyvlm import Engine
    from pyvlm.entrypoints import startup

    write_checkpoint_metadata(tmp_path, config_for("qwen2-vl-7b-narrow"))
    real_build = startup.build_runner
    with instant_runners():
        with Engine(model=str(tmp_path), load_format="dummy", device="cpu",
                    engine_process=engine_process, max_total_tokens=4096) as engine:
            out = engine.generate("w1 w2 w3", {"max_new_tokens": 5, "ignore_eos": True})
    assert out["output_ids"] == [FIRST_TOKEN + step for step in range(5)]
    if engine_process == "thread":
        assert InstantRunner.forwards >= 5
    assert startup.build_runner is real_build


def test_the_decode_phase_reports_its_median_run():
    runs = [(128, 1.0), (128, 2.0), (128, 0.5)]  # 127, 63.5 and 254 tok/s
    assert median_run(runs) == (128, 1.0)
    assert decode_rate(median_run(runs)) == pytest.approx(127.0)
    assert median_run([(16, 1.0), (16, 0.5)]) == (16, 0.5)  # upper middle of two


def test_each_phase_records_the_servers_steps_by_path(monkeypatch):
    """run_phases keeps, per phase, the steps the server ran each way during
    it (the counters' differences), and the notes print them."""
    import asyncio

    from benchmarks.load import serving_phases

    counters = iter([{"decode_graph": 5, "piecewise_graphs": 1, "eager": 0},
                     {"decode_graph": 5, "piecewise_graphs": 9, "eager": 0},
                     {"decode_graph": 385, "piecewise_graphs": 12, "eager": 2}])

    async def step_paths(base_url):
        return next(counters)

    class Phases:
        def __init__(self, *args):
            self.results = PhaseResults()

        async def warmup(self):
            pass

        async def ttft(self):
            self.results.phases.append("ttft")
            return self.results

        async def decode(self):
            self.results.phases.append("decode")
            return self.results

    monkeypatch.setattr(serving_phases, "step_paths", step_paths)
    monkeypatch.setattr(serving_phases, "Phases", Phases)
    monkeypatch.setattr(serving_phases, "distinct_pictures", lambda *args: [])
    plan = Plan(num_ttft=1, decode_tokens=8, num_requests=0, step_concurrency=0)
    assert plan.phases() == ["ttft", "decode"]
    results = asyncio.run(serving_phases.run_phases("http://127.0.0.1:1", "m", plan))
    assert results.steps_by_path == {
        "ttft": {"decode_graph": 0, "piecewise_graphs": 8, "eager": 0},
        "decode": {"decode_graph": 380, "piecewise_graphs": 3, "eager": 2}}
    run = bench_e2e_gpu.E2ERun(bench_e2e_gpu.parse_args(["--model", "qwen2-vl-7b-narrow"]), None,
                               table.Measured(PLAN, ROOFLINE, SHAPE, None, results, ()))
    assert ("Model steps by path (decode graph / piecewise graphs / eager): ttft 0 / 8 / 0; "
            "decode 380 / 3 / 2.") in bench_e2e_gpu.notes(run)
