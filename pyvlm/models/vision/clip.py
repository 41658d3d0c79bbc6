"""The CLIP vision tower (openai/clip-vit-large-patch14-336, as LLaVA-1.5
and LLaVA-NeXT read it): patch embedding (no bias), a class embedding
prepended to every tile, position embedding over num_patches + 1 positions,
pre_layrnorm (transformers' spelling), then the shared ViT encoder layers
(vit.py, quick_gelu in the released models).

The CLS position stays in the output; the "default" feature strategy of the
LLaVA models drops it. Only layers up to the deepest selected feature layer
are built; post_layernorm (it only feeds the pooled CLS output) is not.
"""

import torch
from torch import nn

from pyvlm.layers.norm import LayerNorm

from .vit import FeatureLayers, VitTower


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.randn(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=config.patch_size, stride=config.patch_size,
                                         bias=False)
        num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_tiles, C, S, S] -> [num_tiles, 1 + num_patches, hidden] (CLS first)."""
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"CLIP tiles must be {self.image_size}x{self.image_size}, got "
                             f"{tuple(pixel_values.shape)}")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTower(VitTower):
    """CLIP returning the selected hidden states (transformers' hidden_states
    [i]: 0 = embeddings after pre_layrnorm, i = after layer i; negative
    indices count from the end), several concatenated along the features.

    forward: pixel_values [num_tiles, C, S, S] -> [num_tiles, 1 +
    num_patches, hidden * len(feature_layers)], the CLS position first.
    """

    # post_layernorm only feeds the pooled output; position_ids is a buffer
    # that checkpoints saved by transformers before 4.31 still carry
    UNUSED_PREFIXES = ("post_layernorm.", "embeddings.position_ids")

    def __init__(self, config, feature_layer: FeatureLayers = -1):
        super().__init__(config, feature_layer)
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.build_encoder(config)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pre_layrnorm(self.embeddings(pixel_values))
