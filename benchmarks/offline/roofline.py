"""Floors of a VLM's serving numbers on one device, from rates measured in
the same run: a step takes at least max(bytes it must read / copy bandwidth,
matmul FLOPs / dense matmul rate).

What is counted (so every floor is a lower bound on time):
- decode step: every decoder weight (layers, final norm, LM head; not the
  token embedding table, of which a step reads a row per token) plus the KV
  cache of every sequence at its context; FLOPs of the linear layers only
  (its attention FLOPs are small next to its bytes);
- prefill of one prompt with one image: the decoder and vision weights once;
  FLOPs of the decoder's linear layers per prompt token (the LM head for the
  last token only) and of the vision tower's per tower input row (the
  merger / projector, which runs on fewer rows, is left out); and the
  attention a correct implementation of the model must do (attention_flops:
  QK^T and PV, 2 FLOPs per multiply-add, so 4 x heads x head_dim per
  query-key pair):
  - the tower's self-attention within each of its segments (AttentionSegments:
    the rows that attend to each other), n^2 pairs for a segment of n rows
    in each layer: Qwen2-VL an image's patches in every block, Qwen2.5-VL
    so in its fullatt_block_indexes blocks and within its windows in the
    others (qwen_tower_attention); Llama-3.2-Vision an image's real tiles
    together, 1601 rows a 560-pixel tile, in its local and global layers;
    LLaVA-1.5 / NeXT each CLIP tile's 577 rows, LLaVA-OneVision each SigLIP
    crop's 729, in the layers pyvlm builds (tiled_tower_attention);
  - the decoder's causal self-attention over the prompt: n^2 / 2 pairs for
    n prompt tokens in each self-attention layer (the exact n (n + 1) / 2
    is a little more); a Mistral prompt never outgrows its sliding window
    (pyvlm bounds the context by it, pyvlm/entrypoints/startup.py), so its
    attention is the full causal one too;
  - Llama-3.2-Vision's cross-attention: every prompt token against every
    image row, in each cross-attention layer.
  Rows an implementation adds for its own convenience are left out, so the
  count stays a lower bound: the padding of a Llama-3.2-Vision tile to a
  multiple of 8 rows and its padding tiles (transformers and pyvlm let the
  real rows attend to them too) are not in its tower's segments.

Llama-3.2-Vision (mllama_cost) adds the image's cross-attention: its image
tokens are not in the prompt but K/V rows (real tiles x 1601) that every
decode step of the sequence reads in each cross-attention layer; prefill
runs the projector and the cross-attention K/V projections over those rows
(image_matmul_params), and those weights count with the vision side, not
the decode step.

LLaVA-1.5 and LLaVA-NeXT (model_cost, as the other families): a tower row
is one of a 336-pixel tile's 577 CLIP rows (576 patches + the class token);
LLaVA-1.5 runs one tile per image, NeXT the base tile + the best pinpoint's
grid (5 tiles for 644x476 at llava-v1.6's pinpoints: 672x672, 2x2). pyvlm
builds the tower only up to vision_feature_layer -2 (23 of CLIP-L's 24
layers), so the floor counts those 23; the projector and image_newline are
read with the vision weights at prefill, their FLOPs left out.
"""

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
from torch import nn

# Modules that run on merged tokens, not on every tower input row.
PROJECTOR_NAMES = ("merger", "multi_modal_projector")


@dataclass(frozen=True)
class DeviceRates:
    copy_bytes_per_s: float  # read + write, as benchmarks/kernels/harness.py counts it
    matmul_flops_per_s: float


def measure_rates(device: str) -> DeviceRates:
    """Copy bandwidth (1 GiB copy on CUDA, 256 MiB on CPU) and the rate of a
    square matmul (bf16 8192^3 on CUDA, float32 1024^3 on CPU)."""
    from benchmarks.kernels.harness import measure_copy_bandwidth, time_us

    bandwidth = measure_copy_bandwidth(device)
    if bandwidth is None:
        src = torch.empty(1 << 27, dtype=torch.uint8).random_()
        dst = torch.empty_like(src)
        bandwidth = 2 * src.numel() / (time_us(lambda: dst.copy_(src), device) * 1e-6)
    n, dtype = (8192, torch.bfloat16) if device.startswith("cuda") else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_us(lambda: a @ b, device, warmup=3, repeat=10) * 1e-6
    return DeviceRates(bandwidth, 2 * n ** 3 / seconds)


