"""GGUF tensor names and llama.cpp's q/k permutation (no GGUF file needed:
the permutation is checked against llama.cpp's own formula)."""

import random

import numpy as np

from pyvlm.conversions import gguf_llama


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, applied at conversion.
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def test_unpermute_qk_inverts_llama_cpp_permutation():
    num_heads, head_dim = random.choice([(9, 64), (3, 64), (4, 8)])
    weight = np.random.default_rng().standard_normal((num_heads * head_dim, 24)).astype(np.float32)
    permuted = _llama_cpp_permute(weight, num_heads)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(gguf_llama.unpermute_qk(permuted, num_heads), weight)


def test_gguf_names_map_onto_llama():
    assert gguf_llama.hf_llama_name("token_embd.weight") == "embed_tokens.weight"
    assert gguf_llama.hf_llama_name("output_norm.weight") == "norm.weight"
    assert gguf_llama.hf_llama_name("blk.7.attn_k.weight") == "layers.7.self_attn.k_proj.weight"
    assert (gguf_llama.hf_llama_name("blk.0.ffn_norm.weight")
            == "layers.0.post_attention_layernorm.weight")


def test_float32_metadata_reads_back_as_written():
    value = random.choice([1e-5, 1e-6, 0.1, 0.02])  # none is exact in float32
    stored = float(np.float32(value))
    assert stored != value
    assert gguf_llama.float32_value(stored) == value
