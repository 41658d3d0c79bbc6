"""Vision-tower preprocessing: Pillow-exact resize, crop, rescale + normalise.

The resize reproduces `PIL.Image.resize` byte for byte (NEAREST, BILINEAR,
BICUBIC; `reducing_gap=None`), so the outputs match transformers' image
processors with the PIL backend. The size rules (shortest edge, center crop,
Qwen2-VL's smart_resize) live in `pyvlm.multimodal.image_sizes`.
"""

from typing import Optional, Sequence

import torch

from ._library import ops

NEAREST, BILINEAR, BICUBIC = 0, 2, 3  # PIL.Image.Resampling values


def _flat_pairs(pairs: Sequence[Sequence[int]]) -> list:
    return [int(v) for pair in pairs for v in pair]


def images_to_device(images: Sequence[torch.Tensor], device: torch.device) -> list:
    """The images on `device`; CPU images bound for CUDA travel in one pinned copy.

    The uint8 images are packed into one pinned host buffer and copied with
    non_blocking=True (the caching host allocator keeps the buffer alive until
    the copy has run); the results are views of the one device buffer.
    """
    device = torch.device(device)
    if device.type != "cuda" or all(im.device == device for im in images):
        return [im.to(device) for im in images]
    flat = [im.contiguous().reshape(-1) for im in images]
    if any(im.device.type != "cpu" for im in flat):
        return [im.to(device) for im in images]
    total = sum(im.numel() for im in flat)
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    torch.cat(flat, out=pinned)
    packed = pinned.to(device, non_blocking=True)
    views, offset = [], 0
    for im in images:
        views.append(packed[offset:offset + im.numel()].view(im.shape))
        offset += im.numel()
    return views


def preprocess_images(
    images: Sequence[torch.Tensor],
    resize_hw: Sequence[Sequence[int]],
    crop_tl: Sequence[Sequence[int]],
    out_hw: Sequence[int],
    source_index: Optional[Sequence[int]] = None,
    resample: int = BICUBIC,
    rescale_factor: float = 1 / 255,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    fill: Sequence[int] = (0, 0, 0),
    out: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Resize, crop and normalise uint8 [h, w, 3] RGB images into [n, 3, H, W].

    Entry j resizes images[source_index[j]] (default: image j) to resize_hw[j]
    = (h, w) as PIL.Image.resize does, takes the out_hw window whose top-left is
    crop_tl[j] = (top, left) in the resized image (pixels outside the image
    take the uint8 value fill[c]) and writes (pixel * rescale_factor -
    mean[c]) / std[c], computed in float32 and rounded once to `dtype`.
    Entries sharing an (image, resize size) pair share one resize.
    rescale_factor=1, mean=0, std=1 yields the resized uint8 pixels exactly.
    """
    if source_index is None:
        source_index = range(len(images))
    source_index = [int(i) for i in source_index]
    if out is None:
        device = torch.device(device) if device is not None else (
            images[0].device if len(images) else torch.device("cpu"))
        out = torch.empty(len(source_index), 3, int(out_hw[0]), int(out_hw[1]), dtype=dtype,
                          device=device)
    images = images_to_device(images, out.device)
    ops.preprocess_images(out, images, source_index, _flat_pairs(resize_hw),
                          _flat_pairs(crop_tl), int(resample), float(rescale_factor),
                          [float(m) for m in mean], [float(s) for s in std],
                          [int(f) for f in fill])
    return out


def preprocess_images_patchify(
    images: Sequence[torch.Tensor],
    resize_hw: Sequence[Sequence[int]],
    resample: int = BICUBIC,
    rescale_factor: float = 1 / 255,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    out: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> tuple:
    """Qwen2-VL pixel rows: returns (pixel_values, grid_thw int64 [n, 3]).

    Image i is resized (Pillow-exact) to resize_hw[i] (multiples of
    patch_size * merge_size), normalised, repeated temporal_patch_size times
    and cut into (h/p)*(w/p) rows of 3 * temporal_patch_size * p * p values,
    in the order Qwen2VLImageProcessor produces (merge_size x merge_size
    blocks; each row ordered channel, frame, patch row, patch column).
    """
    grids = [(1, int(h) // patch_size, int(w) // patch_size) for h, w in resize_hw]
    if out is None:
        device = torch.device(device) if device is not None else (
            images[0].device if len(images) else torch.device("cpu"))
        rows = sum(g[1] * g[2] for g in grids)
        out = torch.empty(rows, 3 * temporal_patch_size * patch_size * patch_size, dtype=dtype,
                          device=device)
    images = images_to_device(images, out.device)
    ops.preprocess_images_patchify(out, images, _flat_pairs(resize_hw), int(resample),
                                   float(rescale_factor), [float(m) for m in mean],
                                   [float(s) for s in std], int(patch_size),
                                   int(temporal_patch_size), int(merge_size))
    grid_thw = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
    return out, grid_thw


@torch.library.register_fake("pyvlm::preprocess_images")
def _preprocess_images_fake(out, images, source_index, resize_hw, crop_tl, resample,
                            rescale_factor, mean, std, fill):
    return None


@torch.library.register_fake("pyvlm::preprocess_images_patchify")
def _preprocess_images_patchify_fake(out, images, resize_hw, resample, rescale_factor, mean, std,
                                     patch_size, temporal_patch_size, merge_size):
    return None
