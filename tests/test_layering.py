"""The layers above the runner stay torch-free (see STYLE.md): importing them
in a fresh interpreter must not import torch."""

import subprocess
import sys

import pytest

TORCH_FREE = ["pyvlm.http", "pyvlm.server", "pyvlm.chat", "pyvlm.multimodal", "pyvlm.scheduling"]

# Every module of the package, imported in one fresh interpreter (a family
# processor added to pyvlm/multimodal is checked without being listed here).
WALK = """
import importlib, pkgutil, sys
package = importlib.import_module({package!r})
for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(module.name)
    assert 'torch' not in sys.modules, module.name + ' imported torch'
"""


def test_the_top_level_package_imports_without_torch():
    code = "import sys, pyvlm; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("package", TORCH_FREE)
def test_every_module_of_the_package_imports_without_torch(package):
    result = subprocess.run([sys.executable, "-c", WALK.format(package=package)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
