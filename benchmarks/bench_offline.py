"""Offline engine throughput: N requests with one image each and a fixed
output length through pyvlm.Engine, against transformers generate on the
same machine, same model and same prompts, in the same run.

  python benchmarks/bench_offline.py --device cpu                 # demo model
  python benchmarks/bench_offline.py --device cuda --model llava-onevision-7b-random

The baseline runs transformers generate one request at a time (batch 1, as
its LLaVA-OneVision generate is used); the table also reports how many
generated tokens agree with it (greedy), as a parity check: with random
weights in bfloat16 the top logits are nearly tied, so the two kernels'
rounding flips some greedy choices and the sequences then diverge; the
token-exact checks are the float32 tests (tests/entrypoints).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hf_reference import greedy_tokens, image_processor_for  # noqa: E402

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"


def bench_images(n: int, seed: int = 0, folder: Path = IMAGES) -> List[Image.Image]:
    """n distinct RGB images (random crops of the photos in folder, else noise)."""
    gen = torch.Generator().manual_seed(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*"))[:4]
              if p.suffix.lower() in (".jpg", ".jpeg", ".png")] if folder.exists() else []
    images = []
    for i in range(n):
        if photos:
            photo = photos[i % len(photos)]
            w, h = photo.size
            left, top = (int(torch.randint(0, max(1, w // 4), (1,), generator=gen)),
                         int(torch.randint(0, max(1, h // 4), (1,), generator=gen)))
            images.append(photo.crop((left, top, left + w * 3 // 4, top + h * 3 // 4)))
        else:
            pixels = torch.randint(0, 256, (480, 640, 3), generator=gen, dtype=torch.uint8)
            images.append(Image.fromarray(pixels.numpy()))
    return images


def load_models(args):
    """(checkpoint dir, transformers model, pyvlm model or None = load from dir)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    dtype = getattr(torch, args.dtype)
    if args.model == "llava-onevision-7b-random":
        from benchmarks.offline.random_models import (llava_onevision_7b_config, pyvlm_model_from,
                                                      random_hf_model, write_checkpoint_metadata)

        folder = Path(tempfile.mkdtemp(prefix="pyvlm-ov7b-"))
        config = llava_onevision_7b_config()
        write_checkpoint_metadata(folder, config)
        hf = random_hf_model(config, args.device, dtype)
        return folder, hf, pyvlm_model_from(hf, args.device, dtype)
    if args.model == "demo":
        from pyvlm.conversions.demo import demo_checkpoint_dir

        folder = demo_checkpoint_dir()
    else:
        folder = Path(args.model)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    return folder, hf.to(args.device).eval(), None


def run_pyvlm(engine, requests, output_len: int):
    params = {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    results = engine.generate([r["prompt"] for r in requests], params,
                              image_data=[[r["image"]] for r in requests])
    return time.perf_counter() - start, [r["output_ids"] for r in results]


def run_transformers(hf, image_processor, prompt_ids, images, output_len: int):
    start = time.perf_counter()
    outputs = [greedy_tokens(hf, image_processor, ids, [im], output_len)
               for ids, im in zip(prompt_ids, images)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="demo",
                        help="demo, llava-onevision-7b-random, or a checkpoint folder")
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--photos", type=Path, default=IMAGES,
                        help="folder of photos to crop the request images from")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    import pyvlm

    folder, hf, loaded = load_models(args)
    engine = pyvlm.Engine(model=str(folder), loaded_model=loaded, device=args.device,
                          dtype=args.dtype, max_total_tokens=None if args.device != "cpu" else 65536)
    images = bench_images(args.num_requests, folder=args.photos)
    requests = [{"prompt": f"<image>\nDescribe picture {i} in detail.", "image": im}
                for i, im in enumerate(images)]
    built = [engine.builder.from_prompt(r["prompt"], [r["image"]], engine_sampling())
             for r in requests]
    prompt_ids = [b.prompt_ids for b in built]
    run_pyvlm(engine, requests[:1], 2)  # warm-up (allocator, kernels)
    ours_s, ours = run_pyvlm(engine, requests, args.output_len)
    image_processor = image_processor_for(engine.state.files.processor_config)
    greedy_tokens(hf, image_processor, prompt_ids[0], [images[0]], 2)  # warm-up
    theirs_s, theirs = run_transformers(hf, image_processor, prompt_ids, images, args.output_len)
    engine.shutdown()
    report(args, prompt_ids, ours_s, theirs_s, ours, theirs)


def engine_sampling():
    from pyvlm.scheduling.types import SamplingParams

    return SamplingParams(max_new_tokens=1, temperature=0.0)


def report(args, prompt_ids, ours_s, theirs_s, ours, theirs) -> None:
    n, out_len = args.num_requests, args.output_len
    agree = sum(a == b for o, t in zip(ours, theirs) for a, b in zip(o, t))
    first = sum(o[:1] == t[:1] for o, t in zip(ours, theirs))
    prefix = sum(_common_prefix(o, t) for o, t in zip(ours, theirs)) / n
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    avg_prompt = sum(len(p) for p in prompt_ids) / len(prompt_ids)
    print(f"| model | device | requests x (prompt avg, output) | pyvlm s | pyvlm out tok/s "
          f"| transformers s | transformers out tok/s | speedup | greedy tokens equal | first token equal | mean common prefix |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.model} {args.dtype} | {device} | {n} x ({avg_prompt:.0f}, {out_len}) "
          f"| {ours_s:.2f} | {n * out_len / ours_s:.1f} | {theirs_s:.2f} "
          f"| {n * out_len / theirs_s:.1f} | {theirs_s / ours_s:.2f}x | {agree}/{n * out_len} "
          f"| {first}/{n} | {prefix:.1f} |")


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


if __name__ == "__main__":
    main()
