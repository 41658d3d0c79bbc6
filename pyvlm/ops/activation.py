"""Gated activations of the MLP blocks (LLaMA/Qwen2 SwiGLU, GeGLU)."""

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


@torch.library.register_fake("pyvlm::silu_and_mul")
def _silu_and_mul_fake(out, input):
    return None


@torch.library.register_fake("pyvlm::gelu_and_mul")
def _gelu_and_mul_fake(out, input, approximate):
    return None
