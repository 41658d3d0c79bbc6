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

The pixels are written once, straight into shared memory, where the engine
process reads them (entrypoints/core_messages.py then has nothing left to
move): 0.8-1.0 ms for a 644x476 image on a 2-core VM, where a private copy
moved there by Tensor.share_memory_() took 1.2-8 ms (torch's parallel copy,
8 when its second thread is slow to wake; benchmarks/bench_front_stages.py).
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.multiprocessing import get_sharing_strategy

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
    """The front's prepare step for a device-side engine: the RGB images'
    pixels as uint8 tensors in shared memory, one DeferredImage per image."""
    if len(images) != len(plans):
        raise ValueError(f"{len(images)} images but {len(plans)} plans")
    prompt = PromptImages(tuple(shared_pixels(image) for image in images), tuple(plans))
    return [DeferredImage(prompt, index) for index in range(len(images))]


def shared_pixels(image: Image.Image) -> torch.Tensor:
    """uint8 [h, w, 3] copy of an RGB image's pixels in shared memory
    (torch's sharing strategy), written once."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    pixels = image.tobytes()  # packed RGB
    # _new_shared is how torch.multiprocessing allocates shared storage;
    # Tensor.share_memory_() would allocate it and copy a second time. Both
    # it and _share_fd_cpu_ are private: a torch without them takes the
    # public (slower) route.
    if not hasattr(torch.UntypedStorage, "_new_shared"):
        shape = (image.height, image.width, 3)
        return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(shape).share_memory_()
    storage = torch.UntypedStorage._new_shared(len(pixels))
    tensor = torch.empty(0, dtype=torch.uint8).set_(storage).view(image.height, image.width, 3)
    if get_sharing_strategy() == "file_descriptor":
        _write_through_file(storage, pixels)
    else:
        np.copyto(tensor.numpy(), np.frombuffer(pixels, np.uint8).reshape(tensor.shape))
    return tensor


def _write_through_file(storage: torch.UntypedStorage, data: bytes) -> None:
    """data at the start of storage (shared under the file_descriptor
    strategy), written through its file: the kernel copies into the shared
    pages, where a copy through this process's mapping would first fault
    each page in (half of the ~1 ms for 920 KB on a 2-core VM)."""
    fd, _ = storage._share_fd_cpu_()  # its own descriptor, as torch's reductions get it
    view, offset = memoryview(data), 0
    while offset < len(data):
        offset += os.pwrite(fd, view[offset:], offset)


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
