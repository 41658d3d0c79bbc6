"""skinny_gemm against F.linear (cuBLAS / the CPU BLAS) at decode token counts.

The shapes are Qwen2-VL-7B's decode linears. On CUDA each timed call walks
enough distinct weight copies to overflow L2 (a decode step reads its
weights from HBM: one 25 MB matrix timed alone would come from the 50 MB
L2), and the walk is captured in a CUDA graph, as the engine's decode step
is, so both sides are timed without Python launch overhead.
"""

import torch
import torch.nn.functional as F

from pyvlm import ops

from .harness import Row, time_us

# (name, in_features, out_features, bias)
SHAPES = [("qkv", 3584, 4608, True), ("o_proj", 3584, 3584, False),
          ("gate_up", 3584, 37888, False), ("down", 18944, 3584, False),
          ("lm_head", 3584, 152064, False)]
L2_OVERFLOW_BYTES = 256 << 20


def _walk(fn, weights, biases, x):
    for w, b in zip(weights, biases):
        fn(x, w, b)


def _timed_per_call(fn, weights, biases, x, device) -> float:
    if not device.startswith("cuda"):
        return time_us(lambda: fn(x, weights[0], biases[0]), device)
    _walk(fn, weights, biases, x)  # warm up (cuBLAS picks its kernels) before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _walk(fn, weights, biases, x)
    return time_us(graph.replay, device) / len(weights)


def run(device: str):
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = SHAPES if cuda else SHAPES[:2]
    rows = []
    for name, k, n, with_bias in shapes:
        nbytes = n * k * torch.finfo(dtype).bits // 8
        copies = max(1, -(-L2_OVERFLOW_BYTES // nbytes)) if cuda else 1
        weights = [torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5 for _ in range(copies)]
        biases = [torch.randn(n, device=device, dtype=dtype) if with_bias else None
                  for _ in range(copies)]
        for tokens in (1, 2, 4, 8, 16):
            x = torch.randn(tokens, k, device=device, dtype=dtype)
            ours = _timed_per_call(ops.skinny_gemm, weights, biases, x, device)
            base = _timed_per_call(F.linear, weights, biases, x, device)
            rows.append(Row("skinny_gemm", f"{name} t={tokens} {k}->{n} {str(dtype)[6:]}", device,
                            ours, "F.linear (BLAS)", base, nbytes))
        del weights, biases
    return rows
