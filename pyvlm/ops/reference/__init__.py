"""Pure-torch references for every pyvlm op.

Each takes the same inputs as the op's Python wrapper (in whatever dtype it
is given; tests pass float64) and returns the result instead of writing an
output tensor. They define what the kernels must compute.
"""

from .activation import gelu_and_mul, quick_gelu, silu_and_mul  # noqa: F401
from .sampling import apply_penalties, kept_distribution, logprobs, sample  # noqa: F401
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
