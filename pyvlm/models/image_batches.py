"""What every family's pixel preparation shares: RGB images as uint8
tensors, and one preprocessing op call per group of plans that can share
one (same normalisation and geometry), results back in the images' order."""

from typing import Callable, Hashable, List, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch
from PIL import Image

Plan = TypeVar("Plan")


def image_to_tensor(image: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
    """uint8 [h, w, 3] copy of an RGB PIL image's pixels; a uint8 [h, w, 3]
    tensor (pixels decoded earlier, pyvlm/runner/deferred_images.py) as it is."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3:
            raise ValueError(f"expected uint8 [h, w, 3] pixels, got {image.dtype} "
                             f"{tuple(image.shape)}")
        return image
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    return torch.from_numpy(np.asarray(image).copy())


def image_hw(image: Union[Image.Image, torch.Tensor]) -> Tuple[int, int]:
    """(height, width) of a PIL image or of uint8 [h, w, 3] pixels."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[0]), int(image.shape[1])
    return image.height, image.width


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
