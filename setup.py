"""Builds pyvlm's C++/CUDA extension (`pyvlm._C`, ops under torch.ops.pyvlm).

CUDA kernels are built when torch has CUDA and nvcc is found; PYVLM_CUDA=0/1
forces the choice and PYVLM_CUDA_ARCHS (default "80;90a") picks the targets. Sources are globbed, so a new kernel file needs no edit here.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("PYVLM_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and has_nvcc


def cuda_archs() -> list:
    """PYVLM_CUDA_ARCHS, e.g. "80;90a" (the default: Ampere and Hopper)."""
    return [a for a in os.environ.get("PYVLM_CUDA_ARCHS", "80;90a").split(";") if a]


def sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cpp = sources("csrc/*.cpp") + sources("csrc/kernels/*.cpp") + sources("csrc/cpu/*.cpp")
    # at::parallel_for is OpenMP in torch's headers: without -fopenmp every CPU op
    # silently runs on one thread.
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "pyvlm._C", cpp, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    # PYVLM_WITH_CUDA: the C++ sources leave CUDA-only ops to the .cu adapters.
    cxx_flags.append("-DPYVLM_WITH_CUDA")
    nvcc_flags = [
        "-DPYVLM_WITH_CUDA",
        "-O3",
        "-std=c++20",
        "--use_fast_math",
        "-lineinfo",
        "--expt-relaxed-constexpr",
    ] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda_archs()]
    if "90a" in cuda_archs():  # the wgmma kernels exist (csrc/kernels/cuda/wgmma.cuh)
        nvcc_flags.append("-DPYVLM_HAS_SM90A")
    return cpp_extension.CUDAExtension(
        "pyvlm._C",
        cpp + sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


setup(
    packages=find_packages(include=["pyvlm", "pyvlm.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
