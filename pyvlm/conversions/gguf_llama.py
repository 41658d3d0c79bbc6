"""Reading a llama.cpp GGUF file of the "llama" architecture: its metadata
as transformers' LlamaConfig fields, and its tensors dequantised to float32
under transformers' LlamaModel names.

Needs the gguf package (`pip install gguf`), imported on first use.
"""

from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import numpy as np

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj"}


def open_gguf(path: Path):
    """A gguf.GGUFReader of path; ImportError when gguf is not installed."""
    import gguf

    return gguf.GGUFReader(str(path))


def metadata(reader, key: str) -> Any:
    """The value of one GGUF metadata key ("llama.block_count")."""
    return reader.fields[key].contents()


def float32_value(value) -> float:
    """A float GGUF stored as float32, as its shortest float32 spelling:
    1e-5 comes back as 9.99999974e-06, and this gives back 1e-05."""
    return float(str(np.float32(value)))


def llama_text_config(reader, vocab_size: int) -> Dict[str, Any]:
    """The LlamaConfig fields the GGUF metadata holds (vocab_size given: the
    caller may have added tokens)."""
    return dict(
        model_type="llama", vocab_size=vocab_size,
        hidden_size=metadata(reader, "llama.embedding_length"),
        intermediate_size=metadata(reader, "llama.feed_forward_length"),
        num_hidden_layers=metadata(reader, "llama.block_count"),
        num_attention_heads=metadata(reader, "llama.attention.head_count"),
        num_key_value_heads=metadata(reader, "llama.attention.head_count_kv"),
        max_position_embeddings=metadata(reader, "llama.context_length"),
        rms_norm_eps=float32_value(metadata(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float32_value(metadata(reader, "llama.rope.freq_base")),
        bos_token_id=metadata(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata(reader, "tokenizer.ggml.padding_token_id"))


def hf_llama_name(gguf_name: str) -> str:
    """transformers' LlamaModel name of a llama.cpp tensor name."""
    if gguf_name == "token_embd.weight":
        return "embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "norm.weight"
    _, layer, module, suffix = gguf_name.split(".")
    return f"layers.{layer}.{_GGUF_LAYER_NAMES[module]}.{suffix}"


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's convert-time permutation of q/k rows (it interleaves
    each head's two rotary halves; transformers' GGUF loader undoes it too)."""
    head_dim_half = weight.shape[0] // num_heads // 2
    grouped = weight.reshape(num_heads, head_dim_half, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def dequantized_tensors(reader) -> Iterator[Tuple[str, np.ndarray]]:
    """(transformers name, float32 array) of every GGUF tensor."""
    from gguf import quants

    num_heads = metadata(reader, "llama.attention.head_count")
    num_kv_heads = metadata(reader, "llama.attention.head_count_kv")
    for tensor in reader.tensors:
        # GGUF shapes list the fastest dimension first; the array is row-major.
        array = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        array = array.reshape([int(n) for n in reversed(tensor.shape.tolist())])
        if ".attn_q." in tensor.name:
            array = unpermute_qk(array, num_heads)
        elif ".attn_k." in tensor.name:
            array = unpermute_qk(array, num_kv_heads)
        yield hf_llama_name(tensor.name), array
