import pytest
import torch

from pyvlm import ops
from pyvlm.ops import reference

from .conftest import assert_close, poisoned

# (1, 18944): one decode token's row spread over many CUDA blocks; (2, 1001):
# rows that are not whole 16-byte vectors (the scalar path).
SHAPES = [(0, 64), (1, 2), (7, 128), (33, 11008 // 8), (3, 5, 96), (1, 18944), (2, 1001)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_gated_activation_matches_reference(device, shape, dtype, name):
    x = torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype) * 3
    out = poisoned(*shape, dtype=dtype, device=device)
    if name == "silu":
        ops.silu_and_mul(x, out=out)
        ref = reference.silu_and_mul(x.double())
    else:
        approximate = "tanh" if name == "gelu_tanh" else "none"
        ops.gelu_and_mul(x, approximate, out=out)
        ref = reference.gelu_and_mul(x.double(), approximate)
    # Against the reference rounded to the output's dtype: a product far
    # below float16's smallest subnormal (gelu of a very negative input)
    # must come out as 0, which is a relative error of 1 for a row of two.
    assert_close(out, ref.to(dtype), dtype)


def test_opcheck(device):
    x = torch.randn(5, 64, device=device)
    out = torch.empty(5, 32, device=device)
    torch.library.opcheck(torch.ops.pyvlm.silu_and_mul.default, (out, x))
    torch.library.opcheck(torch.ops.pyvlm.gelu_and_mul.default, (out, x, "tanh"))


def test_bad_inputs_raise_naming_argument():
    x = torch.randn(4, 7)
    with pytest.raises(ValueError, match="input's last dimension must be even"):
        ops.silu_and_mul(x, out=torch.empty(4, 3))
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="out must have shape"):
        ops.silu_and_mul(x, out=torch.empty(4, 5))
    with pytest.raises(ValueError, match="out must have dtype"):
        ops.silu_and_mul(x, out=torch.empty(4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="input must be float32"):
        ops.silu_and_mul(torch.ones(4, 8, dtype=torch.int32), out=torch.empty(4, 4))
    with pytest.raises(ValueError, match="approximate must be"):
        ops.gelu_and_mul(x, "sigmoid")
    with pytest.raises(ValueError, match="input must be contiguous"):
        ops.silu_and_mul(torch.randn(8, 4).t(), out=torch.empty(4, 4))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = torch.randn(17, 2 * 1000, dtype=torch.bfloat16)
    cpu = ops.silu_and_mul(x)
    gpu = ops.silu_and_mul(x.cuda())
    assert_close(gpu, cpu.double(), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_misaligned_rows_take_the_scalar_path(dtype):
    """A contiguous input that starts off a 16-byte boundary (a slice of a
    larger buffer) is read element by element, with the same results."""
    d = 4096
    flat = torch.randn(3 * 2 * d + 1, dtype=dtype, device="cuda") * 3
    x = flat[1:].view(3, 2 * d)
    out = poisoned(3, d, dtype=dtype, device="cuda")
    ops.silu_and_mul(x, out=out)
    assert_close(out, reference.silu_and_mul(x.double()), dtype)



@pytest.mark.parametrize("shape", [(0,), (5,), (7, 128), (3, 1001), (1564, 40)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quick_gelu_matches_reference(device, shape, dtype):
    x = torch.randn(*shape, device=device).to(dtype) * 4
    out = poisoned(*shape, dtype=dtype, device=device)
    ops.quick_gelu(x, out=out)
    assert_close(out, reference.quick_gelu(x.double()), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quick_gelu_rounds_as_transformers_eager(device, dtype):
    """Each step rounds to the dtype as transformers' eager QuickGELU
    (1.702 x, the sigmoid, the product): at most one unit in the last place
    apart, from the float32 sigmoid's own rounding."""
    x = torch.randn(4096, device=device).to(dtype) * 4
    eager = x * torch.sigmoid(1.702 * x)
    ours = ops.quick_gelu(x)
    ulp = torch.finfo(dtype).eps * eager.abs().double().clamp(min=torch.finfo(dtype).tiny)
    assert ((ours.double() - eager.double()).abs() <= ulp).all()
    assert (ours == eager).double().mean() > 0.99


def test_quick_gelu_opcheck_and_bad_inputs(device):
    x = torch.randn(6, 10, device=device)
    torch.library.opcheck(torch.ops.pyvlm.quick_gelu.default, (torch.empty_like(x), x))
    with pytest.raises(ValueError, match="out must have shape"):
        ops.quick_gelu(x, out=torch.empty(6, 9, device=device))
    with pytest.raises(ValueError, match="input must be contiguous"):
        ops.quick_gelu(x.t())
