"""Parity of the mllama cross-attention decoder layer with transformers'."""

import pytest
import torch

from pyvlm.models.mllama_cross_attention import MllamaCrossAttentionDecoderLayer
from pyvlm.models.weight_loading import load_weights

hf_mllama = pytest.importorskip("transformers.models.mllama.modeling_mllama",
                                reason="transformers is the reference")
from transformers import MllamaTextConfig  # noqa: E402

IMAGES, TILES, PATCHES, HIDDEN = 2, 2, 24, 64


def _hf_layer():
    config = MllamaTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=128, num_hidden_layers=2,
                              cross_attention_layers=[1], vocab_size=128)
    config._attn_implementation = "eager"
    layer = hf_mllama.MllamaCrossAttentionDecoderLayer(config, layer_idx=1).eval()
    with torch.no_grad():
        # every parameter perturbed: the gates init to 0 (tanh 0 would hide the blocks)
        for param in layer.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        for gate in (layer.cross_attn_attn_gate, layer.cross_attn_mlp_gate):
            gate.add_(torch.randn(1).sign() * (0.5 + torch.rand(1)))
    return config, layer


def _tile_mask():
    """[1, T, images, tiles] 0/1: 3 tokens before any image, 4 seeing image 0,
    5 seeing both; image 1 has only its first tile (the second is padding)."""
    mask = torch.zeros(1, 12, IMAGES, TILES)
    mask[0, 3:7, 0, :] = 1
    mask[0, 7:, 0, :] = 1
    mask[0, 7:, 1, 0] = 1
    return mask


def test_matches_transformers():
    config, reference = _hf_layer()
    ours = MllamaCrossAttentionDecoderLayer.from_config(config)
    load_weights(ours, reference.state_dict().items(), rename=lambda name: name)
    tile_mask = _tile_mask()
    tokens = tile_mask.shape[1]
    hidden = torch.randn(1, tokens, HIDDEN)
    image_states = torch.randn(1, IMAGES * TILES * PATCHES, HIDDEN)
    additive, row_kept = hf_mllama._prepare_cross_attention_mask(
        tile_mask, num_vision_tokens=PATCHES, dtype=torch.float32)
    with torch.no_grad():
        expected = reference(hidden, image_states, additive, None, row_kept)
        attend = tile_mask[0].repeat_interleave(PATCHES, dim=2).reshape(tokens, -1).bool()
        no_image = ~attend.any(dim=-1)
        assert no_image[:3].all() and not no_image[3:].any()
        key, value = ours.image_key_value(image_states[0])
        out, residual = ours(hidden[0].clone(), None, key, value, attend, no_image)
    torch.testing.assert_close(out + residual, expected[0], rtol=1e-5, atol=1e-5)
