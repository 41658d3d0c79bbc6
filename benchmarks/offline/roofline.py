"""Floors of a VLM's serving numbers on one device, from rates measured in
the same run: a step takes at least max(bytes it must read / copy bandwidth,
matmul FLOPs / dense matmul rate).

What is counted (so every floor is a lower bound on time):
- decode step: every decoder weight (layers, final norm, LM head; not the
  token embedding table, of which a step reads a row per token) plus the KV
  cache of every sequence at its context; FLOPs of the linear layers only;
- prefill of one prompt with one image: the decoder and vision weights once;
  FLOPs of the decoder's linear layers per prompt token (the LM head for the
  last token only) and of the vision tower's per tower input row (the
  merger / projector, which runs on fewer rows, and attention are left out).
"""

from dataclasses import dataclass

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
    return ModelCost(
        decoder_bytes=sum(p.numel() * p.element_size() for p in decoder),
        decoder_matmul_params=_matmul_params(model.language_model),
        lm_head_params=lm_head.numel(),
        vision_bytes=sum(p.numel() * p.element_size() for p in vision),
        vision_matmul_params=_matmul_params(model, skip=("language_model", "lm_head")),
        kv_bytes_per_token=2 * model.num_layers * model.num_kv_heads * model.head_dim
        * element_size)


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

    def prefill_flops(self, num_prompt_tokens: int, num_tower_tokens: int) -> float:
        c = self.cost
        return 2 * (c.decoder_matmul_params * num_prompt_tokens + c.lm_head_params
                    + c.vision_matmul_params * num_tower_tokens)

    def ttft_s(self, num_prompt_tokens: int, num_tower_tokens: int) -> float:
        """Prefill of one prompt with one image, and its first token."""
        return self._time(self.cost.decoder_bytes + self.cost.vision_bytes,
                          self.prefill_flops(num_prompt_tokens, num_tower_tokens))

    def decode_step_s(self, batch: int, context: float) -> float:
        c = self.cost
        return self._time(c.decoder_bytes + batch * context * c.kv_bytes_per_token,
                          2 * (c.decoder_matmul_params + c.lm_head_params) * batch)

    def decode_tokens_per_s(self, context: float) -> float:
        """Batch 1 at this context."""
        return 1 / self.decode_step_s(1, context)

    def throughput_tokens_per_s(self, num_requests: int, concurrency: int,
                                num_prompt_tokens: int, num_tower_tokens: int,
                                output_tokens: int) -> float:
        """Output tokens/s of num_requests prompts, concurrency at a time,
        each prefilled once and decoded for output_tokens - 1 steps."""
        waves = -(-num_requests // concurrency)
        batch = min(concurrency, num_requests)
        prefill = self._time(
            self.cost.decoder_bytes + self.cost.vision_bytes,
            num_requests * self.prefill_flops(num_prompt_tokens, num_tower_tokens))
        context = num_prompt_tokens + output_tokens / 2
        decode = waves * (output_tokens - 1) * self.decode_step_s(batch, context)
        return num_requests * output_tokens / (prefill + decode)
