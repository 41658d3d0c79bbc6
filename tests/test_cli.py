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


def test_generate_answers_with_the_engine(tiny_checkpoint_qwen2):
    result = subprocess.run(
        [sys.executable, "-m", "pyvlm", "generate", "--model", str(tiny_checkpoint_qwen2),
         "--prompt", "the cat sat", "--max-new-tokens", "4", "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Engine loaded" in result.stderr and "Prefill batch. #new-seq: 1" in result.stderr
    assert result.stdout.strip() != ""


def test_generate_with_a_missing_model_is_one_clear_line(tmp_path):
    missing = tmp_path / "no-such-model"
    result = subprocess.run([sys.executable, "-m", "pyvlm", "generate", "--model", str(missing)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(missing) in result.stderr.strip().splitlines()[-1]


def test_generate_reads_the_local_images_it_is_given(tiny_checkpoint_qwen2, tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (0, 200, 0)).save(tmp_path / "green.png")
    result = subprocess.run(
        [sys.executable, "-m", "pyvlm", "generate", "--model", str(tiny_checkpoint_qwen2),
         "--image", str(tmp_path / "green.png"), "--max-new-tokens", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Prefill batch. #new-seq: 1" in result.stderr


def test_the_folder_of_local_images_holds_each_of_them(tmp_path):
    from pyvlm.cli import folder_of_local_images

    paths = [str(tmp_path / "a" / "x.png"), str(tmp_path / "a" / "b" / "y.png")]
    assert folder_of_local_images(paths + ["http://h/z.png", "data:image/png;base64,AA=="]) \
        == str(tmp_path / "a")
    assert folder_of_local_images(["https://h/z.png"]) is None
