"""Every .cu file compiles with nvcc for sm_90a, so a syntax or type error
never first shows up on the GPU machine. Runs where nvcc exists (here and in
CI); the kernels themselves are exercised by `pytest -m cuda` on a GPU."""

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_shim")
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)


def nvcc_command(source: str, output: str) -> list:
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    return [
        NVCC, "-c", "-std=c++20", "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
        "-gencode=arch=compute_90a,code=sm_90a",
        # setup.py's defines for a CUDA build with sm_90a code.
        "-DPYVLM_WITH_CUDA", "-DPYVLM_HAS_SM90A",
        # Torch's CPU wheels lack one generated CUDA header; the shim stands in.
        f"-I{SHIM}", f"-I{torch_include}", f"-I{os.path.join(torch_include, 'torch/csrc/api/include')}",
        f"-I{sysconfig.get_paths()['include']}",
        "-Xcompiler", "-Wno-c++20-extensions",
        source, "-o", output,
    ]


def compile_one(source: str, out_dir: str):
    output = os.path.join(out_dir, os.path.basename(source) + ".o")
    result = subprocess.run(nvcc_command(source, output), capture_output=True, text=True)
    return source, result.returncode, result.stderr[-4000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_all_cuda_sources_compile_for_sm90a(tmp_path):
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert sources, "no CUDA adapters found"
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda s: compile_one(s, str(tmp_path)), sources))
    failures = [f"{os.path.relpath(s, ROOT)}:\n{err}" for s, rc, err in results if rc != 0]
    assert not failures, "\n\n".join(failures)


def sweep_command(source: str, output: str) -> list:
    """benchmarks/kernels/run_*_sweep.sh's nvcc line (no torch), compile only."""
    return [NVCC, "-c", "-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr",
            "-gencode=arch=compute_90a,code=sm_90a", f"-I{os.path.join(ROOT, 'csrc')}",
            source, "-o", output]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_kernel_sweeps_compile_for_sm90a(tmp_path):
    """The standalone sweeps the device sessions build with nvcc alone."""
    sources = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "kernels", "*.cu")))
    assert sources, "no kernel sweeps found"
    failures = []
    for source in sources:
        output = os.path.join(str(tmp_path), os.path.basename(source) + ".o")
        result = subprocess.run(sweep_command(source, output), capture_output=True, text=True)
        if result.returncode != 0:
            failures.append(f"{os.path.relpath(source, ROOT)}:\n{result.stderr[-4000:]}")
    assert not failures, "\n\n".join(failures)
