"""Every module of pyvlm.server imports without torch (the engine is passed in)."""

import pkgutil
import subprocess
import sys

import pyvlm.server


def test_server_modules_import_without_torch():
    names = [f"pyvlm.server.{m.name}" for m in pkgutil.iter_modules(pyvlm.server.__path__)]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    try: importlib.import_module(name)\n"
            "    except ImportError as exc:\n"
            "        if 'torch' in str(exc): raise\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "pyvlm.server.app" in names and "pyvlm.server.launch" in names
