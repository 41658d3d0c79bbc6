"""The mllama vision encoder equals transformers' MllamaVisionModel on a
tiny random-weight model: 1, 2 and 4 real tiles (padded tiles masked), two
images per sample, tiles padded from 17 to 24 patches."""

import pytest
import torch

from pyvlm.models.vision import mllama as mllama_tower
from pyvlm.models.vision.mllama import (MaskedAttention, MllamaVisionModel, PaddedTileAttention,
                                        aspect_ratio_attention_mask)
from tests.tiny_models import perturb_

# images per sample, as real tile counts; 0 is a padding image (a sample
# with fewer images than the batch's most), which has aspect ratio id 0
LAYOUTS = {"one_and_four": [[1, 4], [2, 1]], "two_and_two": [[2, 2], [4, 1]],
           "padding_image": [[2, 0], [4, 1]]}


def tiny_hf_vision_model():
    from transformers import MllamaVisionConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel as HFModel

    config = MllamaVisionConfig(hidden_size=32, attention_heads=4, intermediate_size=64,
                                image_size=56, patch_size=14, max_num_tiles=4,
                                num_hidden_layers=3, num_global_layers=2,
                                intermediate_layers_indices=[0, 2])
    config._attn_implementation = "eager"
    hf_model = HFModel(config)
    seed = int(torch.randint(0, 10_000, ()).item())
    perturb_(hf_model, seed)
    # gates start at zero (or pi/4) and embeddings small: large noise so
    # every gate and embedding changes the output visibly
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "gate" in name or "embedding" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.5)
    return hf_model.eval()


def aspect_ratio_id(config, num_tiles: int) -> int:
    """A random supported aspect ratio with num_tiles tiles, as its 1-based
    id; 0 for a padding image."""
    if num_tiles == 0:
        return 0
    ids = [i + 1 for i, (h, w) in enumerate(config.supported_aspect_ratios) if h * w == num_tiles]
    return ids[int(torch.randint(0, len(ids), ()).item())]


