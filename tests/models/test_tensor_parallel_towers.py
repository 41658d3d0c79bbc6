"""Vision towers split over real tensor-parallel ranks (--mm-encoder-tp-mode
weights) give the rows and logits of the unsplit model.

Two spawned gloo ranks (tests/tp_ranks.py, one start for the module) each
load a family's tiny checkpoint with pyvlm's loader inside
building_with(group, shard_towers=True): the decoder and the tower split.
Each rank must hold its share of every attention and MLP matrix of the
tower (and everything else of it whole), and give the one-rank engine's
encode_prepared rows for two fresh random images in one tower call, and
its logits for a prefill of a prompt with those images (in two chunks) and
one decode step.
"""

import random
from pathlib import Path

import pytest
import torch

from pyvlm.layers.tensor_parallel import TensorParallelGroup, building_tower, building_with
from pyvlm.models.checkpoint import CheckpointFiles
from pyvlm.models.loader import build_hf_config
from pyvlm.scheduling.types import SamplingParams
from tests.models.test_tensor_parallel_models import (assert_logits_equal, engine_for,
                                                      random_image, steps_of)
from tests.tp_ranks import Ranks

# fixture -> two image sizes: LLaVA-OneVision (SigLIP), LLaVA-1.5 (CLIP),
# Qwen2-VL, Qwen2.5-VL (windowed, SwiGLU), Llama-3.2-Vision (local and
# gated global encoders). Every tiny tower has 2 or 4 heads.
FAMILIES = {"tiny_checkpoint_qwen2": ((40, 70), (50, 30)),
            "tiny_checkpoint_llava": ((60, 90), (40, 40)),
            "tiny_checkpoint_qwen2_vl": ((90, 120), (60, 60)),
            "tiny_checkpoint_qwen2_5_vl": ((120, 60), (70, 90)),
            "tiny_checkpoint_mllama": ((50, 110), (80, 40))}
TOWER_PREFIXES = ("vision_tower.", "visual.", "vision_model.")
# (parent, layer) of the tower's split matrices: column-parallel ones hold
# half of their rows (and bias), row-parallel ones half of their columns.
COLUMN_PARALLEL = {("self_attn", "qkv_proj"), ("attn", "qkv"), ("self_attn", "q_proj"),
                   ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("mlp", "fc1"),
                   ("mlp", "gate_proj"), ("mlp", "up_proj")}
ROW_PARALLEL = {("self_attn", "out_proj"), ("attn", "proj"), ("self_attn", "o_proj"),
                ("mlp", "fc2"), ("mlp", "down_proj")}


@pytest.fixture(scope="module")
def two_ranks():
    ranks = Ranks(2)
    yield ranks
    ranks.close()


def tower_shapes(model):
    return {name: tuple(param.shape) for name, param in model.named_parameters()
            if name.startswith(TOWER_PREFIXES)}


# ---- on the ranks ----------------------------------------------------------------


def _sharded_outputs(group, checkpoint, num_pages, items, batches):
    """This rank's tower shapes, encode_prepared rows and step logits, the
    model loaded with its tower split."""
    from pyvlm.models.loader import load_model
    from pyvlm.runner.encoder_cache import EncoderCache, VisionBatcher
    from pyvlm.runner.kv_pool import KVPool, KVShape
    from pyvlm.runner.model_runner import ModelRunner

    device = torch.device("cpu")
    with building_with(group, shard_towers=True):
        model = load_model(CheckpointFiles.from_dir(Path(checkpoint)), torch.float32, device)
    shape = KVShape(model.num_layers, model.num_kv_heads, model.head_dim, torch.float32,
                    tuple(getattr(model, "cross_attention_layers", ())))
    vision = VisionBatcher(model.encode_prepared, EncoderCache(2**26),
                           getattr(model, "encoder_rows_of", None), model.prepare_images, device)
    runner = ModelRunner(model, KVPool(shape, num_pages, 4, device), device, vision)
    with torch.no_grad():
        rows = model.encode_prepared(items)
        logits = [runner.token_logits(batch) for batch in batches]
    return dict(shapes=tower_shapes(model), rows=rows, logits=logits)


