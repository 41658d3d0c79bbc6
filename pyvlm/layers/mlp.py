"""The gated (SwiGLU) MLP of Llama/Qwen2."""

import torch
from torch import nn

from pyvlm import ops

from .linear import StackedLinear


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = StackedLinear(hidden_size, {"gate_proj": intermediate_size,
                                                        "up_proj": intermediate_size}, bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))
