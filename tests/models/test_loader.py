"""load_model: config object, construction on device/dtype, lazy streaming of
shards, and the loaded state equal to transformers' from_pretrained.

StandInLlava plays the model-class contract (built from the transformers
config; `load_weights(iterable of (name, tensor))` accepting both the
transformers-5 and the old hub names) until pyvlm's own classes are plugged in.
"""

import logging
import sys
import types
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

from pyvlm.models import loader
from pyvlm.models.loader import build_hf_config, iter_safetensors, load_model
from pyvlm.models.checkpoint import CheckpointError, CheckpointFiles

CHECKPOINTS = ["tiny_checkpoint_qwen2", "tiny_checkpoint_llama", "tiny_checkpoint_hub_style"]

_HUB_TO_T5 = [("language_model.model.", "model.language_model."),
              ("language_model.lm_head.", "lm_head."),
              ("vision_tower.vision_model.", "model.vision_tower."),
              ("multi_modal_projector.", "model.multi_modal_projector."),
              ("image_newline", "model.image_newline")]


def t5_name(name: str) -> str:
    for old, new in _HUB_TO_T5:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class StandInLlava(torch.nn.Module):
    """A stand-in for pyvlm's LLaVA-OneVision class: transformers' model inside."""

    def __init__(self, config):
        super().__init__()
        self.hf = LlavaOnevisionForConditionalGeneration(config)
        self.default_dtype_at_init = torch.get_default_dtype()
        self.num_tensors_read_at_each_item = []
        self.weights_argument = None

    def load_weights(self, weights):
        self.weights_argument = weights
        params = dict(self.hf.named_parameters())
        loaded = set()
        for name, tensor in weights:
            self.num_tensors_read_at_each_item.append(CountingSafeOpen.num_tensors_read)
            name = t5_name(name)
            with torch.no_grad():
                params[name].copy_(tensor)
            loaded.add("hf." + name)
        if self.hf.config.tie_word_embeddings:
            loaded.add("hf.lm_head.weight")
        return loaded


class CountingSafeOpen:
    """Wraps safetensors.safe_open and counts tensors actually read."""

    num_tensors_read = 0

    def __init__(self, *args, **kwargs):
        self.inner = loader_safe_open(*args, **kwargs)

    def __enter__(self):
        self.handle = self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, name):
        type(self).num_tensors_read += 1
        return self.handle.get_tensor(name)


loader_safe_open = loader.safe_open


@pytest.mark.parametrize("fixture", CHECKPOINTS)
def test_config_object_matches_from_pretrained(fixture, request):
    root = request.getfixturevalue(fixture)
    config = build_hf_config(CheckpointFiles.from_dir(root).config)
    expected = AutoConfig.from_pretrained(root)
    assert type(config) is type(expected)
    ignored = {"_name_or_path"}  # where from_pretrained read it; the dict has no path
    assert ({k: v for k, v in config.to_dict().items() if k not in ignored}
            == {k: v for k, v in expected.to_dict().items() if k not in ignored})


