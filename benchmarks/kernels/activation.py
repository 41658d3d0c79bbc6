"""silu_and_mul / gelu_and_mul against the eager torch expression."""

import torch
import torch.nn.functional as F

from pyvlm import ops

from .harness import Row, time_us


def run(device: str):
    rows = []
    tokens = 4096 if device.startswith("cuda") else 256
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    d = 14336
    x = torch.randn(tokens, 2 * d, device=device, dtype=dtype)
    out = torch.empty(tokens, d, device=device, dtype=dtype)
    ours = time_us(lambda: ops.silu_and_mul(x, out=out), device)
    base = time_us(lambda: F.silu(x[:, :d]) * x[:, d:], device)
    nbytes = x.numel() * x.element_size() + out.numel() * out.element_size()
    rows.append(Row("silu_and_mul", f"t={tokens} d={d} {str(dtype)[6:]}", device, ours,
                    "F.silu(a) * b", base, nbytes))
    return rows
