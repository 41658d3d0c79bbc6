"""Images preprocessed on the model's device, in the step that encodes them.

On a GPU the front (the server process) only decodes an image and sends
its uint8 pixels; the family's prepare_images (resize, crop, normalise,
patchify) then runs on the device where the tower reads it. That takes the
heaviest per-image host work off the front's threads, sends 1 byte per
pixel and channel instead of the tower's (tiled, up to 4x larger) input
in the model dtype, and runs a kernel that takes well under a millisecond
where the host took milliseconds (benchmarks/RESULTS.md, preprocess rows).
The pixels are bit-identical either way (the CUDA preprocessing ops equal
the CPU's: tests/ops/test_preprocess.py).

A prompt's images are prepared together, as on the host, because a family
may prepare one image differently depending on the others of its prompt;
every item of a prompt refers to the same PromptImages.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from pyvlm.models.image_batches import image_to_tensor
from pyvlm.scheduling.types import MultimodalItem

# (images, plans, device) -> one prepared payload per image: a family's
# prepare_images.
PrepareFn = Callable[[Sequence[Any], Sequence[Any], torch.device], List[Any]]


@dataclass(frozen=True)
class PromptImages:
    """The decoded images of one prompt (uint8 [h, w, 3] CPU tensors) and
    their plans, not yet preprocessed."""

    pixels: Tuple[torch.Tensor, ...]
    plans: Tuple[Any, ...]


@dataclass(frozen=True)
class DeferredImage:
    """MultimodalItem.prepared of an image preprocessed in the step: image
    `index` of its prompt's PromptImages."""

    prompt: PromptImages
    index: int

    @property
    def num_bytes(self) -> int:
        pixels = self.prompt.pixels[self.index]
        return pixels.numel() * pixels.element_size()


def defer_images(images: Sequence[Any], plans: Sequence[Any]) -> List[DeferredImage]:
    """The front's prepare step for a device-side engine: the images' pixels
    as uint8 tensors, one DeferredImage per image."""
    if len(images) != len(plans):
        raise ValueError(f"{len(images)} images but {len(plans)} plans")
    prompt = PromptImages(tuple(image_to_tensor(image) for image in images), tuple(plans))
    return [DeferredImage(prompt, index) for index in range(len(images))]


def prepare_deferred(items: Sequence[MultimodalItem], prepare: PrepareFn,
                     device: torch.device) -> List[MultimodalItem]:
    """items with every DeferredImage payload replaced by what prepare makes
    of it on device (one call per prompt); other items are returned as
    they are."""
    prepared: Dict[int, List[Any]] = {}
    out = []
    for item in items:
        payload = item.prepared
        if not isinstance(payload, DeferredImage):
            out.append(item)
            continue
        key = id(payload.prompt)
        if key not in prepared:
            prepared[key] = prepare(list(payload.prompt.pixels), list(payload.prompt.plans),
                                    device)
        out.append(dataclasses.replace(item, prepared=prepared[key][payload.index]))
    return out
