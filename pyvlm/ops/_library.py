"""Loads the compiled extension, which registers torch.ops.pyvlm.*."""

import torch

from pyvlm import _C  # noqa: F401  (importing runs the op registrations)

ops = torch.ops.pyvlm


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("pyvlm::silu_and_mul", "CUDA")
