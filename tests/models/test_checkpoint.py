"""Finding checkpoints and reading their files (pyvlm/models/checkpoint.py)."""

import fnmatch
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from pyvlm.models import checkpoint
from pyvlm.models.checkpoint import (CheckpointError, CheckpointFiles, load_checkpoint_files,
                                     resolve_checkpoint, resolve_device, resolve_dtype)
from tests.tiny_checkpoints import CHAT_TEMPLATE, image_processor_config


def test_module_imports_without_torch():
    code = "import sys, pyvlm.models.checkpoint; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_local_directory_is_used_as_is(tiny_checkpoint_qwen2):
    assert resolve_checkpoint(str(tiny_checkpoint_qwen2)) == tiny_checkpoint_qwen2


@pytest.mark.parametrize("model", ["/no/such/checkpoint", "./missing-dir", "a/b/c"])
def test_missing_directory_is_one_clear_error(model):
    with pytest.raises(CheckpointError) as raised:
        resolve_checkpoint(model)
    message = str(raised.value)
    assert repr(model) in message and "neither a local directory nor reachable" in message
    assert "\n" not in message


def test_unreachable_hub_id_is_one_clear_error(monkeypatch):
    def offline(**kwargs):
        raise OSError("We couldn't connect to the hub\nand more lines")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(CheckpointError) as raised:
        resolve_checkpoint("some-org/some-vlm")
    message = str(raised.value)
    assert "'some-org/some-vlm'" in message and "reachable on the Hugging Face hub" in message
    assert "couldn't connect" in message and "\n" not in message


def test_hub_id_downloads_weights_configs_and_tokenizer_only(monkeypatch, tmp_path):
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    (tmp_path / "model.safetensors").touch()  # a repository with safetensors: one download
    assert resolve_checkpoint("llava-hf/some-model", revision="abc123") == tmp_path
    (call,) = calls
    assert call["repo_id"] == "llava-hf/some-model" and call["revision"] == "abc123"

    def fetched(name):
        return any(fnmatch.fnmatch(name, pattern) for pattern in call["allow_patterns"])

    for name in ["model-00001-of-00004.safetensors", "model.safetensors.index.json", "config.json",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "chat_template.json", "preprocessor_config.json", "generation_config.json"]:
        assert fetched(name), name
    for name in ["pytorch_model.bin", "model.gguf", "README.md", "onnx/model.onnx"]:
        assert not fetched(name), name


def test_a_repository_without_safetensors_also_downloads_its_bin_shards(monkeypatch, tmp_path):
    """liuhaotian/llava-v1.5-7b ships pytorch_model-0000N-of-0000M.bin only."""
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs["allow_patterns"])
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert resolve_checkpoint("liuhaotian/llava-v1.5-7b") == tmp_path
    first, second = calls
    names = ("pytorch_model-00001-of-00002.bin", "model.gguf")
    assert [any(fnmatch.fnmatch(n, p) for p in first) for n in names] == [False, False]
    assert [any(fnmatch.fnmatch(n, p) for p in second) for n in names] == [True, False]


def _tensor_names(path):
    with safe_open(path, framework="pt") as shard:
        return set(shard.keys())


@pytest.mark.parametrize("fixture", ["tiny_checkpoint_qwen2", "tiny_checkpoint_llama"])
def test_sharded_checkpoint_files(fixture, request):
    root = request.getfixturevalue(fixture)
    files = CheckpointFiles.from_dir(root)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    assert files.config == json.loads((root / "config.json").read_text())
    assert files.architectures == ("LlavaOnevisionForConditionalGeneration",)
    assert len(files.weight_files) >= 2 and list(files.weight_files) == sorted(files.weight_files)
    names = [name for path in files.weight_files for name in _tensor_names(path)]
    assert sorted(names) == sorted(index["weight_map"])  # every tensor, each once
    assert files.tokenizer_dir == root
    assert files.processor_config == image_processor_config()
    assert files.chat_template == CHAT_TEMPLATE
    assert files.generation_config.get("eos_token_id") == files.config["text_config"]["eos_token_id"]