# ---- in the test process -----------------------------------------------------------


def one_rank_reference(checkpoint, image_sizes):
    """The one-rank engine's tower shapes, rows of the prompt's images (one
    encode_prepared call) and logits of its steps, with the steps."""
    content = [{"type": "image", "image": random_image(*size)} for size in image_sizes]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": "compare"}]}]
    with engine_for(checkpoint) as engine:
        runner = engine.state.runner
        request = engine.builder.from_messages(messages, SamplingParams())
        try:
            first = request.mm_items[0]
            cut = random.randint(max(1, first.offset), first.offset + first.length)
            batches = steps_of(runner, request, cut, torch.randint(5, 300, (1,)).tolist())
            with torch.no_grad():
                rows = runner.model.encode_prepared(request.mm_items)
                logits = [runner.token_logits(batch) for batch in batches]
        finally:
            engine.builder.release(request)
        return dict(shapes=tower_shapes(runner.model), rows=rows, logits=logits,
                    items=request.mm_items, batches=batches, num_pages=runner.num_pages)


def assert_tower_split(shapes, whole):
    """Attention and MLP matrices halved along their split dimension,
    everything else of the tower whole."""
    assert shapes.keys() == whole.keys()
    num_split = 0
    for name, shape in shapes.items():
        *parents, kind = name.split(".")
        layer = tuple(parents[-2:])
        expected = list(whole[name])
        if layer in COLUMN_PARALLEL:
            expected[0] //= 2
        elif layer in ROW_PARALLEL and kind == "weight":
            expected[1] //= 2
        num_split += tuple(expected) != whole[name]
        assert shape == tuple(expected), name
    assert num_split >= 4  # at least one attention block and one MLP


@pytest.mark.parametrize("fixture", FAMILIES)
def test_a_split_tower_gives_the_rows_and_logits_of_one_rank(two_ranks, fixture, request):
    reference = one_rank_reference(request.getfixturevalue(fixture), FAMILIES[fixture])
    results = two_ranks.run(_sharded_outputs, str(request.getfixturevalue(fixture)),
                            reference["num_pages"], reference["items"], reference["batches"])
    for rank, got in enumerate(results):
        where = f"{fixture}, rank {rank}"
        assert_tower_split(got["shapes"], reference["shapes"])
        assert len(got["rows"]) == len(reference["rows"]) == len(FAMILIES[fixture])
        for out, ref in zip(got["rows"], reference["rows"]):
            assert out.shape == ref.shape, where
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}")
        for step, (out, ref) in enumerate(zip(got["logits"], reference["logits"])):
            try:
                assert_logits_equal(out, ref)
            except AssertionError as error:
                raise AssertionError(f"{where}, step {step}: {error}") from None


def _tower_of(fixture, config):
    if fixture in ("tiny_checkpoint_qwen2", "tiny_checkpoint_llava"):
        from pyvlm.models.llava_family import vision_tower_for

        return vision_tower_for(config.vision_config, config.vision_feature_layer)
    if fixture == "tiny_checkpoint_mllama":
        from pyvlm.models.vision.mllama import MllamaVisionModel

        return MllamaVisionModel(config.vision_config)
    from pyvlm.models.registry import model_class_for

    return model_class_for(config.architectures).VISION_TOWER(config.vision_config)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_heads_that_do_not_split_over_the_ranks_are_refused_at_build(fixture, request):
    """3 ranks split none of the tiny towers' 2 or 4 heads: sharded, the
    build is a ValueError; replicated (no shard_towers), it builds whole."""
    config = build_hf_config(CheckpointFiles.from_dir(request.getfixturevalue(fixture)).config)
    group = TensorParallelGroup(0, 3)
    with building_with(group, shard_towers=True), building_tower():
        with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
            _tower_of(fixture, config)
    with building_with(group), building_tower():
        tower = _tower_of(fixture, config)
    assert all(getattr(module, "tp", None) in (None, TensorParallelGroup())
               for module in tower.modules())
