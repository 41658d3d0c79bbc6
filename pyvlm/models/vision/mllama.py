"""The Llama-3.2-Vision (mllama) vision encoder.

Mirrors transformers' MllamaVisionModel module for module, so checkpoint
names under ``vision_model.`` map one to one onto this module's
state_dict. Each image's tiles (padded tiles included) run as one
sequence: every tile is padded to a multiple of 8 patches, and the local
and the global transformer both attend over all tiles of an image.

Transformers' attention mask masks only the pairs in which *both* tokens
are padding (a padded patch or a tile of a padded tile), so real tokens
still attend to padding. That is two varlen attentions without a mask
(PaddedTileAttention): every query over all of its image's keys, then the
padding queries again over their image's real keys alone (those keys cut
in chunks: pyvlm/layers/split_key_attention.py), written over their rows.
On CUDA with 16-bit weights both run on FlashAttention
(pyvlm/layers/packed_attention.py): a dense masked attention over an
image's 6,432 rows (4 tiles of 1,601 patches, padded to 1,608) was most of
Llama-3.2-Vision's time to first token. An image without a real tile
(transformers' padding image, which pyvlm never builds) keeps the dense
masked attention: all of its pairs are masked alike.

Tensor parallel: built under a group of several ranks (a tower built in
`building_tower()` with shard_towers), both encoders' attention splits by
heads and their MLPs by fc1 columns and fc2 rows; the patch, class,
position and tile embeddings, the layer norms and the gates stay whole.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from pyvlm.layers.linear import ColumnParallelLinear, RowParallelLinear
from pyvlm.layers.norm import LayerNorm, norm_with_residual
from pyvlm.layers.packed_attention import packed_attention, takes_torch_flash
from pyvlm.layers.split_key_attention import KeySplits, plan_key_splits, split_key_attention
from pyvlm.layers.tensor_parallel import current_group, divide

PAD_MULTIPLE = 8


def num_padding_patches(num_patches: int) -> int:
    """Patches appended to each tile so its length is a multiple of 8."""
    return (PAD_MULTIPLE - num_patches % PAD_MULTIPLE) % PAD_MULTIPLE


def aspect_ratio_attention_mask(aspect_ratio_mask: torch.Tensor, num_patches: int,
                                target_length: int, dtype: torch.dtype) -> torch.Tensor:
    """[images, tiles] tile mask (1 = real) -> additive [images, 1, L, L] mask,
    L = tiles * target_length, built as transformers'
    _prepare_aspect_ratio_attention_mask: padding indicator outer product
    times the dtype's minimum."""
    num_images, max_tiles = aspect_ratio_mask.shape
    is_real = aspect_ratio_mask.view(num_images, max_tiles, 1).to(dtype)
    is_real = is_real.expand(num_images, max_tiles, target_length).clone()
    is_real[:, :, num_patches:] = 0
    is_padding = (1 - is_real).reshape(num_images, max_tiles * target_length, 1)
    mask = is_padding @ is_padding.transpose(-1, -2) * torch.finfo(dtype).min
    return mask.unsqueeze(1)


