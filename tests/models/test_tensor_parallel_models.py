"""Every model family split over real tensor-parallel ranks gives the logits
of the unsplit model.

The ranks are spawned processes joined by torch.distributed (gloo; one
start per module, tests/tp_ranks.py). Each loads the tiny checkpoint with
pyvlm's loader inside building_with(its group), so every split parameter
reads only its slice of the safetensors, and runs the same steps as the
engine's runner does (its own KV pool of local heads, images through the
vision batcher): a prefill with an image, cut in two chunks at a random
token, then two decode steps. The reference is a one-rank engine over the
same checkpoint and the same steps. Images, cut points and decode tokens
are fresh every run.
"""

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from pyvlm.scheduling.types import CrossImage, ForwardBatch, SamplingParams, SequenceChunk
from tests.tp_ranks import Ranks

PAGE_SIZE = 4
NUM_DECODE = 2
# (fixture, image size): LLaVA-OneVision with its Qwen2 and its tied-embedding
# Llama backbone, Qwen2-VL, Qwen2.5-VL, LLaVA-1.5 (Llama), LLaVA-NeXT
# (Mistral), Llama-3.2-Vision. Every tiny decoder has 4 query and 2
# key/value heads: 2 ranks split both, 4 ranks replicate the key/value heads.
FAMILIES = {"tiny_checkpoint_qwen2": (40, 70), "tiny_checkpoint_llama": (64, 30),
            "tiny_checkpoint_qwen2_vl": (90, 120), "tiny_checkpoint_qwen2_5_vl": (120, 60),
            "tiny_checkpoint_llava": (60, 90), "tiny_checkpoint_llava_next_mistral": (40, 100),
            "tiny_checkpoint_mllama": (50, 110)}


def assert_logits_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    # The ranks sum their partial products in another order than one matmul.
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def two_ranks():
    ranks = Ranks(2)
    yield ranks
    ranks.close()


# ---- on the ranks ----------------------------------------------------------------

_RUNNERS = {}  # (checkpoint, load_format) -> this rank's runner, built once per rank


def _runner(checkpoint: str, num_pages: int, load_format: str):
    """The checkpoint's model loaded under the current group, over a KV pool
    sized by the model's (local) KV shape, as the engine builds it."""
    from pyvlm.models.checkpoint import CheckpointFiles
    from pyvlm.models.loader import load_model
    from pyvlm.runner.encoder_cache import EncoderCache, VisionBatcher
    from pyvlm.runner.kv_pool import KVPool, KVShape
    from pyvlm.runner.model_runner import ModelRunner

    key = (checkpoint, load_format)
    if key not in _RUNNERS:
        device = torch.device("cpu")
        files = CheckpointFiles.from_dir(Path(checkpoint))
        model = load_model(files, torch.float32, device, load_format=load_format)
        shape = KVShape(model.num_layers, model.num_kv_heads, model.head_dim, torch.float32,
                        tuple(getattr(model, "cross_attention_layers", ())))
        vision = VisionBatcher(model.encode_prepared, EncoderCache(2**26),
                               getattr(model, "encoder_rows_of", None), model.prepare_images,
                               device)
        _RUNNERS[key] = ModelRunner(model, KVPool(shape, num_pages, PAGE_SIZE, device), device,
                                    vision)
    return _RUNNERS[key]


def _run_steps(group, checkpoint, num_pages, batches, load_format="auto"):
    """Each batch's logits on this rank, and the sizes the rank holds."""
    runner = _runner(checkpoint, num_pages, load_format)
    model = runner.model
    with torch.no_grad():
        logits = [runner.token_logits(batch) for batch in batches]
    first_attention = model.language_model.layers[0].self_attn
    return dict(logits=logits, num_kv_heads=model.num_kv_heads,
                pool_kv_heads=runner.pool.shape.num_kv_heads,
                attention_heads=(first_attention.attn.num_heads, first_attention.attn.num_kv_heads),
                embedding_rows=model.language_model.embed_tokens.weight.shape[0],
                vision_tower=sum(p.numel() for name, p in model.named_parameters()
                                 if name.startswith(("vision", "visual", "multi_modal"))))


# ---- in the test process -----------------------------------------------------------


def random_image(height: int, width: int) -> Image.Image:
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy())


def engine_for(checkpoint):
    import pyvlm

    return pyvlm.Engine(model=str(checkpoint), device="cpu", dtype="float32",
                        page_size=PAGE_SIZE, max_total_tokens=2048)


