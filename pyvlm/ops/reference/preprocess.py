"""Pure-torch references for the preprocessing ops (Pillow's resampler in int64)."""

import torch

_BITS = 22  # Pillow's PRECISION_BITS

def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0

def _bicubic(x: float) -> float:
    a, x = -0.5, abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0

def _fixed(w: float) -> int:
    return int(-0.5 + w * (1 << _BITS)) if w < 0 else int(0.5 + w * (1 << _BITS))

def _axis_matrix(in_size: int, out_size: int, resample: int) -> torch.Tensor:
    """int64 [out_size, in_size] fixed-point weights of one Pillow pass."""
    m = torch.zeros(out_size, in_size, dtype=torch.int64)
    scale = in_size / out_size
    if resample == 0:  # ImagingScaleAffine: the position accumulates the step
        pos = scale * 0.5
        for o in range(out_size):
            src = -1 if pos < 0 else int(pos)
            if 0 <= src < in_size:
                m[o, src] = 1 << _BITS
            pos += scale
        return m
    filterscale = max(scale, 1.0)
    support = (2.0 if resample == 3 else 1.0) * filterscale
    kernel = _bicubic if resample == 3 else _bilinear
    inv = 1.0 / filterscale
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo, hi = max(0, int(center - support + 0.5)), min(in_size, int(center + support + 0.5))
        w = [kernel((x - center + 0.5) * inv) for x in range(lo, hi)]
        total = 0.0
        for wx in w:  # left to right as Pillow (sum() compensates since 3.12)
            total += wx
        for x, wx in zip(range(lo, hi), w):
            m[o, x] = _fixed(wx / total if total != 0.0 else wx)
    return m

def _pass(image: torch.Tensor, m: torch.Tensor, dim: int) -> torch.Tensor:
    """One 8-bit pass along dim (0 rows, 1 columns) of an int64 [h, w, 3] image."""
    acc = torch.tensordot(m, image, dims=([1], [dim]))  # [out, other, 3]
    acc = acc if dim == 0 else acc.transpose(0, 1)
    return torch.clamp((acc + (1 << (_BITS - 1))) >> _BITS, 0, 255)

def pillow_resize(image: torch.Tensor, height: int, width: int, resample: int = 3) -> torch.Tensor:
    """uint8 [h, w, 3] resized exactly as PIL.Image.resize((width, height), resample)."""
    in_h, in_w = image.shape[:2]
    x = image.to(torch.int64)
    if (in_h, in_w) == (height, width):
        return image.clone()
    vertical_first = (in_h - height) > 0 and (in_h - height) > (in_w - width) * 2
    passes = [(0, in_h, height), (1, in_w, width)]
    for dim, n_in, n_out in (passes if vertical_first else passes[::-1]):
        if n_in != n_out:
            x = _pass(x, _axis_matrix(n_in, n_out, resample), dim)
    return x.to(torch.uint8)

def _window(image: torch.Tensor, top: int, left: int, height: int, width: int, fill) -> torch.Tensor:
    out = torch.tensor(fill, dtype=torch.uint8).expand(height, width, 3).clone()
    h, w = image.shape[:2]
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + height, h), min(left + width, w)
    if t0 < t1 and l0 < l1:
        out[t0 - top:t1 - top, l0 - left:l1 - left] = image[t0:t1, l0:l1]
    return out

def _normalize(pixels: torch.Tensor, rescale_factor, mean, std) -> torch.Tensor:
    """float64 (pixel * rescale_factor - mean[c]) / std[c] of a uint8 [..., 3] tensor."""
    x = pixels.to(torch.float64) * rescale_factor
    return (x - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)

def preprocess_images(images, resize_hw, crop_tl, out_hw, source_index=None, resample=3,
                      rescale_factor=1 / 255, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                      fill=(0, 0, 0)) -> torch.Tensor:
    """float64 [n, 3, H, W]: resize (Pillow-exact), window with fill, normalise."""
    source_index = range(len(images)) if source_index is None else source_index
    outs = []
    for j, s in enumerate(source_index):
        resized = pillow_resize(images[s].cpu(), *resize_hw[j], resample)
        window = _window(resized, *crop_tl[j], *out_hw, fill)
        outs.append(_normalize(window, rescale_factor, mean, std).permute(2, 0, 1))
    return torch.stack(outs) if outs else torch.empty(0, 3, *out_hw, dtype=torch.float64)

def preprocess_images_patchify(images, resize_hw, resample=3, rescale_factor=1 / 255,
                               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), patch_size=14,
                               temporal_patch_size=2, merge_size=2):
    """(float64 pixel rows, grid_thw) in Qwen2VLImageProcessor's layout."""
    rows, grids = [], []
    p, tp, m = patch_size, temporal_patch_size, merge_size
    for image, (h, w) in zip(images, resize_hw):
        x = _normalize(pillow_resize(image.cpu(), h, w, resample), rescale_factor, mean, std)
        x = x.permute(2, 0, 1).reshape(3, h // p // m, m, p, w // p // m, m, p)
        x = x.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5).expand(-1, -1, -1, -1, -1, tp, -1, -1)
        rows.append(x.reshape(-1, 3 * tp * p * p))
        grids.append([1, h // p, w // p])
    return torch.cat(rows), torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
