"""Copying checkpoint tensors into a model's existing parameters.

Checkpoint names are first mapped to the model's own names (the model
supplies the rename rules); q/k/v and gate/up matrices land in their rows of
the fused `StackedLinear` parameters. Every parameter must be loaded exactly
once and every checkpoint tensor must have a home: both failures raise with
the names, so a wrong checkpoint never serves silently.
"""

from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import nn

from pyvlm.layers.linear import StackedLinear

# Renames a checkpoint name to the model's name; None means "ignore it".
NameMapper = Callable[[str], Optional[str]]


def shard_homes(model: nn.Module) -> Dict[str, Tuple[StackedLinear, str]]:
    """Checkpoint module path of each shard ("layers.0.self_attn.q_proj") ->
    (its fused module, shard name)."""
    homes = {}
    for module_name, module in model.named_modules():
        if isinstance(module, StackedLinear):
            parent = module_name.rpartition(".")[0]
            for shard in module.shard_names:
                homes[f"{parent}.{shard}" if parent else shard] = (module, shard)
    return homes


def stacked_param_names(model: nn.Module) -> Set[str]:
    """Names of the fused parameters (loaded shard by shard, never whole)."""
    return {f"{module_name}.{kind}" for module_name, module in model.named_modules()
            if isinstance(module, StackedLinear) for kind, _ in module.named_parameters()}


def copy_into(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"{name}: expected shape {tuple(param.shape)}, "
                         f"got {tuple(loaded.shape)}")
    with torch.no_grad():
        param.copy_(loaded)


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
        self.missing: Set[str] = set(self.params) - stacked_param_names(model)
        self.missing |= {f"{path}.{kind}" for path, (module, _) in self.shards.items()
                         for kind, _ in module.named_parameters()}
        self.unknown: List[str] = []

    def load(self, checkpoint_name: str, loaded: torch.Tensor) -> None:
        name = self.rename(checkpoint_name)
        if name is None:
            return
        module_path, _, param_name = name.rpartition(".")
        if name in self.params:
            copy_into(self.params[name], loaded, name)
        elif module_path in self.shards:
            module, shard = self.shards[module_path]
            with torch.no_grad():
                module.load_shard(shard, param_name, loaded)
        else:
            self.unknown.append(checkpoint_name)
            return
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
