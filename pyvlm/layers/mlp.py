"""The gated (SwiGLU) MLP of Llama/Qwen2."""

from typing import Optional

import torch
from torch import nn

from pyvlm import ops

from .linear import MergedColumnParallelLinear, RowParallelLinear
from .tensor_parallel import TensorParallelGroup, current_group


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul.

    Tensor parallel as Megatron-LM's MLP: gate/up split by columns, down by
    rows, so each rank's intermediate activations stay local and one
    all-reduce (in down_proj) ends the block. tp: the group to split over
    (None: the current group, pyvlm.layers.tensor_parallel.current_group)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 tp: Optional[TensorParallelGroup] = None):
        super().__init__()
        tp = tp or current_group()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size}, bias, tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))
