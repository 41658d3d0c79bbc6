import pytest
import torch

from pyvlm import ops
from pyvlm.ops import reference

from .conftest import assert_close, poisoned

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (tokens, in_features, out_features): one decode token; the 2/4/8-token
# kernels and a count rounded up to them (3, 5); more than one launch's 8
# tokens (11); features that are not whole 16-byte vectors (the scalar
# path); an output count that leaves a CTA's last rows empty (1001); K long
# enough for several unrolled rounds per thread (4160).
SHAPES = [(1, 64, 32), (2, 128, 16), (3, 96, 1001), (4, 256, 24), (5, 40, 8), (8, 4160, 12),
          (11, 72, 20), (2, 37, 9), (1, 0, 4), (0, 16, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_gemm_matches_reference(device, shape, dtype, with_bias):
    tokens, k, n = shape
    x = torch.randn(tokens, k, device=device).to(dtype)
    weight = torch.randn(n, k, device=device).to(dtype) / max(k, 1) ** 0.5
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    out = poisoned(tokens, n, dtype=dtype, device=device)
    ops.skinny_gemm(x, weight, bias, out=out)
    ref = reference.skinny_gemm(x.double(), weight.double(),
                                None if bias is None else bias.double())
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_output_is_the_unrounded_sum(device, dtype):
    """out_dtype=float32 (logits) skips the rounding to the input dtype."""
    x = torch.randn(3, 512, device=device).to(dtype)
    weight = (torch.randn(40, 512, device=device) / 20).to(dtype)
    out = ops.skinny_gemm(x, weight, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    ref = reference.skinny_gemm(x.double(), weight.double())
    assert_close(out, ref, torch.float32)


def test_leading_dimensions_and_strided_rows(device):
    """Token rows may be a view with a row stride (a slice of a wider
    buffer); leading dimensions are flattened and restored."""
    wide = torch.randn(6, 200, device=device)
    x = wide[:, 8:136]  # rows of 128 elements, stride 200
    weight = torch.randn(24, 128, device=device)
    out = ops.skinny_gemm(x, weight)
    assert_close(out, reference.skinny_gemm(x.double(), weight.double()), torch.float32)
    x3 = torch.randn(2, 3, 64, device=device)
    weight3 = torch.randn(10, 64, device=device)
    out3 = ops.skinny_gemm(x3, weight3)
    assert out3.shape == (2, 3, 10)
    assert_close(out3, reference.skinny_gemm(x3.double(), weight3.double()), torch.float32)


def test_opcheck(device):
    x = torch.randn(3, 64, device=device)
    weight = torch.randn(16, 64, device=device)
    bias = torch.randn(16, device=device)
    out = torch.empty(3, 16, device=device)
    torch.library.opcheck(torch.ops.pyvlm.skinny_gemm.default, (out, x, weight, bias))
    torch.library.opcheck(torch.ops.pyvlm.skinny_gemm.default, (out, x, weight, None))


def test_bad_inputs_raise_naming_argument():
    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight.size\(1\) must be 8"):
        ops.skinny_gemm(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match="weight must have dtype"):
        ops.skinny_gemm(x, weight.half())
    with pytest.raises(ValueError, match="out must have dtype"):
        ops.skinny_gemm(x.half(), weight.half(), out=torch.empty(2, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must have shape"):
        torch.ops.pyvlm.skinny_gemm(torch.empty(2, 5), x, weight, None)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.skinny_gemm(x, weight, torch.randn(5))
    with pytest.raises(ValueError, match="rows must be contiguous"):
        torch.ops.pyvlm.skinny_gemm(torch.empty(8, 4), torch.randn(8, 8).t(), weight, None)
    with pytest.raises(ValueError, match="input must be float32"):
        ops.skinny_gemm(torch.ones(2, 8, dtype=torch.int32), weight)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 4, 8])
def test_cuda_real_shapes_match_cpu(dtype, tokens):
    """The decode shapes of a 7B model (Qwen2-VL's q/k/v, down and lm_head
    widths) equal the CPU op within the dtype's rounding."""
    for k, n in [(3584, 4608), (18944, 3584), (3584, 152064 // 8)]:
        x = torch.randn(tokens, k).to(dtype)
        weight = (torch.randn(n, k) / k ** 0.5).to(dtype)
        bias = torch.randn(n).to(dtype)
        gpu = ops.skinny_gemm(x.cuda(), weight.cuda(), bias.cuda(), out_dtype=torch.float32)
        cpu = ops.skinny_gemm(x, weight, bias, out_dtype=torch.float32)
        assert_close(gpu, cpu.double(), torch.float32)


@pytest.mark.cuda
def test_cuda_misaligned_input_takes_the_scalar_path():
    """An input that starts off a 16-byte boundary is read element by element."""
    flat = torch.randn(2 * 256 + 1, dtype=torch.bfloat16, device="cuda")
    x = flat[1:].view(2, 256)
    weight = torch.randn(64, 256, dtype=torch.bfloat16, device="cuda") / 16
    out = poisoned(2, 64, dtype=torch.bfloat16, device="cuda")
    ops.skinny_gemm(x, weight, out=out)
    assert_close(out, reference.skinny_gemm(x.double(), weight.double()), torch.bfloat16)


def _decode_chain(x, residual, params, bufs):
    """A decode layer's kernels, each reading the one before: norm, up GEMM,
    activation, down GEMM, fused add + norm, head GEMM."""
    norm1, up, down, norm2, head = params
    ops.rms_norm(x, norm1, 1e-5, out=bufs["normed"])
    ops.skinny_gemm(bufs["normed"], up, out=bufs["up"])
    ops.silu_and_mul(bufs["up"], out=bufs["act"])
    ops.skinny_gemm(bufs["act"], down, out=bufs["down"])
    ops.fused_add_rms_norm(bufs["down"], residual, norm2, 1e-5)
    ops.skinny_gemm(bufs["down"], head, out=bufs["head"])
    return bufs["head"]


@pytest.mark.cuda
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_cuda_gemm_after_a_kernel_reads_that_kernels_output(graph):
    """The skinny GEMM starts before the kernel ahead of it ends (programmatic
    dependent launch: it prefetches its weights, then waits): in a chain of
    dependent kernels over buffers poisoned with NaN before every run, each
    GEMM reads what the kernel ahead wrote, eagerly and replayed from a graph,
    as the CPU ops computed one after another."""
    hidden, inter, vocab = 2048, 4096, 8192
    dtype = torch.bfloat16
    params_cpu = (torch.rand(hidden) + 0.5, torch.randn(2 * inter, hidden) / hidden ** 0.5,
                  torch.randn(hidden, inter) / inter ** 0.5, torch.rand(hidden) + 0.5,
                  torch.randn(vocab, hidden) / hidden ** 0.5)
    params_cpu = tuple(p.to(dtype) for p in params_cpu)
    params = tuple(p.cuda() for p in params_cpu)
    shapes = {"normed": hidden, "up": 2 * inter, "act": inter, "down": hidden, "head": vocab}

    def buffers(device):
        return {name: torch.empty(1, width, dtype=dtype, device=device)
                for name, width in shapes.items()}

    bufs, x, residual = buffers("cuda"), torch.empty(1, hidden, dtype=dtype, device="cuda"), \
        torch.empty(1, hidden, dtype=dtype, device="cuda")
    run = lambda: _decode_chain(x, residual, params, bufs)  # noqa: E731
    if graph:
        x.normal_(), residual.normal_()
        run()  # warm-up outside the capture
        torch.cuda.synchronize()
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            run()
        run = captured.replay
    for _ in range(10):
        x_cpu, residual_cpu = torch.randn(1, hidden).to(dtype), torch.randn(1, hidden).to(dtype)
        expected = _decode_chain(x_cpu, residual_cpu.clone(), params_cpu, buffers("cpu")).clone()
        x.copy_(x_cpu), residual.copy_(residual_cpu)
        for buf in bufs.values():
            buf.fill_(float("nan"))
        run()
        assert_close(bufs["head"], expected.double(), dtype)
