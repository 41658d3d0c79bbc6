"""The CLIP tower (LLaVA-1.5 / LLaVA-NeXT) returns transformers'
CLIPVisionModel hidden states at the selected feature layers, CLS position
included, and loads its checkpoint names, skipping exactly the unused ones."""

import pytest
import torch

from pyvlm.models.vision.clip import CLIPVisionTower
from pyvlm.models.weight_loading import WeightLoader, load_weights
from tests.tiny_models import perturb_

NUM_LAYERS = 4
IMAGE_SIZE, PATCH_SIZE = 56, 14  # 4 x 4 patches + CLS = 17 positions
NUM_TILES = 5


def clip_config(hidden_act: str = "quick_gelu"):
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
                              num_attention_heads=4, image_size=IMAGE_SIZE,
                              patch_size=PATCH_SIZE, hidden_act=hidden_act)
    config._attn_implementation = "eager"  # the plainest reference
    return config


def hf_clip(hidden_act: str = "quick_gelu"):
    """A float32 transformers CLIPVisionModel, perturbed so no layer is an identity."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(clip_config(hidden_act))
    perturb_(model, seed=int(torch.randint(0, 1000, ()).item()))
    return model.eval()


def tower_name_of(tower: CLIPVisionTower, checkpoint_name: str):
    """Transformers 5 names, or the hub's with a "vision_model." prefix."""
    name = checkpoint_name.removeprefix("vision_model.")
    return None if tower.is_unused_weight(name) else name


def loaded_tower(hf_model, feature_layer, weights=None) -> CLIPVisionTower:
    tower = CLIPVisionTower(hf_model.config, feature_layer).eval()
    weights = hf_model.state_dict().items() if weights is None else weights
    load_weights(tower, weights, lambda name: tower_name_of(tower, name))
    return tower


def reference(hf_model, pixel_values: torch.Tensor, feature_layer) -> torch.Tensor:
    with torch.no_grad():
        states = hf_model(pixel_values, output_hidden_states=True).hidden_states
    layers = [feature_layer] if isinstance(feature_layer, int) else feature_layer
    return torch.cat([states[index] for index in layers], dim=-1)


def random_tiles(num_tiles: int = NUM_TILES) -> torch.Tensor:
    return torch.randn(num_tiles, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("hidden_act, feature_layer", [
    ("quick_gelu", -2), ("quick_gelu", -1), ("quick_gelu", 0), ("quick_gelu", [-2, -1]),
    ("gelu", -1)])
def test_hidden_states_match_transformers(hidden_act, feature_layer):
    hf_model = hf_clip(hidden_act)
    tower = loaded_tower(hf_model, feature_layer)
    pixel_values = random_tiles()
    with torch.no_grad():
        got = tower(pixel_values)
    num_layers = 1 if isinstance(feature_layer, int) else len(feature_layer)
    assert got.shape == (NUM_TILES, (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1, 32 * num_layers)
    torch.testing.assert_close(got, reference(hf_model, pixel_values, feature_layer),
                               atol=1e-5, rtol=1e-5)


def test_layers_past_the_feature_layer_are_not_built():
    tower = CLIPVisionTower(clip_config(), feature_layer=-2)
    assert len(tower.encoder.layers) == NUM_LAYERS - 1
    assert not any("post_layernorm" in name for name, _ in tower.named_parameters())


@pytest.mark.parametrize("feature_layer", [-2, -1, 0, [0, -3]])
def test_unused_weights_are_exactly_those_without_a_parameter(feature_layer):
    hf_model = hf_clip()
    tower = CLIPVisionTower(hf_model.config, feature_layer)
    loader = WeightLoader(tower, lambda name: name)
    for name, tensor in hf_model.state_dict().items():
        loader.load(name, tensor)
    unused = {name for name in hf_model.state_dict() if tower.is_unused_weight(name)}
    assert set(loader.unknown) == unused and not loader.missing
    num_used = max(tower.feature_layers)
    assert {"post_layernorm.weight", "post_layernorm.bias"} <= unused
    assert all(name.startswith("post_layernorm.") or int(name.split(".")[2]) >= num_used
               for name in unused)


def test_loads_the_hub_layout_with_position_ids():
    """openai/clip-vit-large-patch14-336 names every tensor "vision_model.*",
    and checkpoints saved before transformers 4.31 carry position_ids."""
    hf_model = hf_clip()
    weights = [(f"vision_model.{name}", tensor) for name, tensor in hf_model.state_dict().items()]
    weights.append(("vision_model.embeddings.position_ids",
                    torch.arange((IMAGE_SIZE // PATCH_SIZE) ** 2 + 1)[None]))
    tower = loaded_tower(hf_model, -2, weights)
    pixel_values = random_tiles(2)
    with torch.no_grad():
        got = tower(pixel_values)
    torch.testing.assert_close(got, reference(hf_model, pixel_values, -2), atol=1e-5, rtol=1e-5)


def test_tiles_of_the_wrong_size_are_refused():
    tower = CLIPVisionTower(clip_config())
    with pytest.raises(ValueError, match="56x56"):
        tower(torch.randn(1, 3, IMAGE_SIZE - PATCH_SIZE, IMAGE_SIZE))


def test_unknown_activation_is_refused():
    with pytest.raises(NotImplementedError, match="relu6"):
        CLIPVisionTower(clip_config("relu6"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, limit", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_tower_matches_transformers_on_the_cpu(dtype, limit):
    """The CUDA kernels (varlen attention) serve the tower; TF32 off, so
    float32 stays float32 in the convolution and the matmuls."""
    hf_model = hf_clip()
    feature_layer = [-2, -1]
    tower = loaded_tower(hf_model, feature_layer)
    pixel_values = random_tiles()
    expected = reference(hf_model, pixel_values, feature_layer)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            got = tower.to("cuda", dtype)(pixel_values.to("cuda", dtype))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert got.device.type == "cuda" and got.dtype == dtype
    error = ((got.float().cpu() - expected).norm() / expected.norm()).item()
    assert error < limit
