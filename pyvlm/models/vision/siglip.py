"""The SigLIP vision tower: patch embedding (with bias) plus position
embedding, then the shared ViT encoder layers (vit.py).

All tiles of all images run in one call; attention is block-diagonal per
tile, and only the layers up to the deepest selected feature layer are built.
"""

import torch
from torch import nn

from .vit import FeatureLayers, VitTower, resolve_feature_layers

__all__ = ["SiglipVisionEmbeddings", "SiglipVisionTower", "FeatureLayers",
           "resolve_feature_layers"]


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


class SiglipVisionTower(VitTower):
    """SigLIP returning the selected hidden states (pre post_layernorm, as
    transformers' LLaVA models read them), concatenated along features."""

    # the post-layernorm and the pooling head only feed the pooled output
    UNUSED_PREFIXES = ("post_layernorm.", "head.")

    def __init__(self, config, feature_layer: FeatureLayers = -1):
        super().__init__(config, feature_layer)
        self.embeddings = SiglipVisionEmbeddings(config)
        self.build_encoder(config)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_tiles, 3, S, S] -> [num_tiles, num_patches, hidden]."""
        return self.embeddings(pixel_values)
