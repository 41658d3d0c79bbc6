"""The SigLIP vision tower: patch embedding and non-causal encoder layers.

All tiles of all images run in one call; attention is block-diagonal per
tile (ops.varlen_attention), so tiles of different images never mix. Only
the layers up to the deepest selected feature layer are built, as later
layers cannot change the selected hidden states.
"""

from typing import List, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from pyvlm import ops
from pyvlm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear

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


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=config.patch_size, stride=config.patch_size)
        num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_tiles, 3, S, S] -> [num_tiles, num_patches, hidden]."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads,
                                          self.num_heads, bias=True)
        self.out_proj = RowParallelLinear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [num_tiles, num_patches, hidden]: attention within each tile."""
        num_tiles, num_patches, hidden_size = hidden.shape
        qkv = self.qkv_proj(hidden.reshape(num_tiles * num_patches, hidden_size))
        query, key, value = (t.view(-1, self.num_heads, self.head_dim)
                             for t in qkv.split(hidden_size, dim=-1))
        cu_seqlens = torch.arange(0, (num_tiles + 1) * num_patches, num_patches,
                                  dtype=torch.int32, device=hidden.device)
        out = ops.varlen_attention(query, key, value, cu_seqlens, cu_seqlens, num_patches,
                                   num_patches, self.head_dim ** -0.5)
        return self.out_proj(out.view(num_tiles, num_patches, hidden_size))


class SiglipMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden), approximate=self.approximate))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.mlp(self.layer_norm2(hidden))


class SiglipEncoder(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(num_layers))


class SiglipVisionTower(nn.Module):
    """SigLIP returning the selected hidden states (pre post_layernorm, as
    transformers' LLaVA models read them), concatenated along features."""

    def __init__(self, config, feature_layer: FeatureLayers = -1):
        super().__init__()
        if config.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise NotImplementedError(f"SigLIP activation {config.hidden_act!r}")
        self.feature_layers = resolve_feature_layers(feature_layer, config.num_hidden_layers)
        self.num_layers_used = max(self.feature_layers)
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config, self.num_layers_used)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_tiles, 3, S, S] -> [num_tiles, num_patches, hidden * num_feature_layers]."""
        states = [self.embeddings(pixel_values)]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return torch.cat([states[index] for index in self.feature_layers], dim=-1)

    def is_unused_weight(self, name: str) -> bool:
        """Checkpoint weights this tower does not need (name relative to the
        tower): the post-layernorm, the pooling head and layers past the
        deepest selected one."""
        if name.startswith(("post_layernorm.", "head.")):
            return True
        parts = name.split(".")
        return parts[:2] == ["encoder", "layers"] and int(parts[2]) >= self.num_layers_used
