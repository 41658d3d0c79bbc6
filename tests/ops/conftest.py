"""Shared helpers for the op tests: devices, tolerances, poisoning, CUDA
scripts in a child process."""

import os
import subprocess
import sys

import pytest
import torch

import pyvlm.ops  # noqa: F401  (registers the ops and their fakes)

# ||out - ref|| / ||ref|| limits against a float64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error; NaN anywhere in out (an unwritten element) gives inf."""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom > 0 else num


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    err = rel_err(out, ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.3g} >= {TOLERANCE[dtype]:g}"


def poisoned(*shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN (float) or -7 (int) so unwritten elements fail."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -7, dtype=dtype, device=device)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


CHILD_PRELUDE = '''
def assert_checked_again(calls, error, *texts):
    """Out of an index_checks(False) scope, each call raises error naming its text."""
    for call, text in zip(calls, texts * len(calls) if len(texts) == 1 else texts):
        try:
            call()
        except error as exc:
            assert text in str(exc), exc
            continue
        raise AssertionError("index checks did not come back after the scope")
'''


def run_cuda_child(script: str, **env_vars: str) -> subprocess.CompletedProcess:
    """Runs script in a fresh Python that imports this checkout's pyvlm, for
    kernels fed bad indices on purpose: a fault there cannot poison this
    process's CUDA context, and CUDA_LAUNCH_BLOCKING reports it at its launch.
    The child starts with index checks on (PYVLM_CHECK_INDICES unset), and
    CHILD_PRELUDE's assert_checked_again defined; env_vars are set in its
    environment (e.g. a kernel choice read when the extension loads)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(pyvlm.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYVLM_CHECK_INDICES"}
    env["CUDA_LAUNCH_BLOCKING"] = "1"
    env.update(env_vars)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", CHILD_PRELUDE + script], env=env,
                          capture_output=True,
                          text=True, timeout=300)
