"""The gated cross-attention decoder layer of Llama-3.2-Vision (mllama).

Text tokens attend to the projected image states (no rotary), with q/k
RMS-normed per head; the attention and MLP outputs enter the residual
stream scaled by tanh of learned gates. Module and parameter names mirror
transformers' MllamaCrossAttentionDecoderLayer so checkpoint names map one
to one (gate_proj/up_proj land in GatedMLP's fused gate_up_proj through
load_weights).

The image K/V do not depend on the text, so `image_key_value` computes them
once per image; `forward` takes them precomputed (the engine keeps them in
its pool) with a per-token mask of the image rows each token may see.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pyvlm.layers.linear import ColumnParallelLinear, RowParallelLinear
from pyvlm.layers.mlp import GatedMLP
from pyvlm.layers.norm import RMSNorm


class MllamaTextCrossAttention(nn.Module):
    """Multi-head (GQA) attention of text queries to image keys/values."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, rms_norm_eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = ColumnParallelLinear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = ColumnParallelLinear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = ColumnParallelLinear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, rms_norm_eps)

    def image_key_value(self, cross_attention_states: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """[S, hidden] image states -> (key, value), each [S, kv_heads, head_dim];
        the key is k_norm'ed, as transformers does before caching it."""
        rows = cross_attention_states.shape[0]
        key = self.k_proj(cross_attention_states).view(rows, self.num_kv_heads, self.head_dim)
        value = self.v_proj(cross_attention_states).view(rows, self.num_kv_heads, self.head_dim)
        return self.k_norm(key.contiguous()), value

    def forward(self, hidden: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attend_mask: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden]; key/value [S, kv_heads, head_dim]; attend_mask
        bool [T, S] (every row must allow at least one image row)."""
        tokens = hidden.shape[0]
        query = self.q_proj(hidden).view(tokens, self.num_heads, self.head_dim)
        query = self.q_norm(query.contiguous())
        groups = self.num_heads // self.num_kv_heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
            attn_mask=attend_mask)
        return self.o_proj(out.transpose(0, 1).reshape(tokens, -1))


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """Cross-attention block with tanh-gated attention and MLP.

    The forward follows LlamaDecoderLayer's residual convention (returns
    this layer's MLP output and the residual stream before it) but takes
    the image K/V and masks instead of (positions, kv_cache, attn)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int,
                 num_kv_heads: int, rms_norm_eps: float):
        super().__init__()
        self.cross_attn = MllamaTextCrossAttention(hidden_size, num_heads, num_kv_heads,
                                                   rms_norm_eps)
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = GatedMLP(hidden_size, intermediate_size)
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    @classmethod
    def from_config(cls, text_config) -> "MllamaCrossAttentionDecoderLayer":
        """From a transformers MllamaTextConfig."""
        return cls(text_config.hidden_size, text_config.intermediate_size,
                   text_config.num_attention_heads, text_config.num_key_value_heads,
                   text_config.rms_norm_eps)

    def image_key_value(self, cross_attention_states: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """This layer's (key, value) of [S, hidden] image states; compute once per image."""
        return self.cross_attn.image_key_value(cross_attention_states)

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                key: torch.Tensor, value: torch.Tensor, attend_mask: torch.Tensor,
                no_image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, hidden] (with residual None: the layer input itself);
        attend_mask bool [T, S]: the image rows each token may attend to;
        no_image bool [T]: tokens that attend to no image. Returns (gated
        MLP output, residual stream before it), as LlamaDecoderLayer."""
        if residual is None:
            # clone: the fused norm updates the residual in place.
            residual = hidden.clone()
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        # transformers lets a token that sees no image attend to every image
        # row (its additive mask row is zeroed), and gates only the MLP by
        # the row mask: kept for parity (the attention gate still applies).
        attend_mask = attend_mask | no_image[:, None]
        attended = self.cross_attn(hidden, key, value, attend_mask)
        hidden, residual = self.post_attention_layernorm(
            self.cross_attn_attn_gate.tanh() * attended, residual)
        kept = (~no_image).to(hidden.dtype)[:, None]
        return self.cross_attn_mlp_gate.tanh() * (kept * self.mlp(hidden)), residual
