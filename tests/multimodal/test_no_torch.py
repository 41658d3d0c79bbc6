"""The multimodal modules the server and scheduler use import no torch."""

import subprocess
import sys

MODULES = ["pyvlm.multimodal.image_io", "pyvlm.multimodal.image_sources", "pyvlm.multimodal.hashing",
           "pyvlm.multimodal.llava_onevision", "pyvlm.multimodal.llava_onevision_config"]


def test_multimodal_modules_import_without_torch():
    imports = "; ".join(f"import {name}" for name in MODULES)
    code = f"import sys; {imports}; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