@dataclass(frozen=True)
class ModelCost:
    decoder_bytes: int  # what a decode step reads of the weights
    decoder_matmul_params: int  # linear weights of the layers (2 FLOPs per token each)
    lm_head_params: int
    vision_bytes: int
    vision_matmul_params: int  # tower weights a tower input row goes through
    kv_bytes_per_token: int
    image_matmul_params: int = 0  # weights an image K/V row goes through at prefill (mllama)
    image_kv_bytes_per_row: int = 0  # image K/V a decode step reads per row (mllama)
    # heads x head_dim, whose products make 4 FLOPs per query-key pair each:
    tower_attention_width: int = 0  # of one tower layer
    prompt_attention_width: int = 0  # summed over the decoder's self-attention layers
    cross_attention_width: int = 0  # summed over its cross-attention layers (mllama)


@dataclass(frozen=True)
class AttentionSegments:
    """num_layers tower layers whose self-attention runs within segments:
    the rows of a segment attend to each other, to no row of another."""

    num_layers: int
    rows: Tuple[int, ...]  # of each segment

    @property
    def num_pairs(self) -> int:
        """Query-key pairs over the layers."""
        return self.num_layers * sum(n * n for n in self.rows)


# The tower's attention over some images, one entry per kind of layer.
TowerAttention = Tuple[AttentionSegments, ...]
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def qwen_tower_attention(config, grids: Sequence[Sequence[int]]) -> TowerAttention:
    """Qwen2-VL: each frame of an image's (t, h, w) patch grid attends as
    one segment in every block (an image is one frame). Qwen2.5-VL: so in
    the blocks of fullatt_block_indexes; the other blocks attend within
    windows of window_size pixels, cut from the grid as pyvlm's tower cuts
    them (qwen_grid.window_order: transformers' get_vision_window_index)."""
    from pyvlm.models.vision.qwen2_5_vl import window_units_of
    from pyvlm.models.vision.qwen_grid import check_grids, frame_lengths, window_order

    vision = config.vision_config
    merge = vision.spatial_merge_size
    grids = check_grids(grids, merge)
    frames = tuple(frame_lengths(grids))
    if config.model_type == "qwen2_vl":
        return (AttentionSegments(vision.depth, frames),)
    num_full = len(set(vision.fullatt_block_indexes) & set(range(vision.depth)))
    _, units = window_order(grids, merge, window_units_of(vision))
    windows = tuple(n * merge * merge for n in units)
    return (AttentionSegments(num_full, frames),
            AttentionSegments(vision.depth - num_full, windows))


