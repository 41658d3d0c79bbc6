import random

import numpy as np
import PIL.Image
import pytest
import torch

from pyvlm import ops
from pyvlm.multimodal import image_sizes
from pyvlm.ops import reference

from .conftest import assert_close, poisoned

IMAGES_DIR = "/work/shared/data/images"
PHOTOS = ["cat.jpeg", "dog.jpeg", "example_image.png", "logo.png"]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
ODD_SIZES = [(1, 1), (1, 2000), (2000, 1), (3, 7), (37, 501), (223, 225), (480, 640)]


def photo(name: str) -> PIL.Image.Image:
    # logo.png is RGBA; example_image.png is really a JPEG: PIL reads both.
    return PIL.Image.open(f"{IMAGES_DIR}/{name}").convert("RGB")


def random_image(h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8)


def resized_u8(images, sizes, resample, device="cpu"):
    """Our resize of images[j] to sizes[j] as uint8 [h, w, 3] arrays (one op call per size)."""
    out = []
    for im, (h, w) in zip(images, sizes):
        pix = ops.preprocess_images([im.to(device)], [(h, w)], [(0, 0)], (h, w), resample=resample,
                                    rescale_factor=1.0)
        out.append(pix[0].permute(1, 2, 0).cpu())
    return out


def pil_resize(im: torch.Tensor, h: int, w: int, resample: int) -> np.ndarray:
    return np.asarray(PIL.Image.fromarray(im.numpy()).resize((w, h), resample=resample))


def assert_bit_exact(ours: torch.Tensor, pil: np.ndarray):
    # rescale 1, mean 0, std 1: the float outputs are the uint8 values exactly.
    assert torch.equal(ours, ours.round()), "non-integer pixel values"
    diff = (ours.to(torch.int64) - torch.from_numpy(pil.astype(np.int64))).abs()
    assert diff.max().item() == 0, f"{(diff > 0).sum().item()} pixels differ, max {diff.max().item()}"


@pytest.mark.parametrize("resample", [0, 2, 3])
def test_resize_bit_exact_vs_pil_random_sizes(resample):
    cases = [((ih, iw), (oh, ow)) for (ih, iw) in [(1, 1), (1, 9), (9, 1)] for (oh, ow) in [(1, 1), (5, 3)]]
    cases += [((random.randint(1, 90), random.randint(1, 90)), (random.randint(1, 120), random.randint(1, 120)))
              for _ in range(40)]
    cases += [((1, 2000), (1, 224)), ((2000, 1), (300, 1)), ((1, 2000), (7, 3001)), ((50, 60), (50, 60))]
    images = [random_image(*i) for i, _ in cases]
    ours = resized_u8(images, [o for _, o in cases], resample)
    for im, (_, (oh, ow)), got in zip(images, cases, ours):
        assert_bit_exact(got, pil_resize(im, oh, ow, resample))