def steps_of(runner, request, cut: int, decode_ids):
    """The prompt in two chunks (cut tokens, then the rest), then one decode
    step per decode id, on shuffled pages (the images' K/V too, for a
    cross-attention family)."""
    num_prompt, num_tokens = len(request.prompt_ids), len(request.prompt_ids) + len(decode_ids)
    cross = [item for item in request.mm_items if item.num_cross_rows]
    image_pages = [-(-item.num_cross_rows // runner.image_rows_per_page) for item in cross]
    num_text_pages = -(-num_tokens // PAGE_SIZE)
    pages = random.sample(range(runner.num_pages), num_text_pages + sum(image_pages))
    text_pages, pages = pages[:num_text_pages], pages[num_text_pages:]
    images = []
    for item, count in zip(cross, image_pages):
        images.append((item, tuple(pages[:count])))
        pages = pages[count:]

    def chunk(start, token_ids, step):
        end = start + len(token_ids)
        return SequenceChunk(
            rid=request.rid, token_ids=list(token_ids), start_pos=start,
            positions=request.positions(start, end), page_table=text_pages,
            mm_items=request.mm_items_overlapping(start, end), sample=end >= num_prompt,
            sampling=request.sampling, seed=0, step=step, prompt_ids=request.prompt_ids,
            cross_images=[CrossImage(item, item_pages, start == 0)
                          for item, item_pages in images])

    ids = request.prompt_ids
    batches = [ForwardBatch(False, [chunk(0, ids[:cut], 0)]),
               ForwardBatch(False, [chunk(cut, ids[cut:], 0)])]
    for step, token in enumerate(decode_ids):
        batches.append(ForwardBatch(True, [chunk(num_prompt + step, [token], step + 1)]))
    return batches


def reference_and_steps(checkpoint, image_size):
    """(one-rank logits of each step, the steps, the engine's pool size)."""
    messages = [{"role": "user", "content": [{"type": "image", "image": random_image(*image_size)},
                                             {"type": "text", "text": "describe it"}]}]
    with engine_for(checkpoint) as engine:
        runner = engine.state.runner
        request = engine.builder.from_messages(messages, SamplingParams())
        try:
            num_prompt = len(request.prompt_ids)
            image = request.mm_items[0]
            # The cut falls inside the image's placeholder span when it has several tokens.
            cut = random.randint(max(1, image.offset), min(num_prompt - 1,
                                                           image.offset + image.length))
            decode_ids = torch.randint(5, 300, (NUM_DECODE,)).tolist()
            batches = steps_of(runner, request, cut, decode_ids)
            with torch.no_grad():
                reference = [runner.token_logits(batch) for batch in batches]
        finally:
            engine.builder.release(request)
        return reference, batches, runner.num_pages


def check_family(ranks, fixture, checkpoint, image_size):
    reference, batches, num_pages = reference_and_steps(checkpoint, image_size)
    results = ranks.run(_run_steps, str(checkpoint), num_pages, batches)
    for rank, got in enumerate(results):
        for step, (out, ref) in enumerate(zip(got["logits"], reference)):
            try:
                assert_logits_equal(out, ref)
            except AssertionError as error:
                raise AssertionError(f"{fixture}, rank {rank} of {ranks.size}, step {step}: "
                                     f"{error}") from None
    return results


@pytest.mark.parametrize("fixture", FAMILIES)
def test_two_ranks_give_the_logits_of_one(two_ranks, fixture, request):
    results = check_family(two_ranks, fixture, request.getfixturevalue(fixture), FAMILIES[fixture])
    for got in results:  # each rank holds half of the heads and of the vocabulary
        assert got["num_kv_heads"] == got["pool_kv_heads"] == 1
        assert got["attention_heads"] == (2, 1)
    assert results[0]["vision_tower"] == results[1]["vision_tower"] > 0  # replicated


def test_four_ranks_replicate_the_key_value_heads(request):
    """Llama-3.2-Vision (self- and cross-attention) over 4 ranks: each holds
    one query head and one of the 2 key/value heads (ranks 0-1 head 0,
    ranks 2-3 head 1), in its KV pool too."""
    fixture = "tiny_checkpoint_mllama"
    ranks = Ranks(4)
    try:
        results = check_family(ranks, fixture, request.getfixturevalue(fixture),
                               FAMILIES[fixture])
    finally:
        ranks.close()
    for got in results:
        assert got["num_kv_heads"] == got["pool_kv_heads"] == 1
        assert got["attention_heads"] == (1, 1)
        assert got["embedding_rows"] == (384 + 8) // 4


def test_dummy_weights_load_in_the_local_shapes(two_ranks, tiny_checkpoint_qwen2_vl):
    """--load-format dummy under a group: each rank draws its local shapes,
    and the ranks agree on the logits (replicated weights drawn alike)."""
    _, batches, num_pages = reference_and_steps(tiny_checkpoint_qwen2_vl, (60, 60))
    results = two_ranks.run(_run_steps, str(tiny_checkpoint_qwen2_vl), num_pages, batches,
                            "dummy")
    assert results[0]["embedding_rows"] == 384 // 2
    for first, second in zip(results[0]["logits"], results[1]["logits"]):
        assert torch.isfinite(first).all()
        assert torch.equal(first, second)


def test_a_rank_reads_only_its_slice_of_a_safetensors_tensor(tmp_path):
    """Under several ranks the loader hands the weight loaders unread
    tensors (pyvlm.models.loader.UnreadTensor), whose narrow reads one
    slice from the file: the rank's parameter equals its slice of the
    whole tensor, and parameters kept whole read the whole tensor."""
    from safetensors.torch import save_file

    from pyvlm.layers.linear import ColumnParallelLinear, RowParallelLinear
    from pyvlm.layers.tensor_parallel import TensorParallelGroup, building_with
    from pyvlm.models.loader import UnreadTensor, iter_safetensors
    from pyvlm.models.weight_loading import load_weights

    tensors = {"column.weight": torch.randn(8, 6), "row.weight": torch.randn(6, 8),
               "row.bias": torch.randn(6), "norm": torch.randn(6)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = torch.nn.Module()
    with building_with(TensorParallelGroup(1, 2)):
        model.column = ColumnParallelLinear(6, 8, bias=False)
        model.row = RowParallelLinear(8, 6)
    model.norm = torch.nn.Parameter(torch.zeros(6))
    entries = list(iter_safetensors([tmp_path / "model.safetensors"], unread=True))
    assert all(isinstance(entry, UnreadTensor) for _, entry in entries)
    load_weights(model, iter_safetensors([tmp_path / "model.safetensors"], unread=True),
                 rename=lambda name: name)
    assert torch.equal(model.column.weight, tensors["column.weight"][4:])
    assert torch.equal(model.row.weight, tensors["row.weight"][:, 4:])
    assert torch.equal(model.row.bias, tensors["row.bias"])
    assert torch.equal(model.norm, tensors["norm"])