def tiled_tower_attention(config, tiles_per_image: Sequence[int]) -> TowerAttention:
    """Llama-3.2-Vision: the real tiles of an image attend together, each
    (image_size / patch_size)^2 + 1 rows (the class token; not the padding
    to a multiple of 8), in num_hidden_layers local + num_global_layers
    global layers. LLaVA-1.5 / NeXT (CLIP) and LLaVA-OneVision (SigLIP):
    each tile attends within itself, its patches (+ CLIP's class token), in
    the layers pyvlm builds (up to the deepest vision_feature_layer)."""
    from pyvlm.models.vision.vit import resolve_feature_layers

    vision = config.vision_config
    num_patches = (vision.image_size // vision.patch_size) ** 2
    if config.model_type == "mllama":
        return (AttentionSegments(vision.num_hidden_layers + vision.num_global_layers,
                                  tuple(n * (num_patches + 1) for n in tiles_per_image)),)
    num_layers = max(resolve_feature_layers(config.vision_feature_layer,
                                            vision.num_hidden_layers))
    tile_rows = num_patches + (vision.model_type == "clip_vision_model")
    return (AttentionSegments(num_layers, (tile_rows,) * sum(tiles_per_image)),)


def tower_attention_width(config) -> int:
    """heads x head_dim of a tower layer: its width (Qwen2-VL's embed_dim;
    its hidden_size is the merger's output)."""
    vision = config.vision_config
    return vision.embed_dim if config.model_type == "qwen2_vl" else vision.hidden_size


def model_cost(model) -> ModelCost:
    """The counts of a pyvlm VisionLanguageModel (language_model, lm_head,
    the rest is the vision side)."""
    lm_head = model.lm_head.weight
    decoder = [p for n, p in model.language_model.named_parameters()
               if not n.startswith("embed_tokens")]
    if all(p is not lm_head for p in decoder):
        decoder.append(lm_head)
    vision = [p for n, p in model.named_parameters()
              if not n.startswith(("language_model.", "lm_head."))]
    element_size = lm_head.element_size()
    text = model.language_model.shape
    return ModelCost(
        decoder_bytes=sum(p.numel() * p.element_size() for p in decoder),
        decoder_matmul_params=_matmul_params(model.language_model),
        lm_head_params=lm_head.numel(),
        vision_bytes=sum(p.numel() * p.element_size() for p in vision),
        vision_matmul_params=_matmul_params(model, skip=("language_model", "lm_head")),
        kv_bytes_per_token=2 * model.num_layers * model.num_kv_heads * model.head_dim
        * element_size,
        tower_attention_width=tower_attention_width(model.config),
        prompt_attention_width=text.num_layers * text.num_heads * text.head_dim)


# Llama-3.2-Vision's language-model tensors that run once per image (at
# prefill, on the image rows), not per token: cross-attention K/V.
MLLAMA_IMAGE_SIDE = (".cross_attn.k_proj.", ".cross_attn.v_proj.", ".cross_attn.k_norm.")


def mllama_cost(config, dtype: torch.dtype = torch.bfloat16) -> ModelCost:
    """The counts of Llama-3.2-Vision, on transformers' own modules (built
    on the meta device; pyvlm's model loads these tensors by name).

    decode step: the language model's layers but the cross-attention K/V
    projections and k_norm, the final norm and the LM head (not the token
    embedding table, nor the projector: it runs at prefill only); plus the
    self-attention KV of the self-attention layers per context token and
    the image K/V of the cross-attention layers per image row.
    prefill: vision_matmul_params (the tower's linears and patch conv) per
    tower row; image_matmul_params (the projector and every cross-attention
    layer's K/V projections) per image row. vision_bytes: the tower but its
    tile-embedding tables (an image reads one row), the projector and the
    cross-attention K/V weights. Attention widths: the self-attention
    layers' (causal over the prompt) apart from the cross-attention ones'."""
    import transformers

    with torch.device("meta"):
        model = transformers.MllamaForConditionalGeneration._from_config(config, dtype=dtype)
    params = dict(model.named_parameters())
    embeddings = {f"{name}.weight" for name, sub in model.named_modules()
                  if isinstance(sub, nn.Embedding)}
    image_side = {n for n in params if any(part in n for part in MLLAMA_IMAGE_SIDE)}
    decoder = {n for n in params if n.startswith(("model.language_model.", "lm_head."))
               and n not in embeddings and n not in image_side}
    vision = {n for n in params if n.startswith(("model.vision_model.",
                                                 "model.multi_modal_projector."))
              and n not in embeddings} | image_side
    linears = {f"{name}.weight" for name, sub in model.named_modules()
               if isinstance(sub, (nn.Linear, nn.Conv2d))}
    text, element_size = config.text_config, torch.finfo(dtype).bits // 8
    head_dim = text.hidden_size // text.num_attention_heads
    num_cross = len(text.cross_attention_layers)
    kv_row = 2 * text.num_key_value_heads * head_dim * element_size
    attention_width = text.num_attention_heads * head_dim

    def numel(names) -> int:
        return sum(params[n].numel() for n in names)

    return ModelCost(
        decoder_bytes=numel(decoder) * element_size,
        decoder_matmul_params=numel((decoder & linears) - {"lm_head.weight"}),
        lm_head_params=params["lm_head.weight"].numel(),
        vision_bytes=numel(vision) * element_size,
        vision_matmul_params=numel({n for n in linears if n.startswith("model.vision_model.")}),
        kv_bytes_per_token=(text.num_hidden_layers - num_cross) * kv_row,
        image_matmul_params=numel((linears & image_side)
                                  | {"model.multi_modal_projector.weight"}),
        image_kv_bytes_per_row=num_cross * kv_row,
        tower_attention_width=tower_attention_width(config),
        prompt_attention_width=(text.num_hidden_layers - num_cross) * attention_width,
        cross_attention_width=num_cross * attention_width)


def cost_for(model, config) -> ModelCost:
    """mllama_cost for Llama-3.2-Vision (in the dtype of pyvlm's model),
    model_cost of pyvlm's model otherwise."""
    if config.model_type == "mllama":
        return mllama_cost(config, next(model.parameters()).dtype)
    return model_cost(model)


def config_cost(config, dtype: torch.dtype) -> ModelCost:
    """cost_for pyvlm's model of a transformers config in dtype, built on
    the meta device (no memory, no weights: the server loads its own)."""
    from pyvlm.models.registry import model_class_for

    with torch.device("meta"):
        model = model_class_for(config.architectures)(config).to(dtype)
    return cost_for(model, config)


def _matmul_params(module: nn.Module, skip=()) -> int:
    """Weights (2-D and up) of the module's linear and conv layers, outside
    embedding tables, projectors and the submodules named in skip."""
    total = 0
    for name, sub in module.named_modules():
        parts = name.split(".")
        if isinstance(sub, nn.Embedding) or any(p in parts for p in (*PROJECTOR_NAMES, *skip)):
            continue
        total += sum(p.numel() for p in sub.parameters(recurse=False) if p.dim() >= 2)
    return total


@dataclass(frozen=True)
class Roofline:
    cost: ModelCost
    rates: DeviceRates

    def _time(self, num_bytes: float, flops: float) -> float:
        return max(num_bytes / self.rates.copy_bytes_per_s, flops / self.rates.matmul_flops_per_s)

    def prefill_flops(self, num_prompt_tokens: int, num_tower_tokens: int,
                      num_image_rows: int = 0, *, tower_attention: TowerAttention) -> float:
        """Linear layers and attention of one prefill (module docstring);
        tower_attention: the segments of its images' tower (empty without
        an image)."""
        return (self.linear_flops(num_prompt_tokens, num_tower_tokens, num_image_rows)
                + self.attention_flops(num_prompt_tokens, num_image_rows, tower_attention))

    def linear_flops(self, num_prompt_tokens: int, num_tower_tokens: int,
                     num_image_rows: int = 0) -> float:
        c = self.cost
        return 2 * (c.decoder_matmul_params * num_prompt_tokens + c.lm_head_params
                    + c.vision_matmul_params * num_tower_tokens
                    + c.image_matmul_params * num_image_rows)

    def attention_flops(self, num_prompt_tokens: int, num_image_rows: int,
                        tower_attention: TowerAttention) -> float:
        """QK^T and PV, 4 FLOPs per query-key pair and unit of width: the
        tower's segments, the prompt's causal half square, and every prompt
        token against every image row (cross-attention)."""
        c = self.cost
        return (4 * c.tower_attention_width * sum(s.num_pairs for s in tower_attention)
                + 2 * c.prompt_attention_width * num_prompt_tokens ** 2
                + 4 * c.cross_attention_width * num_prompt_tokens * num_image_rows)

    def ttft_s(self, num_prompt_tokens: int, num_tower_tokens: int,
               num_image_rows: int = 0, *, tower_attention: TowerAttention) -> float:
        """Prefill of one prompt with one image, and its first token."""
        return self._time(self.cost.decoder_bytes + self.cost.vision_bytes,
                          self.prefill_flops(num_prompt_tokens, num_tower_tokens, num_image_rows,
                                             tower_attention=tower_attention))

    def decode_step_bytes(self, batch: int, context: float, num_image_rows: int = 0) -> float:
        """Weights, KV of the context and image K/V (num_image_rows per sequence)."""
        c = self.cost
        return c.decoder_bytes + batch * (context * c.kv_bytes_per_token
                                          + num_image_rows * c.image_kv_bytes_per_row)

    def decode_step_s(self, batch: int, context: float, num_image_rows: int = 0) -> float:
        c = self.cost
        return self._time(self.decode_step_bytes(batch, context, num_image_rows),
                          2 * (c.decoder_matmul_params + c.lm_head_params) * batch)

    def decode_tokens_per_s(self, context: float, num_image_rows: int = 0) -> float:
        """Batch 1 at this context."""
        return 1 / self.decode_step_s(1, context, num_image_rows)

    def throughput_tokens_per_s(self, num_requests: int, concurrency: int,
                                num_prompt_tokens: int, num_tower_tokens: int,
                                output_tokens: int, num_image_rows: int = 0, *,
                                tower_attention: TowerAttention) -> float:
        """Output tokens/s of num_requests prompts, concurrency at a time,
        each prefilled once (tower_attention: one prompt's) and decoded for
        output_tokens - 1 steps."""
        waves = -(-num_requests // concurrency)
        batch = min(concurrency, num_requests)
        prefill = self._time(
            self.cost.decoder_bytes + self.cost.vision_bytes,
            num_requests * self.prefill_flops(num_prompt_tokens, num_tower_tokens,
                                              num_image_rows, tower_attention=tower_attention))
        context = num_prompt_tokens + output_tokens / 2
        decode = waves * (output_tokens - 1) * self.decode_step_s(batch, context, num_image_rows)
        return num_requests * output_tokens / (prefill + decode)