@pytest.mark.parametrize("name", PHOTOS)
def test_resize_bit_exact_vs_pil_photos(name):
    im = torch.from_numpy(np.asarray(photo(name)).copy())
    h, w = im.shape[:2]
    # Down (both axes, height much more: vertical pass first), up, and mixed.
    sizes = [(224, 298), (31, w - 5), (2 * h + 3, w + 1), (h // 3, 2 * w)]
    for resample in (2, 3):
        for (oh, ow), got in zip(sizes, resized_u8([im] * len(sizes), sizes, resample)):
            assert_bit_exact(got, pil_resize(im, oh, ow, resample))


def test_resize_bit_exact_vs_pil_4000x3000():
    im = torch.from_numpy(np.asarray(photo("dog.jpeg").resize((4000, 3000))).copy())
    for (oh, ow), resample in [((224, 298), 3), ((1001, 777), 2)]:
        assert_bit_exact(resized_u8([im], [(oh, ow)], resample)[0], pil_resize(im, oh, ow, resample))


def random_entries(num_images: int, num_entries: int, out_hw):
    """Entries with shared (image, size) pairs and windows reaching outside
    the image: always at least one of each (entries 0 and 1 share a pair,
    entry 0's window starts above and left of its image)."""
    source = [random.randrange(num_images) for _ in range(num_entries)]
    source[1] = source[0]
    sizes = [(random.randint(1, 40), random.randint(1, 40)) for _ in range(num_images)]
    resize_hw = [sizes[s] if random.random() < 0.5 else (random.randint(1, 40), random.randint(1, 40))
                 for s in source]
    resize_hw[0] = resize_hw[1] = sizes[source[0]]
    crop_tl = [(random.randint(-out_hw[0], h), random.randint(-out_hw[1], w)) for h, w in resize_hw]
    crop_tl[0] = (random.randint(-out_hw[0], -1), random.randint(-out_hw[1], -1))
    return source, resize_hw, crop_tl


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("resample", [0, 2, 3])
def test_preprocess_images_matches_reference(device, dtype, resample):
    images = [random_image(random.randint(1, 50), random.randint(1, 50)) for _ in range(4)]
    out_hw = (random.randint(1, 30), random.randint(1, 30))
    source, resize_hw, crop_tl = random_entries(len(images), 9, out_hw)
    kwargs = dict(source_index=source, resample=resample, rescale_factor=1 / 255,
                  mean=CLIP_MEAN, std=CLIP_STD, fill=(random.randint(0, 255), 0, 255))
    out = poisoned(len(source), 3, *out_hw, dtype=dtype, device=device)
    ops.preprocess_images([im.to(device) for im in images], resize_hw, crop_tl, out_hw, out=out,
                          **kwargs)
    ref = reference.preprocess_images(images, resize_hw, crop_tl, out_hw, **kwargs)
    assert_close(out, ref, dtype)
    if dtype == torch.float32:
        assert (out.cpu().double() - ref).abs().max().item() < 1e-6


def test_shared_resize_tiles_equal_separate_calls():
    # LLaVA anyres: tiles of one resized image, the last ones padded.
    im = random_image(97, 131)
    tiles = [(t, l) for t in (0, 48) for l in (0, 48, 96)]
    together = ops.preprocess_images([im], [(90, 120)] * len(tiles), tiles, (48, 48),
                                     source_index=[0] * len(tiles), fill=(9, 8, 7))
    for j, tl in enumerate(tiles):
        alone = ops.preprocess_images([im], [(90, 120)], [tl], (48, 48), fill=(9, 8, 7))
        assert torch.equal(together[j], alone[0])


@pytest.mark.parametrize("resample", [2, 3])
def test_patchify_matches_reference(device, resample):
    images = [random_image(random.randint(1, 80), random.randint(1, 80)) for _ in range(3)]
    p, tp, m = random.choice([(14, 2, 2), (4, 1, 2), (3, 3, 1)])
    resize_hw = [(p * m * random.randint(1, 4), p * m * random.randint(1, 4)) for _ in images]
    kwargs = dict(resample=resample, mean=CLIP_MEAN, std=CLIP_STD, patch_size=p,
                  temporal_patch_size=tp, merge_size=m)
    rows = sum(h * w // (p * p) for h, w in resize_hw)
    out = poisoned(rows, 3 * tp * p * p, dtype=torch.float32, device=device)
    _, grid = ops.preprocess_images_patchify([im.to(device) for im in images], resize_hw, out=out,
                                             **kwargs)
    ref, ref_grid = reference.preprocess_images_patchify(images, resize_hw, **kwargs)
    assert torch.equal(grid, ref_grid)
    assert (out.cpu().double() - ref).abs().max().item() < 1e-6


def hf_inputs(sizes):
    """The real photos plus generated images of odd sizes (PIL RGB)."""
    ims = [photo(n) for n in PHOTOS]
    return ims + [PIL.Image.fromarray(random_image(h, w).numpy()) for h, w in sizes]


def as_tensor(im: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im).copy())


def assert_matches_hf(ours: torch.Tensor, hf: np.ndarray):
    assert tuple(ours.shape) == hf.shape
    assert (ours - torch.from_numpy(hf)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shortest_edge,crop", [(224, (224, 224)), (200, (230, 211))])
def test_clip_pipeline_matches_transformers(shortest_edge, crop):
    from transformers import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(size={"shortest_edge": shortest_edge},
                               crop_size={"height": crop[0], "width": crop[1]})
    ims = hf_inputs([(1, 1), (3, 7), (37, 501), (223, 225), (150, 2)])
    plans = [image_sizes.clip_resize_and_crop(im.height, im.width, shortest_edge, crop) for im in ims]
    ours = ops.preprocess_images([as_tensor(im) for im in ims], [p[0] for p in plans],
                                 [p[1] for p in plans], crop, resample=hf.resample,
                                 rescale_factor=hf.rescale_factor, mean=hf.image_mean,
                                 std=hf.image_std)
    assert_matches_hf(ours, hf(images=ims, return_tensors="np")["pixel_values"])


def test_siglip_pipeline_matches_transformers():
    from transformers import SiglipImageProcessorPil

    hf = SiglipImageProcessorPil(size={"height": 384, "width": 384})
    ims = hf_inputs([(1, 2000), (3, 7), (383, 385)])
    sizes = [image_sizes.fixed_size(im.height, im.width, 384, 384) for im in ims]
    ours = ops.preprocess_images([as_tensor(im) for im in ims], sizes, [(0, 0)] * len(ims),
                                 (384, 384), resample=hf.resample, rescale_factor=hf.rescale_factor,
                                 mean=hf.image_mean, std=hf.image_std)
    assert_matches_hf(ours, hf(images=ims, return_tensors="np")["pixel_values"])


def test_qwen2_vl_patchify_matches_transformers():
    from transformers import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil()
    ims = hf_inputs([(1, 150), (3, 7), (37, 501), (480, 640)])
    factor = hf.patch_size * hf.merge_size
    sizes = [image_sizes.smart_resize(im.height, im.width, factor, hf.size["shortest_edge"],
                                      hf.size["longest_edge"]) for im in ims]
    ours, grid = ops.preprocess_images_patchify(
        [as_tensor(im) for im in ims], sizes, resample=hf.resample,
        rescale_factor=hf.rescale_factor, mean=hf.image_mean, std=hf.image_std,
        patch_size=hf.patch_size, temporal_patch_size=hf.temporal_patch_size,
        merge_size=hf.merge_size)
    expected = hf(images=ims, return_tensors="np")
    assert torch.equal(grid, torch.from_numpy(expected["image_grid_thw"]))
    assert_matches_hf(ours, expected["pixel_values"])


def test_opcheck(device):
    images = [random_image(13, 17).to(device), random_image(5, 3).to(device)]
    out = torch.empty(3, 3, 8, 6, device=device)
    args = (out, images, [0, 1, 0], [10, 12, 4, 4, 10, 12], [0, 1, -2, -1, 3, 9], 3, 1 / 255,
            [0.5, 0.4, 0.3], [0.2, 0.3, 0.4], [0, 127, 255])
    torch.library.opcheck(torch.ops.pyvlm.preprocess_images.default, args)
    rows = torch.empty(2 * 4 + 2 * 2, 3 * 2 * 2 * 2, device=device)
    args = (rows, images, [4, 8, 4, 4], 2, 1 / 255, [0.5, 0.4, 0.3], [0.2, 0.3, 0.4], 2, 2, 2)
    torch.library.opcheck(torch.ops.pyvlm.preprocess_images_patchify.default, args)


def call_raw(out=None, images=None, source=(0,), resize=(4, 4), crop=(0, 0), resample=3,
             mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), fill=(0, 0, 0)):
    images = [random_image(5, 5)] if images is None else images
    out = torch.empty(len(source), 3, 4, 4) if out is None else out
    torch.ops.pyvlm.preprocess_images(out, images, list(source), list(resize), list(crop),
                                      resample, 1 / 255, list(mean), list(std), list(fill))


def test_bad_inputs_raise_naming_argument():
    with pytest.raises(ValueError, match=r"images\[0\] must have dtype uint8"):
        call_raw(images=[torch.zeros(5, 5, 3)])
    with pytest.raises(ValueError, match=r"images\[0\] must have shape \[h, w, 3\]"):
        call_raw(images=[torch.zeros(5, 5, 4, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"images\[0\] must have sides in"):
        call_raw(images=[torch.zeros(0, 5, 3, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"images\[0\] must be contiguous"):
        call_raw(images=[random_image(5, 6).transpose(0, 1)])
    with pytest.raises(IndexError, match="source_index values must be in"):
        call_raw(source=(1,))
    with pytest.raises(ValueError, match="resample must be 0 .NEAREST., 2"):
        call_raw(resample=1)
    with pytest.raises(ValueError, match="resize_hw values must be in"):
        call_raw(resize=(0, 4))
    with pytest.raises(ValueError, match="resize_hw must hold 2 values"):
        call_raw(resize=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="crop_tl must hold"):
        call_raw(crop=(0,))
    with pytest.raises(ValueError, match="fill values must be in"):
        call_raw(fill=(0, 256, 0))
    with pytest.raises(ValueError, match="mean must hold 3 values"):
        call_raw(mean=(0.0,))
    with pytest.raises(ValueError, match="out must be float32"):
        call_raw(out=torch.empty(1, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="out must have shape"):
        call_raw(out=torch.empty(1, 4, 4, 4))
    with pytest.raises(ValueError, match="out must be contiguous"):
        call_raw(out=torch.empty(1, 3, 8, 4)[:, :, ::2])
    with pytest.raises(ValueError, match="source_index must hold"):
        call_raw(out=torch.empty(1, 3, 4, 4), source=(0, 0))


def test_patchify_bad_inputs_raise_naming_argument():
    im = random_image(9, 9)
    with pytest.raises(ValueError, match="resize_hw values must be multiples of patch_size"):
        ops.preprocess_images_patchify([im], [(28, 30)])
    with pytest.raises(ValueError, match="out must have shape"):
        ops.preprocess_images_patchify([im], [(28, 28)], out=torch.empty(3, 1176))
    with pytest.raises(ValueError, match="patch_size must be in"):
        torch.ops.pyvlm.preprocess_images_patchify(torch.empty(0, 0), [im], [28, 28], 3, 1.0,
                                                   [0.0] * 3, [1.0] * 3, 0, 2, 2)
    with pytest.raises(ValueError, match="resample must be"):
        ops.preprocess_images_patchify([im], [(28, 28)], resample=5)


@pytest.mark.cuda
@pytest.mark.parametrize("resample", [0, 2, 3])
def test_cuda_resize_bit_exact_with_cpu(resample):
    sizes = [(1, 1), (1, 2000), (2000, 1), (480, 640), (667, 1000)]
    images = [random_image(*s) for s in sizes]
    targets = [(224, 298), (7, 301), (300, 2), (1001, 13), (224, 224)]
    for im, (h, w) in zip(images, targets):
        cpu = resized_u8([im], [(h, w)], resample)[0]
        gpu = resized_u8([im], [(h, w)], resample, device="cuda")[0]
        assert torch.equal(cpu, gpu)
        assert_bit_exact(gpu, pil_resize(im, h, w, resample))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_preprocess_matches_cpu(dtype):
    images = [random_image(random.randint(1, 700), random.randint(1, 700)) for _ in range(6)]
    out_hw = (64, 48)
    source, resize_hw, crop_tl = random_entries(len(images), 20, out_hw)
    kwargs = dict(source_index=source, mean=CLIP_MEAN, std=CLIP_STD, fill=(1, 2, 3), dtype=dtype)
    cpu = ops.preprocess_images(images, resize_hw, crop_tl, out_hw, **kwargs)
    # CPU images: the wrapper uploads them in one pinned copy.
    gpu = ops.preprocess_images(images, resize_hw, crop_tl, out_hw, device="cuda", **kwargs)
    gpu2 = ops.preprocess_images([im.cuda() for im in images], resize_hw, crop_tl, out_hw, **kwargs)
    assert torch.equal(gpu.cpu(), gpu2.cpu())
    assert (gpu.cpu().float() - cpu.float()).abs().max().item() <= (1e-6 if dtype == torch.float32 else 0)


@pytest.mark.cuda
def test_cuda_patchify_matches_cpu():
    images = [random_image(random.randint(1, 900), random.randint(1, 900)) for _ in range(5)]
    sizes = [image_sizes.smart_resize(im.shape[0], im.shape[1], 28, 56 * 56, 28 * 28 * 1280)
             for im in images]
    kwargs = dict(mean=CLIP_MEAN, std=CLIP_STD)
    cpu, grid = ops.preprocess_images_patchify(images, sizes, **kwargs)
    gpu, grid_gpu = ops.preprocess_images_patchify(images, sizes, device="cuda", **kwargs)
    assert torch.equal(grid, grid_gpu)
    assert (gpu.cpu() - cpu).abs().max().item() <= 1e-6
