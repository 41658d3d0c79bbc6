"""The front's time per one-image chat request, stage by stage (issue 12,
TTFT): what the server process does between receiving the body and
handing the request to the engine process, for a GPU engine (images
decoded on the front, preprocessed in the step: deferred).

  python benchmarks/bench_front_stages.py [--repeats 200] [--size 644x476]

The front is startup.front_state's over the qwen2-vl-7b-narrow checkpoint
(benchmarks/load/serve_random.py: Qwen2-VL-7B's image processor, chat
template and vocabulary size; a word-level tokenizer), on device "cuda"
so that it defers images as a GPU engine does (no GPU is touched: the
front only reads the device's type). The picture is
benchmarks/load/serving_phases.py's: a crop of the shared photos resized
to 644x476, a JPEG (quality 90) sent as a base64 data URI. Each stage is
timed alone on the outputs of the ones before; "whole" is the builder's
path end to end (JSON body -> Request with its pixels in shared memory ->
the bytes sent to the engine process). The two stages pyvlm used to do
differently are timed the old way too, in the same run ("was: ..."):
blake2b over the raw pixels for the cache key, and a private copy of the
pixels moved into shared memory by Tensor.share_memory_(). Medians, ms.
"""

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]

from benchmarks.bench_serving import image_data_uri  # noqa: E402
from benchmarks.load.images import distinct_pictures  # noqa: E402
from benchmarks.load.serving_phases import parse_size  # noqa: E402

SHAPE = "qwen2-vl-7b-narrow"
PROMPT = "Describe this image in one sentence."
KEY, OLD_KEY = "cache key (image_content_hash)", "  was: blake2b over the pixels"
PIXELS, OLD_PIXELS = "pixels into shared memory (defer_images)", "  was: copy + share_memory_()"


def front_builder(folder: Path):
    """The request builder a GPU engine's server process holds."""
    import torch

    from benchmarks.load.serve_random import config_for
    from benchmarks.offline.random_models import write_checkpoint_metadata
    from pyvlm.config import engine_config
    from pyvlm.entrypoints.startup import core_spec_for, front_state, image_model_of

    write_checkpoint_metadata(folder, config_for(SHAPE))
    config = engine_config(model=str(folder), load_format="dummy", dtype="bfloat16")
    spec = core_spec_for(config, torch.device("cuda"))
    return front_state(spec, image_model_of(spec.files, spec.dtype), step_loop=None).builder


def chat_body(uri: str) -> bytes:
    """The body of an OpenAI chat request with one image (bench_serving's)."""
    import orjson

    return orjson.dumps({"model": SHAPE, "max_tokens": 1, "stream": True, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                     {"type": "text", "text": PROMPT}]}]})


def median_ms(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def old_pixel_hash(image) -> int:
    """The cache key as pyvlm made it before: blake2b over the raw pixels."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return int.from_bytes(digest.digest(), "little")


def old_shared_copy(image):
    """The pixels as pyvlm sent them before: a private copy, then
    share_memory_() (move_to_shared_memory's)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image).copy()).share_memory_()


def stage_functions(builder, uri: str) -> Dict[str, Callable[[], object]]:
    """name -> one stage of one request, on the outputs of the ones before."""
    import orjson

    from pyvlm.entrypoints.core_messages import Add, encode, move_to_shared_memory
    from pyvlm.multimodal.hashing import image_content_hash, pixel_key
    from pyvlm.multimodal.image_io import decode_image
    from pyvlm.multimodal.image_sources import decode_data_uri
    from pyvlm.multimodal.processor import expand_image_tokens
    from pyvlm.scheduling.types import SamplingParams

    body, media, processor = chat_body(uri), builder.media, builder.images.processor
    messages = orjson.loads(body)["messages"]
    rendered = builder.render(messages)
    data = decode_data_uri(uri, media.max_bytes)
    image = decode_image(data, media.image_limits)
    in_process = image.copy()  # a PIL image given in-process: keyed by its pixels
    ids = builder._tokenize_with_specials(rendered.text)
    plans = processor.plan_prompt([(image.height, image.width)], media.max_pixels)
    expanded, spans = expand_image_tokens(ids, builder.image_token_id, [image],
                                          [p.num_tokens for p in plans])
    request = builder.from_messages(messages, SamplingParams(max_new_tokens=1))

    def plan_and_expand():
        plans = processor.plan_prompt([(image.height, image.width)], media.max_pixels)
        return expand_image_tokens(ids, builder.image_token_id, [image],
                                   [p.num_tokens for p in plans])

    def whole():
        built = builder.from_messages(orjson.loads(body)["messages"],
                                      SamplingParams(max_new_tokens=1))
        move_to_shared_memory(built)
        message = encode(Add(built))
        builder.release(built)
        return message

    return {
        "JSON body (orjson)": lambda: orjson.loads(body),
        "chat template": lambda: builder.render(messages),
        "base64 decode": lambda: decode_data_uri(uri, media.max_bytes),
        "JPEG decode + its key (decode_image)": lambda: decode_image(data, media.image_limits),
        "tokenize": lambda: builder._tokenize_with_specials(rendered.text),
        "plan + expand image tokens": plan_and_expand,
        "M-RoPE positions": lambda: processor.prompt_positions(expanded, spans, plans),
        KEY: lambda: image_content_hash(image),
        OLD_KEY: lambda: old_pixel_hash(image),
        "  in-process PIL image (pixel_key)": lambda: pixel_key(in_process),
        PIXELS: lambda: builder.images.prepare([image], plans),
        OLD_PIXELS: lambda: old_shared_copy(image),
        "move_to_shared_memory (nothing left)": lambda: move_to_shared_memory(request),
        "encode Add (pickle, fd handles)": lambda: encode(Add(request)),
        "WHOLE (body -> bytes for the engine)": whole,
    }


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--size", default="644x476")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    uri = image_data_uri(distinct_pictures(1, size)[0])
    with tempfile.TemporaryDirectory(prefix="pyvlm-front-") as folder:
        builder = front_builder(Path(folder))
        stages = stage_functions(builder, uri)
        results = {name: median_ms(function, args.repeats) for name, function in stages.items()}
    print(f"{SHAPE}, one {size[0]}x{size[1]} JPEG ({len(uri) / 1e3:.0f} kB data URI), "
          f"median of {args.repeats}, ms")
    for name, ms in results.items():
        print(f"  {name:42s} {ms:7.3f}")
    for new, old in ((KEY, OLD_KEY), (PIXELS, OLD_PIXELS)):
        print(f"{old.strip()[5:]} / {new}: {results[old] / max(results[new], 1e-6):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