class MaskedAttention:
    """Attention under transformers' dense additive mask [images, 1, L, L]."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """[images, L, heads, head_dim] each -> the same shape."""
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=self.mask, scale=scale)
        return out.transpose(1, 2)


@dataclass(frozen=True)
class PaddedTileAttention:
    """The same attention as the mask's, without the mask (module
    docstring): rows are an image's tiles, tile after tile, each padded to
    padded_len. int64 row indices and int32 cu_seqlens on the tower's device."""

    cu_images: torch.Tensor
    pad_rows: torch.Tensor
    cu_pad: torch.Tensor
    max_pad: int
    real_rows: torch.Tensor
    cu_real: torch.Tensor
    max_real: int
    pad_splits: Optional[KeySplits] = None  # the padding queries' keys in chunks (split_key_attention)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """[images, L, heads, head_dim] each -> the same shape."""
        images, length = query.shape[:2]
        query, key, value = (t.reshape(images * length, *t.shape[2:]) for t in (query, key, value))
        out = packed_attention(query, key, value, self.cu_images, self.cu_images, length, length,
                               scale, equal_lengths=True)  # every image padded to max tiles
        if self.max_pad:
            out.index_copy_(0, self.pad_rows, self._padding_queries(query, key, value, scale))
        return out.view(images, length, *out.shape[1:])

    def _padding_queries(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """The padding rows' attention over their image's real rows: a few
        dozen queries over thousands of keys when the image fills its
        tiles, split along the keys where FlashAttention runs it."""
        pad_query = query[self.pad_rows]
        if self.pad_splits is not None and takes_torch_flash(pad_query, key, value):
            return split_key_attention(pad_query, key, value, self.pad_splits, scale)
        return packed_attention(pad_query, key[self.real_rows], value[self.real_rows],
                                self.cu_pad, self.cu_real, self.max_pad, self.max_real, scale)


def padded_tile_attention(tile_is_real: torch.Tensor, num_patches: int, padded_len: int,
                          device: torch.device) -> Optional[PaddedTileAttention]:
    """The plan for a CPU bool [images, tiles] tile mask; None when an image
    has no real tile."""
    if not bool(tile_is_real.any(dim=1).all()):
        return None
    is_patch = torch.arange(padded_len, device="cpu") < num_patches
    is_real = (tile_is_real[:, :, None] & is_patch).flatten(1)  # [images, L]
    num_real = is_real.sum(dim=1)
    num_pad = is_real.shape[1] - num_real

    def cu(lengths: torch.Tensor) -> torch.Tensor:
        bounds = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        return bounds.to(torch.int32).to(device, non_blocking=True)

    def rows(mask: torch.Tensor) -> torch.Tensor:
        return mask.flatten().nonzero().squeeze(1)

    images, length = is_real.shape
    real_rows = rows(is_real)  # image after image, so split by image below
    pad_splits = plan_key_splits(num_pad.tolist(), real_rows.split(num_real.tolist()), device)
    return PaddedTileAttention(cu(torch.full((images,), length)),
                               rows(~is_real).to(device, non_blocking=True), cu(num_pad),
                               int(num_pad.max()), real_rows.to(device, non_blocking=True),
                               cu(num_real), int(num_real.max()), pad_splits)


Attention = Union[MaskedAttention, PaddedTileAttention]


class MllamaPrecomputedAspectRatioEmbedding(nn.Module):
    """A per-aspect-ratio embedding for each tile, added to all its patches."""

    def __init__(self, config, is_gated: bool = True):
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.hidden_size = config.hidden_size
        self.is_gated = is_gated
        self.embedding = nn.Embedding(config.max_aspect_ratio_id + 1,
                                      self.max_num_tiles * self.hidden_size)
        if is_gated:
            self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """hidden [images, tiles, patches, hidden], aspect_ratio_ids [images]."""
        embeddings = self.embedding(aspect_ratio_ids)
        embeddings = embeddings.reshape(-1, self.max_num_tiles, 1, self.hidden_size)
        if self.is_gated:
            embeddings = embeddings * self.gate.tanh()
        return hidden + embeddings


class MllamaPrecomputedPositionEmbedding(nn.Module):
    """The patch position embedding, blended by a tanh gate with a
    per-aspect-ratio, per-tile, per-patch position embedding."""

    def __init__(self, config):
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.num_patches = (config.image_size // config.patch_size) ** 2 + 1
        self.hidden_size = config.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(self.num_patches, self.hidden_size))
        self.tile_embedding = nn.Embedding(
            config.max_aspect_ratio_id + 1,
            self.max_num_tiles * self.num_patches * self.hidden_size)

    def forward(self, hidden: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """hidden [images, tiles, patches (cls included), hidden]."""
        gate = self.gate.tanh()
        hidden = hidden + ((1 - gate) * self.embedding).view(1, 1, self.num_patches,
                                                             self.hidden_size)
        tile_embedding = self.tile_embedding(aspect_ratio_ids).reshape(
            hidden.shape[0], self.max_num_tiles, self.num_patches, self.hidden_size)
        return hidden + gate * tile_embedding


class MllamaVisionMLP(nn.Module):
    """fc2(gelu(fc1(x))); fc1 column-parallel, fc2 row-parallel."""

    def __init__(self, config):
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(f"mllama vision hidden_act {config.hidden_act!r} is not supported")
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden)))


