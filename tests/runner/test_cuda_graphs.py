"""Decode steps through the static buffers of pyvlm.runner.cuda_graphs: on
the CPU with emulate=True (the graph's padding and buffer logic, run
eagerly), on CUDA with real graphs (marked cuda): the same greedy tokens as
transformers and as eager steps, padding rows writing no KV."""

import random

import pytest
import torch

from pyvlm.ops.host_upload import HostUpload
from pyvlm.runner.cuda_graphs import PAD_SLOT, graph_batch_sizes
from pyvlm.scheduling.types import SamplingParams, SequenceChunk
from tests.entrypoints.test_engine_parity import Reference, engine_for, make_prompts


def test_graph_batch_sizes_cover_every_batch_up_to_the_limit():
    for max_bs in [1, 3, 8, 17, 64, 100, 256]:
        sizes = graph_batch_sizes(max_bs)
        assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_bs
        for n in range(1, max_bs + 1):
            padded = next(s for s in sizes if s >= n)
            assert padded - n <= max(16, n // 4), (max_bs, n, padded)


@pytest.fixture(scope="module", params=["qwen2", "qwen2_vl"])  # 1-D rotary and M-RoPE
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


def count_replays(graphs) -> list:
    """Wraps graphs.stage to record each staged batch size."""
    sizes, stage = [], graphs.stage

    def counting(chunks, upload):
        sizes.append(len(chunks))
        return stage(chunks, upload)

    graphs.stage = counting
    return sizes


def test_emulated_graph_steps_match_transformers(checkpoint, hf_model):
    """8 requests, graphs up to 4: the first decode steps run eagerly (8 >
    4), later ones through padded buffers as requests finish at different
    lengths; every token equals transformers'."""
    with engine_for(checkpoint) as engine:
        runner = engine.state.runner
        runner.capture_decode_graphs(4, engine.state.context_length, emulate=True)
        staged = count_replays(runner.graphs)
        reference = Reference(hf_model, engine)
        prompts = make_prompts(seed=4, image=engine.builder.image_token)
        results = generate_staggered(engine, prompts)
    assert {1, 2, 3, 4} <= set(staged), staged  # padded sizes 3 -> 4 among them
    assert_prefixes_of_reference(results, prompts, reference)


def generate_staggered(engine, prompts):
    """Greedy, request i stopping after 4 (i + 1) tokens: the decode batch
    shrinks one request at a time."""
    params = [{"temperature": 0.0, "max_new_tokens": 4 * (i + 1), "ignore_eos": True}
              for i in range(len(prompts))]
    return engine.generate([p for p, _ in prompts], params, image_data=[ims for _, ims in prompts])


def assert_prefixes_of_reference(results, prompts, reference):
    for i, ((prompt, images), result) in enumerate(zip(prompts, results)):
        assert result["output_ids"] == reference.tokens(prompt, images)[:4 * (i + 1)], prompt


def decode_chunk(rid, start_pos, page_table, token, rows) -> SequenceChunk:
    return SequenceChunk(rid=rid, token_ids=[token], start_pos=start_pos,
                         positions=[[start_pos]] * rows, page_table=page_table, mm_items=[],
                         sample=True, sampling=SamplingParams(temperature=0.0), seed=0, step=0)


def test_padding_rows_write_no_kv_and_stale_rows_are_overwritten(checkpoint):
    """A batch of 3 in the size-4 buffers after a batch of 4: only the 3
    new slots of the pool change (the 4th row's old slot is not rewritten)
    and the logits equal an eager step's."""
    with engine_for(checkpoint, max_total_tokens=512) as engine:
        runner = engine.state.runner
        runner.capture_decode_graphs(4, 64, emulate=True)
        graphs, page_size = runner.graphs, runner.page_size
        rows = graphs.num_rows
        pages = random.Random(0).sample(range(runner.num_pages), 16)
        tables = [pages[4 * i:4 * i + 4] for i in range(4)]
        upload = HostUpload()
        run = graphs.stage([decode_chunk(f"r{i}", 5 + i, tables[i], 7 + i, rows)
                            for i in range(4)], upload)
        upload.to(runner.device)
        run()
        runner.pool.storage.normal_()  # poison: every slot a fresh value
        before = runner.pool.storage.clone()
        chunks = [decode_chunk(f"s{i}", 9 + i, tables[i], 3 + i, rows) for i in range(3)]
        upload = HostUpload()
        run = graphs.stage(chunks, upload)
        upload.to(runner.device)
        logits = run().clone()
        assert int(graphs.slot_mapping[3]) == PAD_SLOT
        changed = (runner.pool.storage != before).flatten(start_dim=4).any(dim=-1)  # per slot
        written = {(int(p), int(s)) for p, s in changed.nonzero()[:, 2:4].tolist()}
        expected = {(tables[i][(9 + i) // page_size], (9 + i) % page_size) for i in range(3)}
        assert written == expected
        runner.pool.storage.copy_(before)
        eager = runner.token_logits(_decode_batch(chunks))
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)


def _decode_batch(chunks):
    from pyvlm.scheduling.types import ForwardBatch

    return ForwardBatch(is_decode=True, chunks=chunks)


@pytest.mark.cuda
def test_cuda_graph_steps_match_eager_steps(checkpoint):
    """Real graphs (up to 4, so 8 requests start eagerly, then shrink
    through padded sizes) give --disable-cuda-graph's tokens, float32.
    (tests/entrypoints/test_engine_cuda.py compares the default engine,
    graphs on, with transformers.)"""
    args = dict(device="cuda", max_total_tokens=8192, cuda_graph_max_bs=4,
                engine_process="thread")  # the test reads the runner
    with engine_for(checkpoint, **args) as engine:
        assert engine.state.runner.graphs is not None
        staged = count_replays(engine.state.runner.graphs)
        prompts = make_prompts(seed=5, image=engine.builder.image_token)
        graphed = generate_staggered(engine, prompts)
    with engine_for(checkpoint, disable_cuda_graph=True, **args) as engine:
        assert engine.state.runner.graphs is None
        eager = generate_staggered(engine, prompts)
    assert {1, 2, 3, 4} <= set(staged), staged
    assert [r["output_ids"] for r in graphed] == [r["output_ids"] for r in eager]


# Llama-3.2-Vision (mllama): decode tokens read their image's K/V through the
# graph's static cross-attention inputs. Request 6 of the mllama prompts
# attends to a run of two images (the eager varlen path): it stops first, so
# the later, shrinking batches fit the graphs.
MLLAMA_BUDGETS = [8, 12, 16, 20, 24, 28, 4, 32]


def generate_mllama_staggered(engine, prompts):
    params = [{"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True}
              for n in MLLAMA_BUDGETS]
    return engine.generate([p for p, _ in prompts], params, image_data=[ims for _, ims in prompts])


@pytest.fixture(scope="module")
def mllama_hf_model(tiny_checkpoint_mllama):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_checkpoint_mllama,
                                                       dtype=torch.float32).eval()


def test_emulated_graph_steps_of_a_cross_attention_model_match_transformers(
        tiny_checkpoint_mllama, mllama_hf_model):
    """Text-only requests and requests reading one stored image share the
    graph buffers (padding and text-only rows read no image); every token
    equals transformers'."""
    from tests.entrypoints.test_engine_parity_mllama import make_prompts as mllama_prompts

    with engine_for(tiny_checkpoint_mllama) as engine:
        runner = engine.state.runner
        runner.capture_decode_graphs(4, engine.state.context_length, emulate=True)
        assert runner.graphs is not None and runner.graphs.cross is not None
        staged = count_replays(runner.graphs)
        reference = Reference(mllama_hf_model, engine)
        prompts = mllama_prompts(seed=3)
        results = generate_mllama_staggered(engine, prompts)
    assert {1, 2, 3, 4} <= set(staged), staged
    for (prompt, images), result, budget in zip(prompts, results, MLLAMA_BUDGETS):
        assert result["output_ids"] == reference.tokens(prompt, images)[:budget], prompt


def test_a_batch_reading_two_images_at_once_runs_eagerly(tiny_checkpoint_mllama):
    """can_run is False while a decode token attends to a run of two images
    (gathered keys) or an image must still be written; True for one image."""
    from tests.entrypoints.test_engine_parity_mllama import make_prompts as mllama_prompts

    prompts = mllama_prompts(seed=3)
    with engine_for(tiny_checkpoint_mllama) as engine:
        runner = engine.state.runner
        runner.capture_decode_graphs(8, engine.state.context_length, emulate=True)
        seen = []
        can_run = runner.graphs.can_run

        def recording(chunks):
            result = can_run(chunks)
            seen.append(({c.rid for c in chunks}, result))
            return result

        runner.graphs.can_run = recording
        params = [{"temperature": 0.0, "max_new_tokens": 3, "ignore_eos": True}] * 2
        engine.generate([prompts[6][0], prompts[3][0]], params,
                        image_data=[prompts[6][1], prompts[3][1]])
        engine.generate([prompts[3][0]], params[:1], image_data=[prompts[3][1]])
    two_images = [ok for rids, ok in seen if len(rids) == 2]
    one_image = [ok for rids, ok in seen if len(rids) == 1]
    assert two_images and not any(two_images)
    assert one_image and all(one_image)


def test_an_image_of_the_most_tiles_decodes_in_the_graphs_when_pages_hold_several_blocks(
        tiny_checkpoint_mllama_one_cross):
    """With 3 self-attention layers to 1 cross-attention layer a page holds 3
    blocks of an image's rows, so a 4-tile image (68 rows, 12 to a page of
    4 tokens) takes 6 pages = 18 blocks, not ceil(68 / 4) = 17: the graphs'
    static block tables must hold the whole pages (else every decode of such
    an image runs eagerly, as Llama-3.2-11B-Vision's 4-tile images did:
    404 blocks against 401). Every decode step of the request then fits the
    graphs, and its tokens are transformers'."""
    from transformers import AutoModelForImageTextToText

    from tests.entrypoints.test_engine_parity_mllama import make_prompts as mllama_prompts

    prompt, images = mllama_prompts(seed=4)[7]  # one 120 x 120 image: 4 tiles
    hf_model = AutoModelForImageTextToText.from_pretrained(
        tiny_checkpoint_mllama_one_cross, dtype=torch.float32).eval()
    with engine_for(tiny_checkpoint_mllama_one_cross, page_size=4) as engine:
        runner = engine.state.runner
        pool = runner.pool
        assert pool.shape.slices_per_cross_layer == 3
        runner.capture_decode_graphs(2, engine.state.context_length, emulate=True)
        fits, can_run = [], runner.graphs.can_run

        def recording(chunks):
            fits.append(can_run(chunks))
            return fits[-1]

        runner.graphs.can_run = recording
        params = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}
        result = engine.generate(prompt, params, image_data=images)
        (entry,) = engine.state.scheduler.kv.images.entries.values()
        assert len(pool.image_blocks(entry.pages)) == 18 == pool.num_image_blocks(68)
        assert engine.get_stats()["num_steps_decode_graph"] == len(fits)  # counted as replays
        reference = Reference(hf_model, engine).tokens(prompt, images)
    assert fits and all(fits), fits
    assert result["output_ids"] == reference[:6]


@pytest.mark.cuda
def test_cuda_graph_steps_of_a_cross_attention_model_match_eager_steps(tiny_checkpoint_mllama):
    """Real graphs for mllama give --disable-cuda-graph's tokens."""
    from tests.entrypoints.test_engine_parity_mllama import make_prompts as mllama_prompts

    args = dict(device="cuda", max_total_tokens=8192, cuda_graph_max_bs=4,
                engine_process="thread")
    prompts = mllama_prompts(seed=5)
    with engine_for(tiny_checkpoint_mllama, **args) as engine:
        assert engine.state.runner.graphs is not None
        staged = count_replays(engine.state.runner.graphs)
        graphed = generate_mllama_staggered(engine, prompts)
    with engine_for(tiny_checkpoint_mllama, disable_cuda_graph=True, **args) as engine:
        eager = generate_mllama_staggered(engine, prompts)
    assert {1, 2, 3, 4} <= set(staged), staged
    assert [r["output_ids"] for r in graphed] == [r["output_ids"] for r in eager]


@pytest.mark.cuda
def test_cuda_graphs_decode_a_4_tile_image_when_pages_hold_several_blocks(
        tiny_checkpoint_mllama_one_cross):
    """Real graphs take the decodes of a 4-tile image whose pages hold 3
    blocks each (see the emulated test above) and give the eager tokens."""
    from tests.entrypoints.test_engine_parity_mllama import make_prompts as mllama_prompts

    prompt, images = mllama_prompts(seed=4)[7]
    args = dict(device="cuda", max_total_tokens=8192, cuda_graph_max_bs=2,
                engine_process="thread")
    params = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}
    with engine_for(tiny_checkpoint_mllama_one_cross, **args) as engine:
        staged = count_replays(engine.state.runner.graphs)
        graphed = engine.generate(prompt, params, image_data=images)
    with engine_for(tiny_checkpoint_mllama_one_cross, disable_cuda_graph=True, **args) as engine:
        eager = engine.generate(prompt, params, image_data=images)
    assert len(staged) >= 4, staged  # the decode steps after the prompt's (5, one may overlap)
    assert graphed["output_ids"] == eager["output_ids"]
