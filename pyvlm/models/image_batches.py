"""What every family's pixel preparation shares: RGB images as uint8
tensors, and one preprocessing op call per group of plans that can share
one (same normalisation and geometry), results back in the images' order."""

from typing import Callable, Hashable, List, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

Plan = TypeVar("Plan")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 [h, w, 3] copy of an RGB PIL image's pixels."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    return torch.from_numpy(np.asarray(image).copy())


def run_grouped(sources: Sequence[torch.Tensor], plans: Sequence[Plan],
                key: Callable[[Plan], Hashable],
                run_group: Callable[[list, list], List[torch.Tensor]]) -> List[torch.Tensor]:
    """run_group(sources, plans) once per distinct key(plan), in first-seen
    order; returns one output per source, in the sources' order."""
    if len(sources) != len(plans):
        raise ValueError(f"{len(sources)} images but {len(plans)} plans")
    outputs: List[torch.Tensor] = [None] * len(plans)
    for group in dict.fromkeys(key(plan) for plan in plans):
        indices = [i for i, plan in enumerate(plans) if key(plan) == group]
        results = run_group([sources[i] for i in indices], [plans[i] for i in indices])
        for i, result in zip(indices, results):
            outputs[i] = result
    return outputs
