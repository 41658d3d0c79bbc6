"""The Qwen2-VL and Qwen2.5-VL vision towers against transformers' `visual`
modules on the same weights (loaded by state_dict name), and their per-call
metadata against transformers' vision_utils.

Grids are drawn fresh each run, each within the properties its test is
about (several images of different sizes, a video-like grid of two frames,
partial windows).
"""

import pytest
import torch

from pyvlm.layers.shape_graphs import ShapeGraphs
from pyvlm.models.vision.qwen2_5_vl import Qwen2_5_VisionTransformer
from pyvlm.models.vision.qwen2_vl import Qwen2VisionTransformer
from pyvlm.models.vision.qwen_grid import frame_lengths, rotary_positions, window_order
from tests.tiny_qwen2_vl import MERGE_SIZE, PATCH_SIZE, WINDOW_SIZE, tiny_qwen2_vl

TOWERS = {"2": Qwen2VisionTransformer, "2.5": Qwen2_5_VisionTransformer}
WINDOW_UNITS = WINDOW_SIZE // MERGE_SIZE // PATCH_SIZE
PATCH_DIM = 3 * 2 * PATCH_SIZE * PATCH_SIZE
FLOAT32_ATOL = 1e-4
BFLOAT16_REL_L2 = 1.5e-2  # ||out - ref|| / ||ref|| between two bf16 implementations


def visual_state(hf_model) -> dict:
    """transformers' visual weights, named as in the checkpoint minus "model.visual."."""
    prefix = "model.visual."
    return {k[len(prefix):]: v for k, v in hf_model.state_dict().items() if k.startswith(prefix)}


@pytest.fixture(scope="module", params=list(TOWERS))
def towers(request):
    """(version, transformers visual module, pyvlm tower with its weights), float32."""
    seed = int(torch.randint(0, 10_000, ()).item())
    hf_model = tiny_qwen2_vl(request.param, seed)
    tower = TOWERS[request.param](hf_model.config.vision_config).eval()
    tower.load_state_dict(visual_state(hf_model), strict=True)
    return request.param, hf_model.model.visual, tower


def random_units(low: int, high: int, odd: bool = False) -> int:
    """Merged units along one side, in [low, high]; odd ones leave partial windows."""
    value = int(torch.randint(low, high + 1, ()).item())
    return value | 1 if odd else value


def several_grids():
    """Four different grids, one of them two frames, one with partial windows."""
    grids = {(1, MERGE_SIZE * random_units(3, 7, odd=True), MERGE_SIZE * random_units(2, 6)),
             (1, MERGE_SIZE * 2, MERGE_SIZE * 2),
             (2, MERGE_SIZE * random_units(1, 4), MERGE_SIZE * random_units(3, 5)),
             (1, MERGE_SIZE * random_units(1, 3), MERGE_SIZE * 8)}
    return sorted(grids, key=lambda _: torch.rand(()).item())


def random_pixels(grids) -> torch.Tensor:
    return torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM)


def run_both(hf_visual, tower, grids):
    """(pyvlm, transformers) merged tokens of fresh random pixels, float32 on the CPU."""
    pixels = random_pixels(grids)
    with torch.no_grad():
        return tower(pixels, grids), hf_visual(pixels, grid_thw=torch.tensor(grids)).pooler_output


def num_merged(grids) -> int:
    return sum(t * h * w for t, h, w in grids) // MERGE_SIZE ** 2


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


# --- float32 parity --------------------------------------------------------------

def test_one_image_matches_transformers(towers):
    _, hf_visual, tower = towers
    grids = [(1, MERGE_SIZE * 4, MERGE_SIZE * 4)]  # 2 x 2 windows in 2.5-VL
    got, want = run_both(hf_visual, tower, grids)
    assert got.shape == (num_merged(grids), 64)
    torch.testing.assert_close(got, want, atol=FLOAT32_ATOL, rtol=0)


def test_several_images_in_one_call_match_transformers(towers):
    _, hf_visual, tower = towers
    grids = several_grids()
    got, want = run_both(hf_visual, tower, grids)
    assert got.shape == (num_merged(grids), 64)
    torch.testing.assert_close(got, want, atol=FLOAT32_ATOL, rtol=0)