def random_inputs(config, layout):
    batch, max_images, max_tiles = len(layout), len(layout[0]), config.max_num_tiles
    pixel_values = torch.randn(batch, max_images, max_tiles, 3, config.image_size,
                               config.image_size)
    mask = torch.zeros(batch, max_images, max_tiles, dtype=torch.long)
    ids = torch.zeros(batch, max_images, dtype=torch.long)
    for b, sample in enumerate(layout):
        for i, num_tiles in enumerate(sample):
            mask[b, i, :num_tiles] = 1
            ids[b, i] = aspect_ratio_id(config, num_tiles)
            # padded tiles are zeros, as the processor makes them
            pixel_values[b, i, num_tiles:] = 0
    return pixel_values, ids, mask


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_transformers(layout):
    hf_model = tiny_hf_vision_model()
    model = MllamaVisionModel(hf_model.config).eval()
    model.load_state_dict(hf_model.state_dict(), strict=True)
    pixel_values, ids, mask = random_inputs(hf_model.config, LAYOUTS[layout])
    with torch.no_grad():
        expected = hf_model(pixel_values=pixel_values, aspect_ratio_ids=ids,
                            aspect_ratio_mask=mask).last_hidden_state
        got = model(pixel_values, ids, mask)
    assert got.shape == expected.shape == (2, 2, 4, 17, 32 * 3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def tile_counts(layout):
    return [n for sample in LAYOUTS[layout] for n in sample]


@pytest.mark.parametrize("layout", ["one_and_four", "two_and_two"])
def test_unmasked_varlen_plan_equals_the_dense_mask(layout, monkeypatch):
    """The two varlen attentions (all queries over all keys, then padding
    queries over real keys) give what transformers' dense mask gives, with
    the tiles given as host ints or read from a CPU mask."""
    hf_model = tiny_hf_vision_model()
    model = MllamaVisionModel(hf_model.config).eval()
    model.load_state_dict(hf_model.state_dict(), strict=True)
    pixel_values, ids, mask = random_inputs(hf_model.config, LAYOUTS[layout])
    plans = []
    plan_for = mllama_tower.padded_tile_attention
    monkeypatch.setattr(mllama_tower, "padded_tile_attention",
                        lambda *args: plans.append(plan_for(*args)) or plans[-1])
    with torch.no_grad():
        from_ints = model(pixel_values, ids, mask, tile_counts(layout))
        from_mask = model(pixel_values, ids, mask)
        monkeypatch.setattr(mllama_tower, "padded_tile_attention", lambda *args: None)
        dense = model(pixel_values, ids, mask)
    assert len(plans) == 2 and all(isinstance(p, PaddedTileAttention) for p in plans)
    torch.testing.assert_close(from_ints, from_mask, rtol=0, atol=0)
    torch.testing.assert_close(from_ints, dense, rtol=1e-5, atol=1e-5)


def test_padding_queries_split_along_their_keys_give_the_dense_masks_output(monkeypatch):
    """With the padding queries' keys cut in chunks (as on CUDA, where
    FlashAttention runs them; here a float64 attention that returns its
    log-sum-exp stands in), the tower still gives transformers' output."""
    from pyvlm.layers import split_key_attention as split
    from tests.layers.test_split_key_attention import reference_attention_with_lse

    hf_model = tiny_hf_vision_model()
    model = MllamaVisionModel(hf_model.config).eval()
    model.load_state_dict(hf_model.state_dict(), strict=True)
    pixel_values, ids, mask = random_inputs(hf_model.config, LAYOUTS["one_and_four"])
    monkeypatch.setattr(split, "MIN_KEYS_PER_SPLIT", 8)  # 17 real patches a tile: 2-8 chunks
    monkeypatch.setattr(mllama_tower, "takes_torch_flash", lambda *args: True)
    calls = []

    def split_attention(*args):
        calls.append(args[3].num_splits)
        return split.split_key_attention(*args, attend=reference_attention_with_lse)

    monkeypatch.setattr(mllama_tower, "split_key_attention", split_attention)
    with torch.no_grad():
        expected = hf_model(pixel_values=pixel_values, aspect_ratio_ids=ids,
                            aspect_ratio_mask=mask).last_hidden_state
        got = model(pixel_values, ids, mask, tile_counts("one_and_four"))
    assert calls and all(n == 2 for n in calls)  # the 1-tile images have 17 real keys
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_an_image_without_a_real_tile_keeps_the_dense_mask():
    tile_is_real = torch.tensor([[True, True, False, False], [False, False, False, False]])
    assert mllama_tower.padded_tile_attention(tile_is_real, 17, 24, torch.device("cpu")) is None
    model = MllamaVisionModel(tiny_hf_vision_model().config)
    attention = model._attention(tile_is_real.long(), None, 24, torch.float32)
    assert isinstance(attention, MaskedAttention)


def test_padding_tiles_change_the_output_as_in_transformers():
    """Real tokens attend to padding (only padding-padding pairs are masked),
    so the mask must be transformers' and not a plain key-padding mask."""
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

    tile_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    expected = _prepare_aspect_ratio_attention_mask(tile_mask, 17, 24, torch.float32)
    got = aspect_ratio_attention_mask(tile_mask, 17, 24, torch.float32)
    assert torch.equal(got, expected)
    assert (got[0, 0, 0] == 0).all()  # a real token sees every key


@pytest.mark.cuda
@pytest.mark.parametrize("split_keys", [False, True])
@pytest.mark.parametrize("layout", ["one_and_four", "two_and_two"])
def test_cuda_tower_matches_transformers(layout, split_keys, monkeypatch):
    """The tower on the GPU in float32 (TF32 off) against transformers' on
    the CPU; in bfloat16 within bfloat16 rounding of it. (Not the padding
    image: every row of it is masked, which CUDA's attention kernels resolve
    differently from the CPU's (0.02 relative on the H100); pyvlm never
    builds one: a request's images are all real.) split_keys: the padding
    queries' keys in chunks even for this tiny tower's few keys, so
    FlashAttention's log-sum-exp merge runs in bfloat16."""
    if split_keys:
        from pyvlm.layers import split_key_attention as split

        monkeypatch.setattr(split, "MIN_KEYS_PER_SPLIT", 8)
    hf_model = tiny_hf_vision_model()
    pixel_values, ids, mask = random_inputs(hf_model.config, LAYOUTS[layout])
    with torch.no_grad():
        expected = hf_model(pixel_values=pixel_values, aspect_ratio_ids=ids,
                            aspect_ratio_mask=mask).last_hidden_state
    model = MllamaVisionModel(hf_model.config).eval()
    model.load_state_dict(hf_model.state_dict(), strict=True)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding is a convolution
    try:
        for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
            on_gpu = model.to("cuda", dtype)
            with torch.no_grad():  # host tile counts: the varlen plan (FlashAttention in bf16)
                got = on_gpu(pixel_values.to("cuda", dtype), ids.cuda(), mask.cuda(),
                             tile_counts(layout)).float().cpu()
            error = (got - expected).norm() / expected.norm()
            assert error < tolerance, (dtype, error)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
