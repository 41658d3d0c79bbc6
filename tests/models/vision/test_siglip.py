"""The vision tower honours vision_feature_layer (one index or several) and
the select strategy as transformers does, reading only the layers it needs."""

import numpy as np
import pytest
import torch

from pyvlm.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from pyvlm.models.vision.siglip import resolve_feature_layers
from tests.models.paged import image_processor, random_image
from tests.tiny_models import llava_onevision_config, perturb_

VARIANTS = {"second_to_last": dict(vision_feature_layer=-2),
            "embeddings_and_last": dict(vision_feature_layer=[0, -1]),
            "default_strategy": dict(vision_feature_select_strategy="default")}


def hf_variant(**overrides):
    from transformers import LlavaOnevisionForConditionalGeneration as HFModel

    config = llava_onevision_config("qwen2")
    for key, value in overrides.items():
        setattr(config, key, value)
    hf_model = HFModel(config)
    perturb_(hf_model, seed=int(torch.randint(0, 1000, ()).item()))
    return hf_model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_features_match_transformers(variant):
    hf_model = hf_variant(**VARIANTS[variant])
    model = LlavaOnevisionForConditionalGeneration(hf_model.config).eval()
    model.load_weights(hf_model.state_dict().items())
    rng = np.random.default_rng()
    images = [random_image(20, 30, rng), random_image(70, 50, rng)]
    # the "default" strategy drops a token per tile, which only the
    # multi-image (base tile only) layout of transformers accepts
    prompts = [images] if variant == "default_strategy" else [[images[0]], [images[1]]]
    inputs = image_processor()(images=prompts, return_tensors="pt")
    num_in_prompt = [len(p) for p in prompts for _ in p]
    with torch.no_grad():
        ref = hf_model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"],
            batch_num_images=inputs["batch_num_images"]).pooler_output
        out = model.embed_images(list(inputs["pixel_values"]), inputs["image_sizes"].tolist(),
                                 num_in_prompt)
    for got, want in zip(out, ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_layers_past_the_feature_layer_are_not_built():
    hf_model = hf_variant(vision_feature_layer=-2)
    model = LlavaOnevisionForConditionalGeneration(hf_model.config)
    assert len(model.vision_tower.encoder.layers) == 1
    assert not any("post_layernorm" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("index, expected", [(-1, [2]), (-2, [1]), (0, [0]), ([-3, 2], [0, 2])])
def test_feature_layer_indices_resolve_like_transformers(index, expected):
    assert resolve_feature_layers(index, num_layers=2) == expected


@pytest.mark.parametrize("index", [3, -4])
def test_out_of_range_feature_layer_raises(index):
    with pytest.raises(ValueError, match="out of range"):
        resolve_feature_layers(index, num_layers=2)
