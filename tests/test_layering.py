"""The layers above the runner stay torch-free (see STYLE.md): importing them
in a fresh interpreter must not import torch."""

import subprocess
import sys

import pytest

TORCH_FREE = ["pyvlm", "pyvlm.http", "pyvlm.server", "pyvlm.chat", "pyvlm.multimodal", "pyvlm.scheduling"]


@pytest.mark.parametrize("package", TORCH_FREE)
def test_package_imports_without_torch(package):
    code = f"import sys, {package}; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
