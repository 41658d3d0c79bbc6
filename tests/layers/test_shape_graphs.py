"""ShapeGraphs' bookkeeping on the CPU (emulated: the static-buffer path
without a graph): when a key is captured, replayed, evicted or left eager,
that a replay gives body's result on the new inputs, and that outputs
never alias the static buffers. The vision towers' graphs against their
eager forward: tests/models/vision/test_qwen2_vl_towers.py (CPU, emulated;
CUDA, real graphs)."""

import pytest
import torch

from pyvlm.layers.shape_graphs import ShapeGraphs, enable_shape_graphs


def body(inputs: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
    return inputs * metadata + 1.0


def enabled(max_graphs: int = 4, max_rows: int = 64) -> ShapeGraphs:
    graphs = ShapeGraphs()
    graphs.enable(max_graphs, max_rows, emulate=True)
    return graphs


def call(graphs: ShapeGraphs, key, rows: int, prepared: list) -> torch.Tensor:
    """graphs.run on fresh inputs of `rows` rows, checked against body;
    prepared collects each prepare() call's key."""
    inputs = torch.randn(rows, 3)
    scale = float(rows)

    def prepare():
        prepared.append(key)
        return torch.full((3,), scale)

    out = graphs.run(key, inputs, prepare, body)
    torch.testing.assert_close(out, body(inputs, torch.full((3,), scale)), rtol=0, atol=0)
    return out


def test_a_key_is_captured_the_second_time_and_replayed_after():
    graphs, prepared = enabled(), []
    call(graphs, "a", 5, prepared)
    assert (graphs.num_captures, graphs.num_replays) == (0, 0)
    call(graphs, "a", 5, prepared)
    assert (graphs.num_captures, graphs.num_replays) == (1, 1)
    for _ in range(3):
        call(graphs, "a", 5, prepared)
    assert (graphs.num_captures, graphs.num_replays) == (1, 4)
    assert prepared == ["a", "a"]  # the eager call's, then the capture's: replays reuse it


def test_outputs_do_not_alias_the_static_buffers():
    graphs, prepared = enabled(), []
    call(graphs, "a", 4, prepared)
    first = call(graphs, "a", 4, prepared)
    kept = first.clone()
    call(graphs, "a", 4, prepared)
    assert torch.equal(first, kept)


def test_least_recently_used_graphs_are_dropped():
    graphs, prepared = enabled(max_graphs=2), []
    for key in ("a", "b", "c"):
        call(graphs, key, 3, prepared)
        call(graphs, key, 3, prepared)
    assert graphs.num_captures == 3
    call(graphs, "b", 3, prepared)  # kept: a replay
    call(graphs, "a", 3, prepared)  # dropped: seen before, so captured again
    assert (graphs.num_captures, graphs.num_replays) == (4, 5)
    assert list(graphs._graphs) == ["b", "a"]


def test_large_inputs_and_disabled_graphs_run_eagerly():
    graphs, prepared = enabled(max_rows=8), []
    for _ in range(3):
        call(graphs, "big", 9, prepared)
    off, off_prepared = ShapeGraphs(), []
    for _ in range(3):
        call(off, "a", 2, off_prepared)
    assert graphs.num_captures == off.num_captures == 0
    assert prepared == ["big"] * 3 and off_prepared == ["a"] * 3


def test_a_failed_capture_turns_graphs_off_and_runs_eagerly(monkeypatch, caplog):
    graphs, prepared = enabled(), []

    def fail(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_record_emulated", fail)
    call(graphs, "a", 3, prepared)
    call(graphs, "a", 3, prepared)
    assert not graphs.enabled and graphs.num_captures == 0
    assert "capturing one failed" in caplog.text
    call(graphs, "a", 3, prepared)
    assert graphs.num_replays == 0


@pytest.mark.parametrize("count", [0, 3])
def test_enable_shape_graphs_finds_every_module_holding_one(count):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU()))
    holders = [model[0], model[1][0]]
    for holder in holders:
        holder.shape_graphs = ShapeGraphs()
    assert enable_shape_graphs(model, count, 16, emulate=True) == 2
    assert all(h.shape_graphs.enabled == (count > 0) for h in holders)
    assert all(h.shape_graphs.max_graphs == count for h in holders)
