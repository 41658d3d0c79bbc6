"""The layers above the runner stay torch-free (see STYLE.md): importing them
in a fresh interpreter must not import torch."""

import importlib.util
import subprocess
import sys

import pytest

TORCH_FREE = ["pyvlm", "pyvlm.http", "pyvlm.server", "pyvlm.chat", "pyvlm.multimodal", "pyvlm.engine"]
PRESENT = [name for name in TORCH_FREE if importlib.util.find_spec(name) is not None]


@pytest.mark.parametrize("package", PRESENT)
def test_package_imports_without_torch(package):
    code = f"import sys, {package}; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
