"""RMSNorm as Llama/Qwen2 (float32 statistics, HF's rounding order) and
LayerNorm as torch's nn.LayerNorm, each with a fused residual-add form."""

from typing import Optional, Tuple, Union

import torch
from torch import nn

from pyvlm import ops


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight; with a residual, first adds it
    (the fused form the decoder layers use between blocks)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Without residual: returns norm(x). With one: returns (norm(x +
        residual), x + residual); x and residual are updated in place."""
        if residual is None:
            return ops.rms_norm(x.contiguous(), self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.Module):
    """nn.LayerNorm's parameters (weight, bias: the same state_dict keys) and
    maths (float32 statistics, one rounding) through the pyvlm ops; with a
    residual, first adds it (the fused form the vision towers use between
    blocks, as RMSNorm's)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Without residual: returns norm(x). With one: returns (norm(x +
        residual), x + residual); x and residual are updated in place."""
        if residual is None:
            return ops.layer_norm(x.contiguous(), self.weight, self.bias, self.eps)
        return ops.fused_add_layer_norm(x, residual, self.weight, self.bias, self.eps)


def norm_with_residual(norm: nn.Module, hidden: torch.Tensor, residual: Optional[torch.Tensor]
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's first norm over a residual stream carried unsummed
    (vLLM's shape): (norm(hidden + residual), hidden + residual), the add
    fused into the norm; in a stack's first block (residual None) the stream
    starts as hidden itself, made contiguous for the fused norms that take it
    in place (a strided embedding sum is copied once): (norm(hidden), hidden)."""
    if residual is None:
        hidden = hidden.contiguous()
        return norm(hidden), hidden
    return norm(hidden, residual)
