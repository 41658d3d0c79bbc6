"""Activations of the MLP blocks: gated (LLaMA/Qwen2 SwiGLU, GeGLU) and the
vision towers' QuickGELU."""

from typing import Optional

import torch

from ._library import ops


def _gated_out(x: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
    return out


def silu_and_mul(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for x of last dimension 2d."""
    out = _gated_out(x, out)
    ops.silu_and_mul(out, x)
    return out


def gelu_and_mul(
    x: torch.Tensor, approximate: str = "none", out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """gelu(x[..., :d]) * x[..., d:]; approximate is "none" (erf) or "tanh"."""
    out = _gated_out(x, out)
    ops.gelu_and_mul(out, x, approximate)
    return out


def quick_gelu(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x * sigmoid(1.702 x) for a contiguous x, rounded step by step to x's
    dtype as transformers' eager QuickGELUActivation (one kernel, not three)."""
    if out is None:
        out = torch.empty_like(x)
    ops.quick_gelu(out, x)
    return out


@torch.library.register_fake("pyvlm::silu_and_mul")
def _silu_and_mul_fake(out, input):
    return None


@torch.library.register_fake("pyvlm::gelu_and_mul")
def _gelu_and_mul_fake(out, input, approximate):
    return None


@torch.library.register_fake("pyvlm::quick_gelu")
def _quick_gelu_fake(out, input):
    return None