class MllamaVisionAttention(nn.Module):
    """Self-attention without biases; q/k/v column-parallel by heads (three
    layers, as the checkpoint's three tensors), o_proj row-parallel.
    num_heads is the rank's."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = divide(config.attention_heads, current_group().size,
                                "vision attention_heads")
        self.head_dim = config.hidden_size // config.attention_heads
        inner = config.attention_heads * self.head_dim
        self.q_proj = ColumnParallelLinear(config.hidden_size, inner, bias=False)
        self.k_proj = ColumnParallelLinear(config.hidden_size, inner, bias=False)
        self.v_proj = ColumnParallelLinear(config.hidden_size, inner, bias=False)
        self.o_proj = RowParallelLinear(inner, config.hidden_size, bias=False)

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = projected.shape
        return projected.view(batch, seq_len, self.num_heads, self.head_dim)

    def forward(self, hidden: torch.Tensor, attention: Attention) -> torch.Tensor:
        """hidden [images, seq, hidden]."""
        query, key, value = (self._heads(proj(hidden))
                             for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(query, key, value, self.head_dim ** -0.5)
        return self.o_proj(out.reshape(*hidden.shape[:2], -1))


class MllamaVisionEncoderLayer(nn.Module):
    """Pre-norm attention + MLP; gated layers scale both residual branches
    by tanh of a learnt scalar. The residual stream is carried unsummed
    between layers (as qwen_layers.VisionBlock): a layer takes the previous
    layer's (gated) MLP output and the residual (None in the first layer)
    and returns its own and the residual, whose sum is the layer's output;
    input_layernorm fuses the previous MLP add, post_attention_layernorm
    the attention add, each after its gate's multiply."""

    def __init__(self, config, is_gated: bool = False):
        super().__init__()
        self.is_gated = is_gated
        self.self_attn = MllamaVisionAttention(config)
        self.mlp = MllamaVisionMLP(config)
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.norm_eps)
        if is_gated:
            self.gate_attn = nn.Parameter(torch.ones(1) * math.pi / 4)
            self.gate_ffn = nn.Parameter(torch.ones(1) * math.pi / 4)

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                attention: Attention) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = norm_with_residual(self.input_layernorm, hidden, residual)
        attn = self._gated(self.self_attn(hidden, attention), "gate_attn")
        hidden, residual = self.post_attention_layernorm(attn, residual)
        return self._gated(self.mlp(hidden), "gate_ffn"), residual

    def _gated(self, branch: torch.Tensor, gate: str) -> torch.Tensor:
        return getattr(self, gate).tanh() * branch if self.is_gated else branch


class MllamaVisionEncoder(nn.Module):
    def __init__(self, config, num_layers: int, is_gated: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionEncoderLayer(config, is_gated)
                                    for _ in range(num_layers))

    def forward(self, hidden: torch.Tensor, attention: Attention, keep: Sequence[int] = ()
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[torch.Tensor]]:
        """hidden: the input states (taken in place). Returns the last
        layer's branch output and the residual stream (None without layers),
        whose sum is the encoder's output (left to the caller, to fuse into
        its next norm), and the outputs of the layers listed in keep."""
        residual, kept = None, {}
        for index, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, attention)
            if index in keep:
                kept[index] = hidden + residual
        return hidden, residual, [kept[index] for index in keep]


