"""The gated cross-attention decoder layer of Llama-3.2-Vision (mllama).

Text tokens attend to the projected image states (no rotary), with q/k
RMS-normed per head; the attention and MLP outputs enter the residual
stream scaled by tanh of learned gates. Module and parameter names mirror
transformers' MllamaCrossAttentionDecoderLayer so checkpoint names map one
to one (gate_proj/up_proj land in GatedMLP's fused gate_up_proj through
load_weights).

The image K/V do not depend on the text: a layer computes them when an
image is first used (`image_key_value`), stores its real rows in the KV
pool, and every later step reads them from there. Which rows each token
sees is the step's CrossAttentionInputs (pyvlm.models.mllama_cross_inputs).

Tensor parallel as self-attention (pyvlm.models.llama): q/k/v split by
heads (key/value heads replicated when fewer than the ranks), o_proj
row-parallel, the MLP split; each rank's pool pages hold its own image K/V
heads. The norms and gates are whole on every rank.
"""

from typing import Optional, Tuple

import torch
from torch import nn

from pyvlm import ops
from pyvlm.layers.attention import AttentionMetadata
from pyvlm.layers.linear import ColumnParallelLinear, KVParallelLinear, RowParallelLinear
from pyvlm.layers.mlp import GatedMLP
from pyvlm.layers.norm import RMSNorm
from .mllama_cross_inputs import CrossAttentionInputs

KVCache = Tuple[torch.Tensor, torch.Tensor]


class MllamaTextCrossAttention(nn.Module):
    """Multi-head (GQA) attention of text queries to image keys/values;
    num_heads and num_kv_heads are the whole layer's, self.num_heads and
    self.num_kv_heads this rank's."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, rms_norm_eps: float):
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = ColumnParallelLinear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = KVParallelLinear(hidden_size, self.head_dim, num_kv_heads, bias=False)
        self.v_proj = KVParallelLinear(hidden_size, self.head_dim, num_kv_heads, bias=False)
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden_size, bias=False)
        self.num_heads = self.q_proj.out_features // self.head_dim
        self.num_kv_heads = self.k_proj.num_kv_heads
        self.q_norm = RMSNorm(self.head_dim, rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, rms_norm_eps)

    def image_key_value(self, cross_attention_states: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """[S, hidden] image states -> (key, value), each [S, kv_heads, head_dim];
        the key is k_norm'ed, as transformers does before caching it."""
        rows = cross_attention_states.shape[0]
        key = self.k_proj(cross_attention_states).view(rows, self.num_kv_heads, self.head_dim)
        value = self.v_proj(cross_attention_states).view(rows, self.num_kv_heads, self.head_dim)
        return self.k_norm(key.contiguous()), value.contiguous()

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache,
                cross: CrossAttentionInputs) -> torch.Tensor:
        """hidden [T, hidden] (normed); kv_cache: this layer's (key, value)
        cache views; returns [T, hidden] (zero for tokens attending to nothing)."""
        tokens = hidden.shape[0]
        query = self.q_proj(hidden).view(tokens, self.num_heads, self.head_dim)
        query = self.q_norm(query.contiguous())
        key_cache, value_cache = kv_cache
        image_key = image_value = None
        if cross.image_states is not None:
            image_key, image_value = self.image_key_value(cross.image_states)
            if cross.write_rows is not None:
                ops.reshape_and_cache(image_key.index_select(0, cross.write_rows),
                                      image_value.index_select(0, cross.write_rows),
                                      key_cache, value_cache, cross.write_slots)
        paged = cross.paged
        if paged is not None and paged.every_token:
            # Every row reads one stored image (a decode step; in a graph,
            # rows of length 0 too, which the kernel writes as zeros).
            out = ops.paged_attention_decode(query, key_cache, value_cache, paged.block_tables,
                                             paged.seq_lens, self.scale)
            return self.o_proj(out.view(tokens, -1))
        out = query.new_zeros(query.shape)
        if paged is not None:
            out.index_copy_(0, paged.tokens, ops.paged_attention_decode(
                query.index_select(0, paged.tokens), key_cache, value_cache,
                paged.block_tables, paged.seq_lens, self.scale))
        if cross.gathered is not None:
            gathered = cross.gathered
            out.index_copy_(0, gathered.tokens, gathered.attend(
                query.index_select(0, gathered.tokens), gathered.keys(key_cache, image_key),
                gathered.keys(value_cache, image_value), self.scale))
        return self.o_proj(out.view(tokens, -1))


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """Cross-attention block with tanh-gated attention and MLP, with
    LlamaDecoderLayer's forward signature (it sits among them in the
    decoder); kv_cache is this layer's view of the image K/V pages."""

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
        self.gates_in_weights = False  # after_weights_loaded() folded the gates in

    @torch.no_grad()
    def after_weights_loaded(self) -> None:
        """Folds the gates into the weights they scale: o_proj by tanh(attention
        gate), down_proj by tanh(MLP gate), each a linear map without bias
        (under tensor parallelism, this rank's slice: the all-reduce sums
        scaled parts). A step then runs no tanh and no gate product, four
        kernels per layer that a batch-1 decode step pays in launches."""
        if self.gates_in_weights:
            return
        for linear, gate in ((self.cross_attn.o_proj, self.cross_attn_attn_gate),
                             (self.mlp.down_proj, self.cross_attn_mlp_gate)):
            if linear.bias is not None:
                raise ValueError("a gate folds only into a linear map without bias")
            linear.weight.mul_(gate.float().tanh().to(linear.weight.dtype))
        self.gates_in_weights = True

    @classmethod
    def from_config(cls, text_config) -> "MllamaCrossAttentionDecoderLayer":
        """From a transformers MllamaTextConfig."""
        if getattr(text_config, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"mllama text hidden_act {text_config.hidden_act!r} "
                                      "(supported: silu)")
        return cls(text_config.hidden_size, text_config.intermediate_size,
                   text_config.num_attention_heads, text_config.num_key_value_heads,
                   text_config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: Optional[torch.Tensor], kv_cache: KVCache,
                attn: AttentionMetadata) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns (gated MLP output, residual stream before it), as
        LlamaDecoderLayer; a step without images passes its input through
        unchanged (transformers skips the layer for prompts without images)."""
        cross: Optional[CrossAttentionInputs] = attn.cross_attention
        if cross is None:
            return hidden, residual
        if residual is None:
            # clone: the fused norm updates the residual in place.
            residual = hidden.clone()
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        attended = self.cross_attn(hidden, kv_cache, cross)
        if not self.gates_in_weights:
            attended = self.cross_attn_attn_gate.tanh() * attended
        hidden, residual = self.post_attention_layernorm(attended, residual)
        # transformers gates the MLP by the full-text-row mask (tokens that
        # attend to no image keep only the attention branch).
        mlp_out = cross.mlp_kept.to(hidden.dtype)[:, None] * self.mlp(hidden)
        if not self.gates_in_weights:
            mlp_out = self.cross_attn_mlp_gate.tanh() * mlp_out
        return mlp_out, residual
