"""Vision preprocessing of 16 640x480 photos vs transformers' PIL-backend processors.

CLIP (shortest edge 224, center crop 224) and Qwen2-VL (smart_resize +
patchify). On CUDA, ours is timed with the host-to-device upload of the
uint8 images (one pinned copy, done by the wrapper) and without it (images
already on the GPU); the baseline is always the HF processor on the host CPU,
which is what a server would otherwise run.
"""

import numpy as np
import PIL.Image
import torch

from pyvlm import ops
from pyvlm.multimodal import image_sizes

from .harness import Row, time_us

NUM_IMAGES, HEIGHT, WIDTH = 16, 480, 640


def _images():
    arrays = [np.random.randint(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(NUM_IMAGES)]
    return [PIL.Image.fromarray(a) for a in arrays], [torch.from_numpy(a) for a in arrays]


def _clip_case(pils, tensors, device):
    from transformers import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil()
    plans = [image_sizes.clip_resize_and_crop(HEIGHT, WIDTH) for _ in tensors]
    kw = dict(resample=hf.resample, rescale_factor=hf.rescale_factor, mean=hf.image_mean,
              std=hf.image_std, device=device)
    ours = lambda ims: ops.preprocess_images(ims, [p[0] for p in plans], [p[1] for p in plans],
                                            (224, 224), **kw)
    baseline = lambda: hf(images=pils, return_tensors="np")
    return "preprocess_images", "CLIP 224 crop", ours, baseline, NUM_IMAGES * 3 * 224 * 224 * 4


def _qwen_case(pils, tensors, device):
    from transformers import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil()
    size = image_sizes.smart_resize(HEIGHT, WIDTH, hf.patch_size * hf.merge_size,
                                    hf.size["shortest_edge"], hf.size["longest_edge"])
    kw = dict(resample=hf.resample, rescale_factor=hf.rescale_factor, mean=hf.image_mean,
              std=hf.image_std, device=device)
    ours = lambda ims: ops.preprocess_images_patchify(ims, [size] * len(ims), **kw)
    baseline = lambda: hf(images=pils, return_tensors="np")
    out_bytes = NUM_IMAGES * size[0] * size[1] * 3 * hf.temporal_patch_size * 4
    return "preprocess_images_patchify", f"Qwen2-VL {size[0]}x{size[1]}", ours, baseline, out_bytes


def run(device: str):
    rows = []
    pils, tensors = _images()
    in_bytes = NUM_IMAGES * HEIGHT * WIDTH * 3
    cuda = device.startswith("cuda")
    for make in (_clip_case, _qwen_case):
        op, case, ours, baseline, out_bytes = make(pils, tensors, device)
        base_us = time_us(baseline, "cpu", warmup=1, repeat=5)
        label = f"16x{HEIGHT}x{WIDTH} {case}"
        name = "HF PIL processor (host CPU)"
        if not cuda:
            rows.append(Row(op, label, device, time_us(lambda: ours(tensors), "cpu", warmup=1, repeat=5),
                            name, base_us, in_bytes + out_bytes))
            continue
        on_gpu = [t.to(device) for t in tensors]
        with_upload = time_us(lambda: ours(tensors), device)
        resident = time_us(lambda: ours(on_gpu), device)
        rows.append(Row(op, label + " +H2D upload", device, with_upload, name, base_us))
        rows.append(Row(op, label + " images on GPU", device, resident, name, base_us,
                        in_bytes + out_bytes))
    return rows