def test_unknown_model_type_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="no_such_vlm"):
        build_hf_config({"model_type": "no_such_vlm"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fixture", CHECKPOINTS)
def test_loaded_state_equals_transformers_from_pretrained(fixture, dtype, request):
    root = request.getfixturevalue(fixture)
    model = load_model(CheckpointFiles.from_dir(root), dtype, "cpu", model_class=StandInLlava)
    reference = LlavaOnevisionForConditionalGeneration.from_pretrained(root, dtype=dtype)
    state, expected = model.hf.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == dtype, name
        assert torch.equal(state[name], tensor), name
    assert model.default_dtype_at_init == dtype and torch.get_default_dtype() == torch.float32
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_tensors_are_read_lazily_one_at_a_time(tiny_checkpoint_qwen2, monkeypatch):
    monkeypatch.setattr(loader, "safe_open", CountingSafeOpen)
    CountingSafeOpen.num_tensors_read = 0
    model = load_model(CheckpointFiles.from_dir(tiny_checkpoint_qwen2), torch.float32, "cpu",
                       model_class=StandInLlava)
    assert isinstance(model.weights_argument, Iterator)  # a stream, not a materialised list
    num_items = len(model.num_tensors_read_at_each_item)
    assert num_items == len(dict(model.hf.named_parameters()))
    assert model.num_tensors_read_at_each_item == list(range(1, num_items + 1))


def test_iterating_names_reads_no_tensor_ahead(tiny_checkpoint_qwen2, monkeypatch):
    monkeypatch.setattr(loader, "safe_open", CountingSafeOpen)
    CountingSafeOpen.num_tensors_read = 0
    stream = iter_safetensors(CheckpointFiles.from_dir(tiny_checkpoint_qwen2).weight_files)
    assert CountingSafeOpen.num_tensors_read == 0  # a generator: nothing read until asked
    next(stream), next(stream)
    assert CountingSafeOpen.num_tensors_read == 2


def test_progress_is_logged_per_shard(tiny_checkpoint_llama, caplog):
    files = CheckpointFiles.from_dir(tiny_checkpoint_llama)
    with caplog.at_level(logging.INFO, logger="pyvlm.loader"):
        load_model(files, torch.float32, "cpu", model_class=StandInLlava)
    num_shards = len(files.weight_files)
    messages = [r.getMessage() for r in caplog.records if r.name == "pyvlm.loader"]
    assert [m.split(" (")[0] for m in messages] == [
        f"Loading weights shard {i}/{num_shards}" for i in range(1, num_shards + 1)]


def _with_shard_edited(checkpoint, tmp_path, edit):
    """A copy of the checkpoint whose first shard's tensors went through edit(dict)."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "edited"
    shutil.copytree(checkpoint, copy)
    files = CheckpointFiles.from_dir(copy)
    shard = files.weight_files[0]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return CheckpointFiles.from_dir(copy)


def test_a_missing_weight_is_a_checkpoint_error_naming_it(tiny_checkpoint_qwen2, tmp_path):
    dropped = []

    def drop(tensors):
        dropped.append(next(name for name in sorted(tensors) if name.endswith("proj.weight")))
        del tensors[dropped[0]]

    files = _with_shard_edited(tiny_checkpoint_qwen2, tmp_path, drop)
    with pytest.raises(CheckpointError, match="1 weights missing from the checkpoint") as error:
        load_model(files, torch.float32, "cpu")
    module = dropped[0].rsplit(".", 2)[0].split(".", 2)[-1]  # e.g. layers.0.mlp
    assert module in str(error.value), (dropped, str(error.value))


def test_an_unknown_weight_is_a_checkpoint_error_naming_it(tiny_checkpoint_qwen2, tmp_path):
    def add(tensors):
        tensors["model.extra_adapter.weight"] = torch.zeros(2)

    files = _with_shard_edited(tiny_checkpoint_qwen2, tmp_path, add)
    with pytest.raises(CheckpointError, match="unknown weights.*model.extra_adapter.weight"):
        load_model(files, torch.float32, "cpu")


def test_class_comes_from_the_registry_by_architectures(tiny_checkpoint_qwen2, monkeypatch):
    asked = []

    def model_class_for(architectures):
        asked.append(tuple(architectures))
        return StandInLlava

    registry = types.ModuleType("pyvlm.models.registry")
    registry.model_class_for = model_class_for
    monkeypatch.setitem(sys.modules, "pyvlm.models.registry", registry)
    model = load_model(CheckpointFiles.from_dir(tiny_checkpoint_qwen2), torch.float32, "cpu")
    assert asked == [("LlavaOnevisionForConditionalGeneration",)]
    assert isinstance(model, StandInLlava)


@pytest.mark.cuda
def test_loads_onto_the_gpu(tiny_checkpoint_qwen2):
    model = load_model(CheckpointFiles.from_dir(tiny_checkpoint_qwen2), torch.bfloat16, "cuda",
                       model_class=StandInLlava)
    reference = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint_qwen2,
                                                                       dtype=torch.bfloat16)
    for name, tensor in reference.state_dict().items():
        assert model.hf.state_dict()[name].is_cuda
        assert torch.equal(model.hf.state_dict()[name].cpu(), tensor), name
