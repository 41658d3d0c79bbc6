"""Rotary embeddings against transformers' rope init functions and its
apply_rotary_pos_emb."""

import pytest
import torch

from pyvlm.layers.rotary import (RotaryEmbedding, cos_sin_cache, default_inv_freq, inv_freq_for,
                                 rope_parameters_of)

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def llama_config(rope_parameters):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=256,
                       rope_parameters=dict(rope_parameters))


@pytest.mark.parametrize("rope_type", ROPE_PARAMETERS)
def test_inv_freq_matches_transformers(rope_type):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_config(ROPE_PARAMETERS[rope_type])
    if rope_type == "default":
        ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[rope_type](config)
    ours = inv_freq_for(32, rope_parameters_of(config))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_cos_sin_cache_is_transformers_table():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    max_position, head_dim = 512, 128
    config = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2,
                         max_position_embeddings=max_position,
                         rope_parameters=dict(ROPE_PARAMETERS["default"]))
    x = torch.zeros(1, max_position, head_dim)
    cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(max_position)[None])
    cache = cos_sin_cache(default_inv_freq(head_dim, 500000.0), max_position)
    half = head_dim // 2
    assert torch.equal(cache[:, :half], cos[0, :, :half])
    assert torch.equal(cache[:, half:], sin[0, :, :half])


def test_old_rope_scaling_fields_are_read():
    class OldConfig:
        rope_theta = 1234.0
        rope_scaling = {"type": "linear", "factor": 2.0}

    params = rope_parameters_of(OldConfig())
    assert params["rope_type"] == "linear" and params["rope_theta"] == 1234.0
    assert params["factor"] == 2.0


def test_unsupported_rope_type_is_named():
    with pytest.raises(NotImplementedError, match="yarn"):
        inv_freq_for(32, {"rope_type": "yarn", "rope_theta": 1e4})


@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_rotation_matches_apply_rotary_pos_emb(rope_type):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = llama_config(ROPE_PARAMETERS[rope_type])
    num_tokens, num_heads, num_kv_heads, head_dim = 7, 4, 2, 32
    positions = torch.randint(0, 200, (num_tokens,))
    query, key = torch.randn(num_tokens, num_heads, head_dim), torch.randn(num_tokens, num_kv_heads, head_dim)
    cos, sin = LlamaRotaryEmbedding(config)(query, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                        cos, sin)
    rotary = RotaryEmbedding(head_dim, 256, rope_parameters_of(config))
    # a fused qkv row, rotated through strided views
    qkv = torch.cat([query.flatten(1), key.flatten(1), torch.zeros(num_tokens, 5)], dim=1)
    q_view, k_view = qkv[:, :num_heads * head_dim], qkv[:, num_heads * head_dim:-5]
    rotary(positions, q_view, k_view)
    torch.testing.assert_close(q_view.view_as(query), ref_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_view.reshape_as(key), ref_k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
