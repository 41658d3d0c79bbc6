"""Building a model from a checkpoint and streaming its weights in.

The model is constructed directly on the target device in the target dtype,
then safetensors are read one tensor at a time (memory-mapped, shard by
shard) into `model.load_weights(...)`, so peak memory is about one copy of the
weights plus the tensor in flight. Each model class maps checkpoint names
(transformers-5 and old hub layouts) onto its own parameters.
"""

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Type, Union

import torch
from safetensors import safe_open

from pyvlm.layers.tensor_parallel import current_group
from pyvlm.models.checkpoint import CheckpointError, CheckpointFiles
from pyvlm.models.weight_loading import WeightNamesError

logger = logging.getLogger("pyvlm.loader")

LOAD_FORMATS = ("auto", "dummy")


def build_hf_config(config: dict):
    """The transformers config object of a config.json dict (no disk access).

    `from_dict` applies transformers' upgrades of legacy keys (torch_dtype,
    flat rope_theta), as from_pretrained does.
    """
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"config.json has model_type {model_type!r}, "
                              "which this transformers version does not know")
    return CONFIG_MAPPING[model_type].from_dict(dict(config))


def set_config_dtype(hf_config, dtype: torch.dtype) -> None:
    """Records the run dtype on the config and its sub-configs, as from_pretrained
    does: transformers-built sub-modules create their weights in config.dtype."""
    hf_config.dtype = dtype
    for name in getattr(hf_config, "sub_configs", {}):
        sub_config = getattr(hf_config, name, None)
        if sub_config is not None:
            sub_config.dtype = dtype


class UnreadTensor:
    """A safetensors tensor not read yet: its shape, and reads of the part a
    tensor-parallel rank keeps (`narrow`, through safetensors' get_slice),
    so a rank reads 1/tp_size of each split matrix from the file, not the
    whole; `read()` gives the whole tensor (for parameters every rank
    holds whole). Valid while its shard is open (during the weights loop)."""

    def __init__(self, shard, name: str):
        self._shard, self.name = shard, name
        self._slice = shard.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """As torch.Tensor.narrow, reading only those rows (or columns)."""
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._slice[index]

    def read(self) -> torch.Tensor:
        return self._shard.get_tensor(self.name)


def iter_safetensors(weight_files: Sequence[Path], device: str = "cpu", unread: bool = False
                     ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard, read lazily one at a
    time (safetensors; a .bin shard is memory-mapped with torch.load's
    weights_only, which unpickles tensors and nothing else). unread: yield
    safetensors entries as UnreadTensor, for the weight loaders to read
    only their rank's slice (pyvlm.models.weight_loading)."""
    num_shards = len(weight_files)
    for shard_index, path in enumerate(weight_files, start=1):
        logger.info("Loading weights shard %d/%d (%s)", shard_index, num_shards, Path(path).name)
        if Path(path).suffix == ".bin":
            yield from torch.load(str(path), map_location="cpu", weights_only=True,
                                  mmap=True).items()
            continue
        with safe_open(str(path), framework="pt", device=_safetensors_device(device)) as shard:
            for name in shard.keys():
                yield name, UnreadTensor(shard, name) if unread else shard.get_tensor(name)


def _safetensors_device(device: str) -> str:
    # safetensors wants an indexed CUDA device; reading straight onto the GPU
    # skips a host copy of each tensor.
    if device == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return device


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _model_class_for(architectures: Sequence[str]) -> Type[torch.nn.Module]:
    from pyvlm.models.registry import model_class_for

    return model_class_for(architectures)


def construct_model(model_class: Type[torch.nn.Module], hf_config, dtype: torch.dtype,
                    device: Union[str, torch.device]) -> torch.nn.Module:
    """model_class(hf_config) with its parameters created on `device` in `dtype`."""
    with _default_dtype(dtype), torch.device(device):
        return model_class(hf_config)


def load_model(files: CheckpointFiles, dtype: torch.dtype, device: Union[str, torch.device],
               model_class: Optional[Type[torch.nn.Module]] = None,
               load_format: str = "auto") -> torch.nn.Module:
    """The checkpoint's model in eval mode, weights loaded, on `device` in `dtype`.

    model_class: defaults to the registry's class for config.json's architectures.
    A checkpoint tensor the model has no parameter for, or a parameter no
    tensor filled, is a CheckpointError naming them (a silently random
    weight is worse than no server). load_format "dummy" reads no weights
    (dummy_weights_).

    Tensor parallel: called inside `building_with(group)`
    (pyvlm.layers.tensor_parallel), the model is built with this rank's
    slices, and each split parameter reads only its slice from the files;
    dummy weights are drawn in the local shapes. Last, every module's
    after_weights_loaded() hook runs (after_weights_loaded).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    hf_config = build_hf_config(files.config)
    set_config_dtype(hf_config, dtype)
    model_class = model_class or _model_class_for(files.architectures)
    model = construct_model(model_class, hf_config, dtype, device)
    if load_format == "dummy":
        dummy_weights_(model)
    else:
        try:
            # Under several ranks each reads its slices only; one rank reads
            # whole tensors (the same bytes, fewer calls).
            unread = current_group().size > 1
            model.load_weights(iter_safetensors(files.weight_files, str(torch.device(device)),
                                                unread))
        except WeightNamesError as error:
            raise CheckpointError(f"{files.root.name}: {error}") from None
    return after_weights_loaded(model).eval().requires_grad_(False)


def after_weights_loaded(model: torch.nn.Module) -> torch.nn.Module:
    """Calls after_weights_loaded() of every module that has one: weights
    derived from the loaded ones (constants folded into a matmul), made
    once instead of every step."""
    for module in model.modules():
        hook = getattr(module, "after_weights_loaded", None)
        if callable(hook):
            hook()
    return model


@torch.no_grad()
def dummy_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn from U(-1e-3, 1e-3), seeded (vLLM's dummy
    format): outputs stay finite at any depth and are the same every run on
    one device. Drawn where the parameters live, in their own dtype (a 7B
    model's 7e9 float32 draws on the CPU would take minutes)."""
    generators = {}
    for param in model.parameters():
        device = param.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        param.uniform_(-1e-3, 1e-3, generator=generators[device])
    return model