def test_hub_style_checkpoint_files(tiny_checkpoint_hub_style):
    files = CheckpointFiles.from_dir(tiny_checkpoint_hub_style)
    assert files.weight_files == (tiny_checkpoint_hub_style / "model.safetensors",)
    assert "language_model.model.embed_tokens.weight" in _tensor_names(files.weight_files[0])
    assert files.config["torch_dtype"] == "float32"
    assert files.processor_config == image_processor_config()
    assert files.chat_template == CHAT_TEMPLATE  # from chat_template.json
    assert files.generation_config == {}


def test_fallbacks_for_processor_config_and_chat_template(tiny_checkpoint_hub_style, tmp_path):
    root = shutil.copytree(tiny_checkpoint_hub_style, tmp_path / "ckpt")
    (root / "preprocessor_config.json").unlink()
    (root / "chat_template.json").unlink()
    processor = json.loads((root / "processor_config.json").read_text())
    processor["image_processor"] = image_processor_config()
    (root / "processor_config.json").write_text(json.dumps(processor))
    tokenizer_config = json.loads((root / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = [{"name": "tool_use", "template": "tools"},
                                         {"name": "default", "template": CHAT_TEMPLATE}]
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    files = load_checkpoint_files(str(root))
    assert files.processor_config == image_processor_config()
    assert files.chat_template == CHAT_TEMPLATE
    tokenizer_config.pop("chat_template")
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert CheckpointFiles.from_dir(root).chat_template is None


def test_broken_checkpoints_raise_checkpoint_error(tiny_checkpoint_qwen2, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        CheckpointFiles.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has no weights"):
        CheckpointFiles.from_dir(tmp_path)
    root = shutil.copytree(tiny_checkpoint_qwen2, tmp_path / "sharded")
    next(root.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointFiles.from_dir(root)


def test_separate_tokenizer_path(tiny_checkpoint_qwen2, tiny_checkpoint_llama):
    files = load_checkpoint_files(str(tiny_checkpoint_qwen2), tokenizer_path=str(tiny_checkpoint_llama))
    assert files.root == tiny_checkpoint_qwen2 and files.tokenizer_dir == tiny_checkpoint_llama


# SGLang's "auto": the checkpoint's dtype on GPU, float32 checkpoints in half
# precision (bfloat16 for Gemma); CPU always float32.
DTYPE_CASES = [
    ("auto", {"dtype": "bfloat16"}, "cpu", torch.float32),
    ("auto", {"dtype": "bfloat16"}, "cuda", torch.bfloat16),
    ("auto", {"torch_dtype": "float16"}, "cuda:0", torch.float16),
    ("auto", {"text_config": {"torch_dtype": "bfloat16"}}, "cuda", torch.bfloat16),
    ("auto", {"dtype": "float32"}, "cuda", torch.float16),
    ("auto", {}, "cuda", torch.float16),
    ("auto", {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}, "cuda",
     torch.bfloat16),
    ("bfloat16", {"dtype": "float32"}, "cpu", torch.bfloat16),
    ("half", {}, "cpu", torch.float16),
    ("float32", {"dtype": "bfloat16"}, "cuda", torch.float32),
]


@pytest.mark.parametrize("dtype,config,device,expected", DTYPE_CASES)
def test_resolve_dtype(dtype, config, device, expected):
    assert resolve_dtype(dtype, config, device) == expected


def test_resolve_dtype_rejects_unknown_names():
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", {}, "cpu")


def test_resolve_device():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="tpu"):
        resolve_device("tpu")


def test_checkpoint_files_are_frozen(tiny_checkpoint_qwen2):
    files = checkpoint.CheckpointFiles.from_dir(tiny_checkpoint_qwen2)
    with pytest.raises(AttributeError):
        files.root = tiny_checkpoint_qwen2.parent
