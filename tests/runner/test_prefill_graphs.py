"""Steps through the piecewise graphs of pyvlm.runner.prefill_graphs: on the
CPU with emulate=True (the pieces, padding and hand-off buffers, run
eagerly), on CUDA with real graphs (marked cuda): the same greedy tokens as
transformers and as eager steps, padding rows writing no KV and touching
no real row."""

import random

import pytest
import torch

from pyvlm.runner.prefill_graphs import prefill_graph_sizes
from pyvlm.scheduling.types import ForwardBatch, SamplingParams, SequenceChunk
from tests.entrypoints.test_engine_parity import (Reference, assert_same_tokens, engine_for,
                                                  generate_all, make_prompts)


def test_prefill_graph_sizes_cover_every_count_up_to_the_limit():
    for max_tokens in [1, 16, 40, 256, 700, 1024, 3000]:
        sizes = prefill_graph_sizes(max_tokens)
        assert sizes == sorted(set(sizes)) and sizes[-1] == max_tokens
        for n in range(1, max_tokens + 1):
            padded = next(s for s in sizes if s >= n)
            assert padded - n <= max(15, n // 16), (max_tokens, n, padded)
            assert n > 2 or padded == n, (max_tokens, n, padded)  # the skinny GEMM's rows


@pytest.fixture(scope="module", params=["qwen2", "qwen2_vl", "mllama"])
def checkpoint(request):
    """1-D rotary, M-RoPE, and cross-attention layers (run eagerly whole)."""
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


def count_bucketed_steps(graphs) -> list:
    """Wraps graphs.forward to record each step's token count."""
    counts, forward = [], graphs.forward

    def counting(embeds, positions, attn):
        counts.append(embeds.shape[0])
        return forward(embeds, positions, attn)

    graphs.forward = counting
    return counts


def prompts_for(engine, checkpoint):
    if "mllama" in str(checkpoint):
        from tests.entrypoints.test_engine_parity_mllama import make_prompts as mllama_prompts

        return mllama_prompts(seed=6)
    return make_prompts(seed=6, image=engine.builder.image_token)


@pytest.mark.parametrize("max_tokens", [24, 96])
def test_emulated_piecewise_steps_match_transformers(checkpoint, hf_model, max_tokens):
    """8 requests in chunks of at most 32 prompt tokens: prefill, mixed and
    decode steps (at most 40 tokens) run through the padded pieces (24: the
    larger steps run eagerly beside them); every token equals
    transformers'."""
    with engine_for(checkpoint, chunked_prefill_size=32, max_prefill_tokens=64) as engine:
        runner = engine.state.runner
        runner.capture_prefill_graphs(max_tokens, emulate=True)
        counts = count_bucketed_steps(runner.prefill_graphs)
        reference = Reference(hf_model, engine)
        prompts = prompts_for(engine, checkpoint)
        results = generate_all(engine, prompts)
        stats = engine.get_stats()
    sizes = runner.prefill_graphs.sizes
    padded = {next(s for s in sizes if s >= n) - n for n in counts}
    assert len(counts) > 10 and max(padded) > 0, counts  # real padding, many steps
    # The engine's stats count the steps each way (no decode graphs captured here).
    assert stats["num_steps_piecewise_graphs"] == len(counts)
    assert stats["num_steps_decode_graph"] == 0
    assert (stats["num_steps_eager"] > 0) == (max_tokens == 24), stats
    assert_same_tokens(results, prompts, reference)


def prefill_chunk(rid, start_pos, count, page_table, rows, token_ids) -> SequenceChunk:
    positions = list(range(start_pos, start_pos + count))
    return SequenceChunk(rid=rid, token_ids=token_ids, start_pos=start_pos,
                         positions=[positions] * rows, page_table=page_table, mm_items=[],
                         sample=True, sampling=SamplingParams(temperature=0.0), seed=0, step=0)


def test_padding_rows_write_no_kv_and_touch_no_real_row(tiny_checkpoint_qwen2_vl):
    """A mixed step (a 21-token chunk with a cached prefix, then 3 decodes)
    in the 32-token bucket with every hand-off buffer poisoned with NaN
    first: the logits equal an eager step's, and only the step's own 24
    slots of the pool change."""
    with engine_for(tiny_checkpoint_qwen2_vl, max_total_tokens=1024) as engine:
        runner = engine.state.runner
        runner.capture_prefill_graphs(64, emulate=True)
        graphs, page_size = runner.prefill_graphs, runner.page_size
        rng = random.Random()
        pages = rng.sample(range(runner.num_pages), 40)
        tables = [pages[10 * i:10 * i + 10] for i in range(4)]
        rows = graphs.num_rows
        vocab = 100
        chunks = [prefill_chunk("p", 5, 21, tables[0], rows,
                                [rng.randrange(vocab) for _ in range(21)])]
        chunks += [prefill_chunk(f"d{i}", 7 + 3 * i, 1, tables[i + 1], rows,
                                 [rng.randrange(vocab)]) for i in range(3)]
        batch = ForwardBatch(is_decode=False, chunks=chunks)
        runner.pool.storage.normal_()  # every slot a fresh value
        before = runner.pool.storage.clone()
        for buffer in vars(graphs._statics).values():
            if buffer is not None and buffer.is_floating_point():
                buffer.fill_(float("nan"))
        logits = runner.token_logits(batch)
        changed = (runner.pool.storage != before).flatten(start_dim=4).any(dim=-1)  # per slot
        written = {(int(p), int(s)) for p, s in changed.nonzero()[:, 2:4].tolist()}
        expected = {(c.page_table[pos // page_size], pos % page_size) for c in chunks
                    for pos in range(c.start_pos, c.start_pos + c.num_new_tokens)}
        assert written == expected
        assert torch.isnan(graphs._statics.output[24:32]).all()  # the padding did run
        runner.pool.storage.copy_(before)
        runner.prefill_graphs = None
        eager = runner.token_logits(batch)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)


def test_steps_larger_than_the_largest_bucket_run_eagerly(tiny_checkpoint_qwen2):
    with engine_for(tiny_checkpoint_qwen2) as engine:
        runner = engine.state.runner
        runner.capture_prefill_graphs(24, emulate=True)
        counts = count_bucketed_steps(runner.prefill_graphs)
        prompt = " ".join(["word"] * 60)
        result = engine.generate(prompt, {"temperature": 0.0, "max_new_tokens": 3})
    assert len(result["output_ids"]) == 3
    assert counts == [1, 1], counts  # the 60-token prefill ran eagerly, the decodes in pieces


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl", "mllama"])
def test_cuda_piecewise_graphs_give_the_eager_tokens(family, request):
    """Real piecewise graphs (the default) give
    --piecewise-cuda-graph-max-tokens 0's tokens, float32, chunked so that
    prefill, mixed and decode steps of many sizes replay them.
    (tests/entrypoints/test_engine_cuda.py compares the default engine with
    transformers.)"""
    checkpoint = request.getfixturevalue(f"tiny_checkpoint_{family}")
    args = dict(device="cuda", max_total_tokens=8192, chunked_prefill_size=32,
                max_prefill_tokens=64, cuda_graph_max_bs=4, engine_process="thread")
    with engine_for(checkpoint, **args) as engine:
        graphs = engine.state.runner.prefill_graphs
        assert graphs is not None and graphs.max_tokens == 1024
        counts = count_bucketed_steps(graphs)
        prompts = prompts_for(engine, checkpoint)
        graphed = generate_all(engine, prompts)
    with engine_for(checkpoint, piecewise_cuda_graph_max_tokens=0, **args) as engine:
        assert engine.state.runner.prefill_graphs is None
        eager = generate_all(engine, prompts)
    assert len(set(counts)) > 5, counts
    assert [r["output_ids"] for r in graphed] == [r["output_ids"] for r in eager]
