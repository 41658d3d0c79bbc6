"""What the SigLIP and CLIP towers share: pre-norm ViT encoder layers over
square tiles, read at the selected feature layers.

Every tile of every image runs in one call; attention is block-diagonal per
tile (pyvlm.layers.packed_attention), so tiles of different images never mix. Only
the layers up to the deepest selected feature layer are built, as later
layers cannot change the selected hidden states. Module names are
transformers' (layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
mlp.fc1/fc2; q/k/v fused into self_attn.qkv_proj), so checkpoint tensors
load one to one.

Tensor parallel: built under a group of several ranks (a tower built in
`building_tower()` with shard_towers), attention splits by heads and the
MLP by fc1 columns and fc2 rows, as the decoder's; embeddings and layer
norms stay whole on every rank.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pyvlm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pyvlm.layers.norm import LayerNorm, norm_with_residual
from pyvlm.layers.packed_attention import packed_attention

from .qwen_layers import vision_activation

FeatureLayers = Union[int, Sequence[int]]


def resolve_feature_layers(feature_layer: FeatureLayers, num_layers: int) -> List[int]:
    """Indices into the hidden states (0 = embeddings, i = after layer i),
    negative ones resolved as transformers does (num_layers + 1 states)."""
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    num_states = num_layers + 1
    for index in layers:
        if not -num_states <= index < num_states:
            raise ValueError(f"vision_feature_layer {index} is out of range for "
                             f"{num_layers} layers")
    return [index % num_states for index in layers]


def tile_cu_seqlens(num_tiles: int, num_patches: int, device: torch.device) -> torch.Tensor:
    """Sequence boundaries of num_tiles equal tiles packed one after another."""
    return torch.arange(0, (num_tiles + 1) * num_patches, num_patches, dtype=torch.int32,
                        device=device)


class VitAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections; under
    several ranks each holds its heads (num_heads is the rank's) and
    out_proj sums the ranks' heads."""

    def __init__(self, config):
        super().__init__()
        num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // num_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, num_heads,
                                          num_heads, bias=True)
        self.out_proj = RowParallelLinear(config.hidden_size, config.hidden_size)
        self.num_heads = self.qkv_proj.num_heads

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """hidden [num_tiles, num_patches, hidden]: attention within each tile."""
        num_tiles, num_patches, hidden_size = hidden.shape
        qkv = self.qkv_proj(hidden.reshape(num_tiles * num_patches, hidden_size))
        q_size = self.qkv_proj.q_size
        query, key, value = (t.view(-1, self.num_heads, self.head_dim)
                             for t in qkv.split(q_size, dim=-1))
        out = packed_attention(query, key, value, cu_seqlens, cu_seqlens, num_patches,
                               num_patches, self.head_dim ** -0.5, equal_lengths=True)
        return self.out_proj(out.view(num_tiles, num_patches, q_size))


class VitMLP(nn.Module):
    """fc1, the config's hidden_act (gelu, gelu_pytorch_tanh, quick_gelu), fc2."""

    def __init__(self, config):
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act = vision_activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden)))


class VitEncoderLayer(nn.Module):
    """Pre-norm attention + MLP over a residual stream carried unsummed
    between layers (as qwen_layers.VisionBlock): takes the previous layer's
    MLP output and the residual (None in the first layer), returns its own
    MLP output and residual, whose sum is the layer's output. layer_norm1
    fuses the previous layer's MLP add, layer_norm2 the attention add."""

    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VitAttention(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VitMLP(config)

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                cu_seqlens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = norm_with_residual(self.layer_norm1, hidden, residual)
        hidden, residual = self.layer_norm2(self.self_attn(hidden, cu_seqlens), residual)
        return self.mlp(hidden), residual


class VitEncoder(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(VitEncoderLayer(config) for _ in range(num_layers))

    def forward(self, hidden: torch.Tensor, feature_layers: Sequence[int]) -> torch.Tensor:
        """hidden: the embeddings [num_tiles, num_patches, hidden] (state 0,
        taken in place by the first layer); the states at feature_layers,
        concatenated along the features. A selected state is the sum of its
        layer's two outputs (the last layer's add is plain)."""
        num_tiles, num_patches, _ = hidden.shape
        cu_seqlens = tile_cu_seqlens(num_tiles, num_patches, hidden.device)
        states = {0: hidden.clone()} if 0 in feature_layers else {}
        residual = None
        for index, layer in enumerate(self.layers, start=1):
            hidden, residual = layer(hidden, residual, cu_seqlens)
            if index in feature_layers:
                states[index] = hidden + residual
        return torch.cat([states[index] for index in feature_layers], dim=-1)


class VitTower(nn.Module):
    """A tower returning the hidden states at feature_layer (transformers'
    hidden_states[i]: 0 = embeddings, i = after layer i; several indices
    concatenated along the features), never the final post-layernorm.

    A subclass builds its embeddings after calling this constructor, then
    self.encoder, and defines embed(); UNUSED_PREFIXES names checkpoint
    tensors (relative to the tower) it never reads.
    """

    UNUSED_PREFIXES: Tuple[str, ...] = ()

    def __init__(self, config, feature_layer: FeatureLayers):
        super().__init__()
        self.feature_layers = resolve_feature_layers(feature_layer, config.num_hidden_layers)
        self.num_layers_used = max(self.feature_layers)

    def build_encoder(self, config) -> None:
        self.encoder = VitEncoder(config, self.num_layers_used)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_tiles, C, S, S] -> hidden state 0 [num_tiles, num_positions, hidden]."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_tiles, C, S, S] -> [num_tiles, num_positions, hidden * num_feature_layers]."""
        return self.encoder(self.embed(pixel_values), self.feature_layers)

    def is_unused_weight(self, name: str) -> bool:
        """Checkpoint tensors (name relative to the tower) this tower does not
        need: UNUSED_PREFIXES and the layers past the deepest selected one."""
        if name.startswith(self.UNUSED_PREFIXES):
            return True
        parts = name.split(".")
        return parts[:2] == ["encoder", "layers"] and int(parts[2]) >= self.num_layers_used
