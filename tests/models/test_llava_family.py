"""The image rows of LLaVA-1.5 and LLaVA-NeXT (CLIP tower at layer -2, the
projector, NeXT's anyres packing with image_newline) equal transformers'
get_image_features on tiny random models, for one image and several images
of different aspect ratios in one call."""

import pytest
import torch
from PIL import Image

from pyvlm.models.llava import LlavaForConditionalGeneration
from pyvlm.models.llava_next import LlavaNextForConditionalGeneration
from tests.tiny_models import perturb_

TILE = 56
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
              num_hidden_layers=3, num_attention_heads=4, image_size=TILE, patch_size=14,
              hidden_act="quick_gelu")
TEXT = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CLIP_PROCESSOR = dict(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                      resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                      image_std=[0.26862954, 0.26130258, 0.27577711])


def random_image(height: int, width: int) -> Image.Image:
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy())


def models(family: str, strategy: str):
    """(transformers' model, pyvlm's) with the same perturbed weights."""
    import transformers

    if family == "llava":
        config = transformers.LlavaConfig(vision_config=VISION, text_config=TEXT,
                                          image_token_index=5, vision_feature_layer=-2,
                                          vision_feature_select_strategy=strategy)
        hf, ours = transformers.LlavaForConditionalGeneration(config), LlavaForConditionalGeneration
    else:
        config = transformers.LlavaNextConfig(vision_config=VISION, text_config=TEXT,
                                              image_token_index=5, vision_feature_layer=-2,
                                              vision_feature_select_strategy=strategy,
                                              image_grid_pinpoints=PINPOINTS)
        hf, ours = (transformers.LlavaNextForConditionalGeneration(config),
                    LlavaNextForConditionalGeneration)
    perturb_(hf, int(torch.randint(0, 1000, ()).item()))
    model = ours(hf.config).eval()
    model.load_weights(hf.state_dict().items())
    return hf.eval(), model


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_image_rows_match_transformers(strategy):
    from transformers import CLIPImageProcessorPil

    hf, model = models("llava", strategy)
    images = [random_image(40, 90), random_image(70, 30)]
    pixels = CLIPImageProcessorPil(**CLIP_PROCESSOR)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = hf.model.get_image_features(pixels, vision_feature_layer=-2,
                                               vision_feature_select_strategy=strategy)
        got = model.embed_images(list(pixels[:, None]), [(40, 90), (70, 30)], [2, 2])
    expected = expected.pooler_output if hasattr(expected, "pooler_output") else expected
    expected = torch.cat(list(expected)) if isinstance(expected, (list, tuple)) else expected
    assert [rows.shape[0] for rows in got] == [16 + (strategy == "full")] * 2
    torch.testing.assert_close(torch.cat(got), expected.reshape(-1, 64), rtol=1e-5, atol=1e-5)


def test_llava_next_image_rows_match_transformers():
    """("full" keeps CLIP's class token: 17 features are no tile grid, and
    transformers' own packing refuses it.)"""
    from transformers import LlavaNextImageProcessorPil

    strategy = "default"
    hf, model = models("llava_next", strategy)
    sizes = [(40, 100), (120, 50), (56, 56)]
    images = [random_image(h, w) for h, w in sizes]
    processor = LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, **CLIP_PROCESSOR)
    inputs = processor(images, return_tensors="pt")
    with torch.no_grad():
        expected = hf.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                               vision_feature_layer=-2,
                                               vision_feature_select_strategy=strategy)
        got = model.embed_images(list(inputs["pixel_values"]), sizes, [3, 3, 3])
    expected = list(expected.pooler_output)
    assert [rows.shape for rows in got] == [rows.shape for rows in expected]
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
