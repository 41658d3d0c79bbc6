"""RMSNorm as Llama/Qwen2 (float32 statistics, HF's rounding order)."""

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
