"""The Llama decoder on the paged KV cache (also Qwen2: see qwen2.py).

Module names mirror transformers' LlamaModel (embed_tokens, layers.N.
self_attn / mlp / input_layernorm / post_attention_layernorm, norm) so that
checkpoint names map one to one; q/k/v and gate/up are fused.

Tensor parallel (Megatron-LM): built inside `building_with(group)` each rank
holds its attention heads (q/k/v column-parallel by heads, key/value heads
replicated when fewer than the ranks; o_proj row-parallel), its slice of
the MLP (gate/up by columns, down by rows) and of the vocabulary-parallel
embedding; norms and the rotary are whole on every rank. Two all-reduces
per layer (o_proj, down_proj) keep the residual stream whole everywhere.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from pyvlm.layers.attention import AttentionMetadata, PagedAttention
from pyvlm.layers.linear import QKVParallelLinear, RowParallelLinear
from pyvlm.layers.mlp import GatedMLP
from pyvlm.layers.norm import RMSNorm
from pyvlm.layers.rotary import RotaryEmbedding, rope_parameters_of, rotary_for
from pyvlm.layers.vocab_parallel import VocabParallelEmbedding

KVCache = Tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DecoderShape:
    """The sizes and biases of a Llama-family decoder, read from its HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, config, qkv_bias: Optional[bool] = None) -> "DecoderShape":
        """qkv_bias overrides the config (Qwen2 always has q/k/v biases)."""
        attention_bias = bool(getattr(config, "attention_bias", False))
        num_heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
            num_heads=num_heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=config.rms_norm_eps, max_position=config.max_position_embeddings,
            qkv_bias=attention_bias if qkv_bias is None else qkv_bias, o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)))


class LlamaAttention(nn.Module):
    """Self-attention over the paged KV cache with this rank's heads (all
    of them at one rank)."""

    def __init__(self, shape: DecoderShape, rotary: RotaryEmbedding):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(shape.hidden_size, shape.head_dim, shape.num_heads,
                                          shape.num_kv_heads, shape.qkv_bias)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(shape.num_heads * shape.head_dim, shape.hidden_size,
                                        shape.o_bias)
        self.rotary = [rotary]  # shared by all layers; a list keeps it out of the module tree
        # The rank's query and key/value heads: its KV cache holds only those.
        self.attn = PagedAttention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads,
                                   shape.head_dim, scale=shape.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache,
                attn: AttentionMetadata) -> torch.Tensor:
        return self.o_proj(self.attend(self.project(positions, hidden), kv_cache, attn))

    def project(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The fused q/k/v rows [T, q_size + 2 * kv_size], q and k rotated."""
        qkv = self.qkv_proj(hidden)
        query, key, _ = self._split(qkv)
        self.rotary[0](positions, query, key)
        return qkv

    def attend(self, qkv: torch.Tensor, kv_cache: KVCache, attn: AttentionMetadata,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of project()'s rows over the paged cache (their K/V
        written into it) [T, q_size], into `out` when given."""
        query, key, value = self._split(qkv)
        return self.attn(query, key, value, kv_cache, attn, out=out)

    def _split(self, qkv: torch.Tensor):
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, shape: DecoderShape, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = LlamaAttention(shape, rotary)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = GatedMLP(shape.hidden_size, shape.intermediate_size, shape.mlp_bias)

    def forward(self, positions, hidden, residual, kv_cache, attn):
        """Returns (this layer's MLP output, the residual stream before it)."""
        qkv, residual = self.before_attention(positions, hidden, residual)
        return self.after_attention(self.self_attn.attend(qkv, kv_cache, attn), residual)

    # The forward in three parts, so that a step can run the parts around
    # attention as captured CUDA graphs (pyvlm.runner.prefill_graphs): only
    # attend() depends on the step's sequences; these two are row by row.

    def before_attention(self, positions: torch.Tensor, hidden: torch.Tensor,
                         residual: Optional[torch.Tensor]
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rotated q/k/v rows, the residual stream): the input norm (added
        to the residual) and the projection."""
        if residual is None:
            # clone: the fused norms update the residual in place, and the
            # first residual is the caller's embeddings.
            residual = hidden.clone()
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return self.self_attn.project(positions, hidden), residual

    def after_attention(self, attention: torch.Tensor, residual: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the MLP output, the residual stream before it) from attend()'s rows."""
        hidden = self.self_attn.o_proj(attention)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


# (layer index, shape, the shared rotary) -> the decoder layer at that index,
# with LlamaDecoderLayer's forward. The hook for decoders whose layers are not
# all self-attention: Llama-3.2-Vision puts gated cross-attention layers at
# its config's cross_attention_layers through it.
LayerFactory = Callable[[int, DecoderShape, RotaryEmbedding], nn.Module]


def self_attention_layer(index: int, shape: DecoderShape, rotary: RotaryEmbedding) -> nn.Module:
    """The default layer: self-attention over the paged KV cache, then the MLP."""
    return LlamaDecoderLayer(shape, rotary)


class LlamaModel(nn.Module):
    """Token embeddings, decoder layers and the final norm (no lm_head).
    layer_factory builds each layer (default: self_attention_layer);
    num_extra_embeddings: embedding rows past the vocabulary (Llama-3.2-
    Vision embeds its <|image|> token, id vocab_size, in 8 extra rows)."""

    def __init__(self, config, qkv_bias: Optional[bool] = None,
                 layer_factory: LayerFactory = self_attention_layer,
                 num_extra_embeddings: int = 0):
        super().__init__()
        shape = DecoderShape.from_config(config, qkv_bias)
        self.shape = shape
        self.rotary_emb = rotary_for(shape.head_dim, shape.max_position,
                                     rope_parameters_of(config))
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size + num_extra_embeddings,
                                                   shape.hidden_size)
        self.layers = nn.ModuleList(layer_factory(index, shape, self.rotary_emb)
                                    for index in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata, kv_caches: List[KVCache],
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-norm hidden states [T, hidden] of the step's packed tokens;
        positions int64 [T], or [3, T] for M-RoPE."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden
