"""Linear layers for a few tokens (a decode step's rows): the skinny GEMM.

y = x W^T + b with float32 accumulation, rounded once to the output dtype,
as cuBLAS's GEMMs compute it; on CUDA one kernel reads each weight once
(no split-K reduction pass) and can write float32 logits directly.
"""

from typing import Optional

import torch

from ._library import ops


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [..., in_features] @ weight[out_features, in_features]^T (+ bias).

    out_dtype: x's dtype (the default) or float32. Leading dimensions are
    flattened into token rows, which must each be contiguous.
    """
    num_tokens = x.shape[:-1].numel()
    rows = x.reshape(num_tokens, x.shape[-1])
    if out is None:
        out = torch.empty(num_tokens, weight.shape[0], dtype=out_dtype or x.dtype,
                          device=x.device)
    ops.skinny_gemm(out.view(num_tokens, weight.shape[0]), rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("pyvlm::skinny_gemm")
def _skinny_gemm_fake(out, input, weight, bias):
    return None
