"""Pure-torch references for every pyvlm op.

Each takes the same inputs as the op's Python wrapper (in whatever dtype it
is given; tests pass float64) and returns the result instead of writing an
output tensor. They define what the kernels must compute.
"""

from .activation import gelu_and_mul, silu_and_mul  # noqa: F401
from .attention import paged_attention_decode, reshape_and_cache  # noqa: F401
