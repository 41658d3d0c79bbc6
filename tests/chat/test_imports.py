"""pyvlm.chat and pyvlm.utils stay light: no torch, no transformers."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["pyvlm.chat", "pyvlm.utils"])
def test_imports_neither_torch_nor_transformers(module):
    code = (f"import sys, {module}; heavy = {{'torch', 'transformers'}} & set(sys.modules); "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
