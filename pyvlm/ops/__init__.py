"""Typed wrappers over torch.ops.pyvlm.* (the compiled extension).

Each wrapper allocates its outputs unless `out=` is given; the raw ops take
preallocated outputs first (see csrc/registration.cpp for the schemas).
"""

from ._library import has_cuda_kernels, ops  # noqa: F401
from .activation import gelu_and_mul, silu_and_mul  # noqa: F401
from .attention import paged_attention_decode, reshape_and_cache  # noqa: F401
