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
    # The Qwen2-VL tower's MLP activation for one 644x476 image: 1564 rows x 5120.
    v = torch.randn(1564, 5120, device=device, dtype=dtype)
    v_out = torch.empty_like(v)
    ours = time_us(lambda: ops.quick_gelu(v, out=v_out), device)
    base = time_us(lambda: v * torch.sigmoid(1.702 * v), device)
    rows.append(Row("quick_gelu", f"t=1564 d=5120 {str(dtype)[6:]}", device, ours,
                    "x * sigmoid(1.702 x)", base, 2 * v.numel() * v.element_size()))
    return rows
