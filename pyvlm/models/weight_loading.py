"""Copying checkpoint tensors into a model's existing parameters.

Checkpoint names are first mapped to the model's own names (the model
supplies the rename rules); q/k/v and gate/up matrices land in their rows of
the fused `MergedColumnParallelLinear` parameters. A parameter of a
parallel layer (a parallel linear layer, the vocab-parallel embedding or
LM head) is loaded through the layer's weight_loader, which copies its
tensor-parallel rank's slice; any other is copied whole. Every parameter must be
loaded exactly once and every checkpoint tensor must have a home: both
failures raise with the names, so a wrong checkpoint never serves silently.
"""

from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

import torch
from torch import nn

from pyvlm.layers.linear import MergedColumnParallelLinear, ParallelLinear
from pyvlm.layers.vocab_parallel import VocabParallelEmbedding

# Layers whose parameters hold their rank's slice of a checkpoint tensor,
# copied by the layer's weight_loader(param, tensor, shard_name).
PARALLEL_LAYERS = (ParallelLinear, VocabParallelEmbedding)
ParallelLayer = Union[ParallelLinear, VocabParallelEmbedding]

# Renames a checkpoint name to the model's name; None means "ignore it".
NameMapper = Callable[[str], Optional[str]]


def shard_homes(model: nn.Module) -> Dict[str, Tuple[MergedColumnParallelLinear, str]]:
    """Checkpoint module path of each shard ("layers.0.self_attn.q_proj") ->
    (its fused module, shard name)."""
    homes = {}
    for module_name, module in model.named_modules():
        if isinstance(module, MergedColumnParallelLinear):
            parent = module_name.rpartition(".")[0]
            for shard in module.shard_names:
                homes[f"{parent}.{shard}" if parent else shard] = (module, shard)
    return homes


def stacked_param_names(model: nn.Module) -> Set[str]:
    """Names of the fused parameters (loaded shard by shard, never whole)."""
    return {f"{module_name}.{kind}" for module_name, module in model.named_modules()
            if isinstance(module, MergedColumnParallelLinear) for kind, _ in module.named_parameters()}


def parallel_layers(model: nn.Module) -> Dict[str, ParallelLayer]:
    """Name of each parallel layer's parameter -> the layer."""
    return {f"{module_name}.{kind}" if module_name else kind: module
            for module_name, module in model.named_modules()
            if isinstance(module, PARALLEL_LAYERS)
            for kind, _ in module.named_parameters(recurse=False)}


def copy_into(param: torch.Tensor, loaded: torch.Tensor, layer: Optional[ParallelLayer] = None,
              shard_name: Optional[str] = None) -> None:
    """Copies loaded into param: this rank's slice through the weight_loader
    of the parallel layer holding it (shard_name: the fused matrix it is, for
    a merged layer), else whole; a wrong shape raises ValueError. loaded may
    be a tensor not read yet (pyvlm.models.loader.UnreadTensor: shape,
    narrow, read), of which the weight_loader reads only its slice."""
    with torch.no_grad():
        if layer is not None:
            layer.weight_loader(param, loaded, shard_name)
        elif param.shape != loaded.shape:
            raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(loaded.shape)}")
        else:
            param.copy_(loaded if isinstance(loaded, torch.Tensor) else loaded.read())


class WeightNamesError(ValueError):
    """Checkpoint tensors without a parameter, or parameters without a
    tensor; the message names them."""


def _named(kind: str, names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"{len(names)} {kind}: {shown}"


class WeightLoader:
    """Loads named tensors into a model, tracking what is still missing."""

    def __init__(self, model: nn.Module, rename: NameMapper):
        self.rename = rename
        self.params: Dict[str, torch.Tensor] = dict(model.named_parameters())
        self.shards = shard_homes(model)
        self.layers = parallel_layers(model)
        self.missing: Set[str] = set(self.params) - stacked_param_names(model)
        self.missing |= {f"{path}.{kind}" for path, (module, _) in self.shards.items()
                         for kind, _ in module.named_parameters()}
        self.unknown: List[str] = []

    def load(self, checkpoint_name: str, loaded: torch.Tensor) -> None:
        name = self.rename(checkpoint_name)
        if name is None:
            return
        module_path, _, param_name = name.rpartition(".")
        target, layer, shard_name = self.params.get(name), self.layers.get(name), None
        if target is None and module_path in self.shards:
            layer, shard_name = self.shards[module_path]
            target = dict(layer.named_parameters(recurse=False)).get(param_name)
        if target is None:
            self.unknown.append(checkpoint_name)
            return
        try:
            copy_into(target, loaded, layer, shard_name)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        self.missing.discard(name)

    def finish(self) -> None:
        """Raises if a checkpoint tensor had no home or a parameter got no tensor."""
        problems = []
        if self.unknown:
            problems.append(_named("unknown weights in the checkpoint", self.unknown))
        if self.missing:
            problems.append(_named("weights missing from the checkpoint", self.missing))
        if problems:
            raise WeightNamesError("; ".join(problems))


def load_weights(model: nn.Module, weights: Iterable[Tuple[str, torch.Tensor]],
                 rename: NameMapper, optional: Iterable[str] = ()) -> None:
    """Loads every (name, tensor) into model; names in optional may be absent
    (e.g. a tied lm_head)."""
    loader = WeightLoader(model, rename)
    loader.missing -= set(optional)
    for name, tensor in weights:
        loader.load(name, tensor)
    loader.finish()
