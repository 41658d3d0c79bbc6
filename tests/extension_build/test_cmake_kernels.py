"""The kernels build as a plain C++ library with CMake (no torch, no Python),
and the C++ test program checks every CPU kernel against a naive loop."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_kernel_library_and_tests_pass(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build)], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    libs = [p for p in os.listdir(build) if p.startswith("libpyvlm_kernels")]
    assert libs, "the plain C++ kernel library was not built"
    result = subprocess.run([str(build / "pyvlm_kernel_tests")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    passed = int(summary.split()[0])
    assert passed > 0 and summary.endswith(" 0 failed"), summary


def test_kernel_headers_include_no_torch():
    kernels = os.path.join(ROOT, "csrc", "kernels")
    for dirpath, _, files in os.walk(kernels):
        for name in files:
            with open(os.path.join(dirpath, name)) as f:
                text = f.read()
            for banned in ("<torch/", "<ATen/", "<c10/", "Python.h"):
                assert banned not in text, f"{name} includes {banned}: kernels must stay framework-free"
