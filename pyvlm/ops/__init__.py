"""Typed wrappers over torch.ops.pyvlm.* (the compiled extension).

Each wrapper allocates its outputs unless `out=` is given; the raw ops take
preallocated outputs first (see csrc/registration.cpp for the schemas).
"""

from ._library import has_cuda_kernels, ops  # noqa: F401
from .index_checks import index_checks, index_checks_enabled  # noqa: F401
from .activation import gelu_and_mul, quick_gelu, silu_and_mul  # noqa: F401
from .sampling import apply_penalties, sample  # noqa: F401
from .linear import skinny_gemm  # noqa: F401
from .prefill import paged_attention_prefill, varlen_attention  # noqa: F401
from .preprocess import preprocess_images, preprocess_images_patchify  # noqa: F401
from .layers import (  # noqa: F401
    fused_add_layer_norm,
    fused_add_rms_norm,
    layer_norm,
    merge_multimodal_embeddings,
    mrope,
    rms_norm,
    rotary_embedding,
)
from .attention import paged_attention_decode, reshape_and_cache  # noqa: F401
from .streams import green_context_stream  # noqa: F401
