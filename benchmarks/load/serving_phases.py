"""The serving measurements of benchmarks/bench_latency_vs_transformers.py,
against any OpenAI-compatible server (streamed chat completions with one
image each, through benchmarks/bench_serving.py's client), in phases:

1. warm-up: a few concurrent short requests;
2. TTFT on an idle server: sequential single requests, each a fresh image
   (one the server has never seen, so no encoder-cache hit), max_tokens 1;
3. batch-1 decode: one streamed request, tokens/s after its first token;
4. throughput: num_requests requests with distinct images, concurrency at a
   time, output_tokens each (ignore_eos): output tokens / wall time.

Every request of every phase carries its own picture (all of one size), so
the phases never share cache entries but for the chat template's text.

  python -m benchmarks.load.serving_phases --base-url http://127.0.0.1:30000/v1 \\
      --model qwen2-vl-7b --json-out phases.json

It runs in its own process, so the client never competes with the server
for the interpreter lock.
"""

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.bench_serving import (RequestTiming, chat_target, image_data_uri,  # noqa: E402
                                      one_request, run_requests)
from benchmarks.load import client  # noqa: E402
from benchmarks.load.images import distinct_pictures  # noqa: E402

IMAGE_SIZE = (644, 476)  # width, height: 17 x 23 Qwen2-VL merged blocks, no resize
# Per model (by name, "-narrow" or not) where the default is a poor probe:
# Llama-3.2-Vision tiles 644x476 into 2 tiles of 560; a 4:3 1120x840 photo
# fills the 2x2 canvas (4 tiles, the most it takes) at scale 1, padded below.
IMAGE_SIZES = {"llama-3.2-11b-vision": (1120, 840)}
WARMUP_TOKENS = 4


def image_size_for(model: str) -> Tuple[int, int]:
    """(width, height) of the benchmark's pictures for a served model name."""
    return IMAGE_SIZES.get(model.removesuffix("-narrow"), IMAGE_SIZE)


def parse_size(text: str) -> Tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height)."""
    width, height = (int(side) for side in text.lower().split("x"))
    return width, height


@dataclass(frozen=True)
class Plan:
    num_warmup: int = 8
    num_ttft: int = 8
    decode_tokens: int = 128
    num_requests: int = 64
    concurrency: int = 64
    output_tokens: int = 128

    @property
    def num_images(self) -> int:
        return self.num_warmup + self.num_ttft + 1 + self.num_requests


@dataclass
class PhaseResults:
    ttft_s: List[float]
    num_prompt_tokens: int
    decode_tokens: int
    decode_s: float  # from the first streamed token to the last
    num_requests: int
    num_ok: int
    output_tokens: int  # of the throughput phase, all requests
    wall_s: float
    errors: List[str]

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.decode_tokens - 1) / self.decode_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def _checked(timing: RequestTiming, what: str) -> RequestTiming:
    if timing.error or not timing.chunk_times:
        raise RuntimeError(f"{what}: {timing.error or 'no text streamed'}")
    return timing


async def wait_ready(base_url: str, timeout: float) -> None:
    """Polls GET /v1/models until 200 (the server answers 503 while loading)."""
    server, deadline = client.Server.from_url(base_url), time.monotonic() + timeout
    while True:
        try:
            if (await client.request(server, "GET", "/v1/models", timeout=10)).status == 200:
                return
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} was not ready within {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def run_phases(base_url: str, model: str, plan: Plan, photos=None,
                     image_size: Tuple[int, int] = IMAGE_SIZE) -> PhaseResults:
    target = chat_target(base_url)
    uris = [image_data_uri(p) for p in distinct_pictures(plan.num_images, image_size, photos)]
    warmup, rest = uris[:plan.num_warmup], uris[plan.num_warmup:]
    ttft_uris, decode_uri, load_uris = rest[:plan.num_ttft], rest[plan.num_ttft], \
        rest[plan.num_ttft + 1:]
    for timing in await run_requests(target, model, warmup, WARMUP_TOKENS, len(warmup) or 1):
        _checked(timing, "warm-up")
    ttft = []
    for i, uri in enumerate(ttft_uris):
        timing = _checked(await one_request(target, model, uri, 1, i), "TTFT request")
        ttft.append(timing.chunk_times[0] - timing.start)
    decode = _checked(await one_request(target, model, decode_uri, plan.decode_tokens, 0),
                      "decode request")
    start = time.perf_counter()
    loaded = await run_requests(target, model, load_uris, plan.output_tokens, plan.concurrency)
    wall = time.perf_counter() - start
    ok = [t for t in loaded if not t.error and t.chunk_times]
    return PhaseResults(ttft, decode.num_prompt_tokens, decode.num_output_tokens,
                        decode.chunk_times[-1] - decode.chunk_times[0], len(loaded), len(ok),
                        sum(t.num_output_tokens for t in ok), wall,
                        [t.error for t in loaded if t.error][:3])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--json-out", type=Path, required=True)
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--image-size", type=parse_size, default=None,
                        help="WIDTHxHEIGHT of every picture (default: image_size_for(--model))")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    for name, value in asdict(Plan()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    args = parser.parse_args(argv)
    plan = Plan(**{name: getattr(args, name) for name in asdict(Plan())})

    async def go():
        await wait_ready(args.base_url, args.ready_timeout)
        return await run_phases(args.base_url, args.model, plan, args.photos,
                                args.image_size or image_size_for(args.model))

    results = asyncio.run(go())
    args.json_out.write_text(json.dumps(asdict(results)))


if __name__ == "__main__":
    main()
