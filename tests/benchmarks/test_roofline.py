"""benchmarks/offline/roofline.py's attention FLOPs against transformers'
own: its eager attention run under torch's FlopCounterMode on the
benchmark's narrow shapes (real tokenizer, image processing and tiling,
tiny widths), with the benchmark's own prompt and PromptShape, counts every
QK^T and PV (the bmm inside each attention module). The floor must count
exactly that, but where the lower bound leaves work out: half of the
prompt's square (transformers computes the causal mask's whole square),
Llama-3.2-Vision's padding rows (transformers pads each tile to a multiple
of 8 rows), and the CLIP layers past the feature layer that pyvlm does not
build. Also Qwen2.5-VL's windows (partial at the grid's edges) against its
tower, and the real Llama-3.2-Vision count the brief quotes."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.offline.roofline import (AttentionSegments, DeviceRates, Roofline, config_cost,
                                         qwen_tower_attention, tiled_tower_attention,
                                         tower_attention_width)

NARROW_SHAPES = ["qwen2-vl-7b-narrow", "llama-3.2-11b-vision-narrow", "llava-1.5-7b-narrow",
                 "llava-next-7b-narrow", "llava-onevision-7b-narrow"]
RATES = DeviceRates(copy_bytes_per_s=2.9e12, matmul_flops_per_s=7.8e14)
TOWERS = (".visual.", ".vision_tower.", ".vision_model.")


def attention_bmm_flops(model, inputs) -> dict:
    """transformers' attention module path (model's own names) -> the FLOPs
    of its bmm (QK^T and PV) in one forward."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return {name.split(".", 1)[1]: ops.get(torch.ops.aten.bmm, 0)
            for name, ops in counter.get_flop_counts().items() if name.endswith("attn")}


def benchmark_prompt(shape: str, folder):
    """The benchmark's one-image prompt as transformers' processor builds
    it, and the PromptShape the floors read."""
    from benchmarks.load.images import distinct_pictures
    from benchmarks.load.serve_random import config_for
    from benchmarks.load.serving_phases import image_size_for
    from benchmarks.offline import hf_baseline
    from benchmarks.offline.random_models import write_checkpoint_metadata

    config = config_for(shape)
    write_checkpoint_metadata(folder, config)
    image = distinct_pictures(1, image_size_for(shape), None)[0]
    features = hf_baseline.hf_processor(folder, config)(
        text=hf_baseline.server_prompt_texts(folder, 1), images=[image], padding=True,
        return_tensors="pt")
    return config, features, hf_baseline.shape_of(features, config)


@pytest.mark.parametrize("shape", NARROW_SHAPES)
def test_the_prefill_floor_counts_the_attention_transformers_runs(shape, tmp_path):
    import transformers

    from pyvlm.models.registry import model_class_for

    config, features, prompt = benchmark_prompt(shape, tmp_path)
    torch.manual_seed(0)
    theirs = getattr(transformers, config.architectures[0])._from_config(
        config, attn_implementation="eager").eval()
    flops = attention_bmm_flops(theirs, features)
    with torch.device("meta"):
        ours = model_class_for(config.architectures)(config)
    weights = [n for n, _ in theirs.named_parameters()]

    def pyvlm_builds(module: str) -> bool:
        return any(ours.model_name_of(n) for n in weights if n.startswith(module + "."))

    towers = [m for m in flops if any(t in m for t in TOWERS)]
    built = [m for m in towers if pyvlm_builds(m)]
    # LLaVA-1.5 / NeXT: CLIP's 3 layers run there, the 2 up to layer -2 here
    assert len(towers) - len(built) == (config.model_type in ("llava", "llava_next"))
    tower = sum(flops[m] for m in built)
    text = sum(f for m, f in flops.items() if ".language_model." in m and m.endswith("self_attn"))
    cross = sum(f for m, f in flops.items() if m.endswith("cross_attn"))
    assert tower and text and ("llama" in shape) == bool(cross), flops
    if config.model_type == "mllama":  # 4 tiles of 1601 rows, each padded to 1608 there
        assert prompt.num_image_rows == 4 * 1601
        tower = tower * (4 * 1601) ** 2 // (4 * 1608) ** 2
    roofline = Roofline(config_cost(config, torch.float32), RATES)
    n, rows = prompt.num_prompt_tokens, prompt.num_image_rows
    linear = roofline.linear_flops(n, prompt.num_tower_tokens, rows)
    assert roofline.attention_flops(n, rows, prompt.tower_attention) == tower + text // 2 + cross
    assert roofline.prefill_flops(n, prompt.num_tower_tokens, rows,
                                  tower_attention=prompt.tower_attention) == pytest.approx(
        linear + tower + text / 2 + cross, rel=1e-12)


@pytest.mark.parametrize("grids", [[(1, 10, 14)], [(1, 10, 14), (1, 4, 6)], [(2, 8, 8)]])
def test_qwen2_5_vl_windows_and_full_blocks_count_what_its_tower_runs(grids):
    """The tiny Qwen2.5-VL tower: windows of 2 x 2 merged units, partial at
    the right and bottom edges of a 5 x 7 unit grid, block 1 of 3 full."""
    import transformers

    from tests.tiny_qwen2_vl import qwen2_vl_config

    config = qwen2_vl_config("2.5")
    torch.manual_seed(0)
    visual = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
        config, attn_implementation="eager").model.visual.eval()
    num_patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(num_patches, 3 * 2 * 14 * 14)
    flops = attention_bmm_flops(visual, dict(hidden_states=pixels, grid_thw=torch.tensor(grids)))
    segments = qwen_tower_attention(config, grids)
    assert [s.num_layers for s in segments] == [1, 2]
    assert 4 * tower_attention_width(config) * sum(s.num_pairs for s in segments) == sum(
        flops.values())


def test_qwen2_vl_attends_over_each_frame():
    from tests.tiny_qwen2_vl import qwen2_vl_config

    config = qwen2_vl_config("2")
    assert qwen_tower_attention(config, [(2, 4, 6), (1, 2, 2)]) == (
        AttentionSegments(2, (24, 24, 4)),)
    assert tower_attention_width(config) == 64  # embed_dim, not the merger's hidden_size


def test_llama_3_2_vision_counts_its_real_tiles_in_all_40_layers():
    """The real config: 4 tiles x 1601 rows attended jointly in 32 local +
    8 global layers, 16 heads of 80: 4 x 6404^2 x 1280 FLOPs a layer."""
    from benchmarks.offline.random_models import llama_3_2_11b_vision_config

    config = llama_3_2_11b_vision_config()
    segments = tiled_tower_attention(config, [4])
    assert segments == (AttentionSegments(40, (4 * 1601,)),)
    assert tiled_tower_attention(config, [2, 3]) == (AttentionSegments(40, (3202, 4803)),)
    cost = config_cost(config, torch.bfloat16)
    assert cost.tower_attention_width == 16 * 80
    roofline = Roofline(cost, RATES)
    assert roofline.attention_flops(0, 0, segments) == 4 * 6404 ** 2 * 1280 * 40  # 8.4e12
    # 50 prompt tokens: 32 self-attention layers (32 heads of 128), 8 cross-attention ones
    assert roofline.attention_flops(50, 6404, ()) == (2 * 50 ** 2 * 4096 * 32
                                                       + 4 * 50 * 6404 * 4096 * 8)
