import subprocess
import sys

import torch

from pyvlm.cli import list_ops


def test_help_runs_and_describes_pyvlm():
    result = subprocess.run([sys.executable, "-m", "pyvlm", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "vision-language" in result.stdout and "ops" in result.stdout


def test_ops_lists_every_registered_op_with_its_devices():
    lines = list_ops()
    names = {line.split()[0] for line in lines}
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyvlm::")}
    assert names == registered and "silu_and_mul" in names
    for line in lines:
        assert "CPU" in line, f"op without a CPU kernel: {line}"