class MllamaVisionModel(nn.Module):
    """The mllama vision encoder: the local transformer (whose selected
    intermediate outputs are kept) then the gated global transformer."""

    def __init__(self, config):
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.hidden_size = config.hidden_size
        self.intermediate_layers_indices = list(config.intermediate_layers_indices)
        self.num_patches = (config.image_size // config.patch_size) ** 2 + 1
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=config.patch_size,
                                         stride=config.patch_size, padding="valid", bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.gated_positional_embedding = MllamaPrecomputedPositionEmbedding(config)
        self.pre_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(config)
        self.post_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(config)
        # transformers builds these with nn.LayerNorm's default eps, not norm_eps
        self.layernorm_pre = LayerNorm(config.hidden_size)
        self.layernorm_post = LayerNorm(config.hidden_size)
        self.transformer = MllamaVisionEncoder(config, config.num_hidden_layers)
        self.global_transformer = MllamaVisionEncoder(config, config.num_global_layers,
                                                      is_gated=True)

    def _embed(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """[images, tiles, 3, H, W] -> [images, tiles, num_patches (cls first), hidden]."""
        num_images, num_tiles = pixel_values.shape[:2]
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.flatten(0, 1).to(weight.device, weight.dtype))
        hidden = patches.flatten(2).transpose(1, 2)
        hidden = hidden.reshape(num_images, num_tiles, -1, self.hidden_size)
        hidden = self.pre_tile_positional_embedding(hidden, aspect_ratio_ids)
        cls = self.class_embedding.expand(num_images, num_tiles, 1, self.hidden_size)
        hidden = torch.cat([cls, hidden], dim=2)
        hidden = self.gated_positional_embedding(hidden, aspect_ratio_ids)
        return self.layernorm_pre(hidden)

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor,
                tiles_per_image: Optional[Sequence[int]] = None) -> torch.Tensor:
        """pixel_values [B, max_num_images, max_tiles, 3, H, W], aspect_ratio_ids
        [B, max_num_images], aspect_ratio_mask [B, max_num_images, max_tiles]
        (1 = real tile; tiles_per_image: the same as host ints, each image's
        real tiles first, which spares reading a device mask back) ->
        transformers' last_hidden_state,
        [B, max_num_images, max_tiles, num_patches,
         hidden * (1 + len(intermediate_layers_indices))]: the global
        transformer's output, then the selected local-layer outputs
        interleaved as transformers' stack(dim=-1) lays them out."""
        batch, max_images, num_tiles = pixel_values.shape[:3]
        num_images = batch * max_images
        aspect_ratio_ids = aspect_ratio_ids.reshape(num_images)
        hidden = self._embed(pixel_values.flatten(0, 1), aspect_ratio_ids)

        num_pad = num_padding_patches(self.num_patches)
        padded_len = self.num_patches + num_pad
        hidden = F.pad(hidden, (0, 0, 0, num_pad))
        attention = self._attention(aspect_ratio_mask.reshape(num_images, num_tiles),
                                    tiles_per_image, padded_len, hidden.dtype)

        hidden, residual, local_outputs = self.transformer(
            hidden.view(num_images, -1, self.hidden_size), attention,
            self.intermediate_layers_indices)
        hidden, _ = norm_with_residual(self.layernorm_post, hidden, residual)
        hidden = self.post_tile_positional_embedding(
            hidden.view(num_images, num_tiles, padded_len, -1), aspect_ratio_ids)
        hidden, residual, _ = self.global_transformer(
            hidden.view(num_images, -1, self.hidden_size), attention)
        if residual is not None:
            hidden = hidden + residual

        intermediate = torch.stack(local_outputs, dim=-1)
        out_shape = (batch, max_images, num_tiles, self.num_patches, -1)
        hidden = hidden.view(num_images, num_tiles, padded_len, -1)[:, :, :self.num_patches]
        intermediate = intermediate.reshape(num_images, num_tiles, padded_len, -1)
        intermediate = intermediate[:, :, :self.num_patches]
        return torch.cat([hidden.reshape(out_shape), intermediate.reshape(out_shape)], dim=-1)

    def _attention(self, tile_mask: torch.Tensor, tiles_per_image: Optional[Sequence[int]],
                   padded_len: int, dtype: torch.dtype) -> Attention:
        """The unmasked varlen plan where every image has a real tile (and
        the tile mask is known on the host), else transformers' dense mask."""
        num_images, num_tiles = tile_mask.shape
        if tiles_per_image is not None:
            tile_is_real = (torch.arange(num_tiles, device="cpu")[None, :]
                            < torch.tensor(list(tiles_per_image), device="cpu")[:, None])
        elif tile_mask.device.type == "cpu":
            tile_is_real = tile_mask.bool()
        else:
            tile_is_real = None
        plan = None
        if tile_is_real is not None:
            plan = padded_tile_attention(tile_is_real, self.num_patches, padded_len,
                                         tile_mask.device)
        if plan is not None:
            return plan
        return MaskedAttention(aspect_ratio_attention_mask(tile_mask, self.num_patches,
                                                           padded_len, dtype))