def test_images_do_not_see_each_other(towers):
    """An image's tokens are the same alone as packed with others."""
    _, _, tower = towers
    grids = several_grids()
    pixels = random_pixels(grids)
    with torch.no_grad():
        packed = tower(pixels, grids)
        alone = torch.cat([tower(chunk, [grid]) for chunk, grid in zip(
            pixels.split([t * h * w for t, h, w in grids]), grids)])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_partial_windows_match_transformers():
    hf_model = tiny_qwen2_vl("2.5", int(torch.randint(0, 10_000, ()).item()))
    tower = Qwen2_5_VisionTransformer(hf_model.config.vision_config).eval()
    tower.load_state_dict(visual_state(hf_model))
    grids = [(1, MERGE_SIZE * random_units(3, 7, odd=True),
              MERGE_SIZE * random_units(3, 7, odd=True))]
    _, sizes = window_order(grids, MERGE_SIZE, WINDOW_UNITS)
    assert len(sizes) > 1 and min(sizes) < WINDOW_UNITS ** 2
    got, want = run_both(hf_model.model.visual, tower, grids)
    torch.testing.assert_close(got, want, atol=FLOAT32_ATOL, rtol=0)


# --- bfloat16 ---------------------------------------------------------------------

def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(towers):
    """Same pixels through both in float32 and bfloat16: pyvlm's bf16 tokens
    stay near transformers' bf16 ones and no further from float32 than they."""
    _, hf_visual, tower = towers
    grids = several_grids()
    pixels = random_pixels(grids)
    with torch.no_grad():
        want = tower(pixels, grids)
        got = tower.to(torch.bfloat16)(pixels.bfloat16(), grids)
        tower.float()
        hf_visual.to(torch.bfloat16)
        try:
            hf_got = hf_visual(pixels.bfloat16(), grid_thw=torch.tensor(grids)).pooler_output
        finally:
            hf_visual.float()
    assert got.dtype == torch.bfloat16
    assert rel_l2(got, hf_got) < BFLOAT16_REL_L2
    assert rel_l2(got, want) < 1.5 * rel_l2(hf_got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, limit", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_matches_the_cpu_float32_tower(towers, dtype, limit):
    """The CUDA kernels (varlen attention, mrope, rms_norm) serve the tower."""
    _, _, tower = towers
    grids = several_grids()
    pixels = random_pixels(grids)
    with torch.no_grad():
        want = tower(pixels, grids)
        try:
            got = tower.to("cuda", dtype)(pixels.to("cuda", dtype), grids)
        finally:
            tower.to("cpu", torch.float32)
    assert got.device.type == "cuda" and got.dtype == dtype
    assert rel_l2(got, want) < limit


def graphed(tower, emulate: bool) -> ShapeGraphs:
    """A fresh ShapeGraphs for tower (the caller puts it in place)."""
    graphs = ShapeGraphs()
    graphs.enable(max_graphs=4, max_rows=1 << 16, emulate=emulate)
    return graphs


def test_graphed_calls_equal_eager_calls(towers, monkeypatch):
    """Emulated graphs on the CPU: the metadata kept from the capture and
    the static pixel buffer give what an eager call gives, call after call
    with fresh pixels, alternating two keys."""
    _, _, tower = towers
    keys = [several_grids(), [(1, MERGE_SIZE * 3, MERGE_SIZE * 5)]]
    graphs = graphed(tower, emulate=True)
    for grids in keys * 3:
        pixels = random_pixels(grids)
        with torch.no_grad():
            want = tower(pixels, grids)
            monkeypatch.setattr(tower, "shape_graphs", graphs)
            got = tower(pixels, grids)
            monkeypatch.undo()
        assert torch.equal(got, want)
    assert (graphs.num_captures, graphs.num_replays) == (2, 4)


@pytest.mark.cuda
def test_cuda_graph_replays_equal_eager_calls(towers):
    """Real CUDA graphs (bf16): replays with fresh pixels give the eager
    tower's tokens, for two keys alternating."""
    _, _, tower = towers
    keys = [several_grids(), [(1, MERGE_SIZE * 3, MERGE_SIZE * 5)]]
    graphs = graphed(tower, emulate=False)
    eager = tower.shape_graphs
    tower.to("cuda", torch.bfloat16)
    try:
        for grids in keys * 3:
            pixels = random_pixels(grids).to("cuda", torch.bfloat16)
            with torch.no_grad():
                want = tower(pixels, grids)
                tower.shape_graphs = graphs
                try:
                    got = tower(pixels, grids)
                finally:
                    tower.shape_graphs = eager
            torch.testing.assert_close(got, want)
    finally:
        tower.to("cpu", torch.float32)
    assert graphs.enabled and (graphs.num_captures, graphs.num_replays) == (2, 4)


def test_built_under_a_bfloat16_default_equals_the_converted_tower(towers):
    """As the loader builds it (default dtype bf16): the rotary table stays
    float32, so the tokens equal those of the float32 tower cast to bf16."""
    _, hf_visual, tower = towers
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        built = type(tower)(hf_visual.config).eval()
    finally:
        torch.set_default_dtype(previous)
    built.load_state_dict(tower.state_dict())
    grids = several_grids()
    pixels = random_pixels(grids)
    with torch.no_grad():
        got = built(pixels, grids)
        want = tower.to(torch.bfloat16)(pixels, grids)
        tower.float()
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


# --- rotary, metadata and names -------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_bit_exact_with_transformers(dtype):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLVisionRotaryEmbedding, apply_rotary_pos_emb_vision)
    from transformers.vision_utils import get_vision_position_ids

    from pyvlm.models.vision.qwen_layers import VisionRotaryEmbedding

    config = tiny_qwen2_vl("2").config.vision_config
    head_dim = config.embed_dim // config.num_heads
    grids = random_grids(3)
    positions = get_vision_position_ids(torch.tensor(grids), MERGE_SIZE)
    query, key = (torch.randn(positions.shape[0], config.num_heads, head_dim).to(dtype)
                  for _ in range(2))
    cos, sin = Qwen2VLVisionRotaryEmbedding(config)(query, positions)
    want_query, want_key = apply_rotary_pos_emb_vision(query, key, cos, sin)
    rotary = VisionRotaryEmbedding(head_dim, 10000.0).for_positions(
        rotary_positions(grids, MERGE_SIZE), torch.device("cpu"))
    rotary.rotate_(query, key)
    assert torch.equal(query, want_query) and torch.equal(key, want_key)


def random_grids(num: int):
    return [(random_units(1, 3), MERGE_SIZE * random_units(1, 9), MERGE_SIZE * random_units(1, 9))
            for _ in range(num)]


def test_metadata_matches_transformers_vision_utils():
    from transformers.vision_utils import (get_vision_cu_seqlens, get_vision_position_ids,
                                           get_vision_window_index)

    grids = random_grids(5)
    grid_thw = torch.tensor(grids)
    assert torch.equal(rotary_positions(grids, MERGE_SIZE),
                       get_vision_position_ids(grid_thw, MERGE_SIZE))
    lengths = torch.tensor([0] + frame_lengths(grids)).cumsum(0)
    assert torch.equal(lengths.int(), get_vision_cu_seqlens(grid_thw))
    index, sizes = window_order(grids, MERGE_SIZE, WINDOW_UNITS)
    want_index, want_cu = get_vision_window_index(grid_thw, MERGE_SIZE, WINDOW_SIZE, PATCH_SIZE)
    assert torch.equal(index, want_index)
    assert torch.equal(torch.tensor([0] + sizes).cumsum(0).int() * MERGE_SIZE ** 2, want_cu)


@pytest.mark.parametrize("version", list(TOWERS))
def test_parameter_names_are_transformers_visual_names(version):
    hf_model = tiny_qwen2_vl(version)
    tower = TOWERS[version](hf_model.config.vision_config)
    assert dict(tower.named_parameters()).keys() == visual_state(hf_model).keys()
    assert tower.state_dict().keys() == visual_state(hf_model).keys()  # no extra buffers


def test_bad_grids_and_pixel_rows_raise(towers):
    _, _, tower = towers
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        tower(torch.randn(12, PATCH_DIM), [(1, 3, 4)])
    with pytest.raises(ValueError, match="patch rows"):
        tower(torch.randn(12, PATCH_DIM), [(1, 4, 4)])
