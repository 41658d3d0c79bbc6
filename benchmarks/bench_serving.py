"""OpenAI-API load generator for vision servers (pyvlm, SGLang, vLLM, ...).

Sends N chat-completion requests, each with one image (a data URI of a
distinct photo crop) and a fixed max_tokens, at a given concurrency, with
streaming on, and reports TTFT, time per output token (TPOT), inter-token
latency (ITL) as mean/p50/p99, and request and output-token throughput.

  python benchmarks/bench_serving.py --base-url http://127.0.0.1:30010/v1 \\
      --num-requests 64 --concurrency 16 --max-tokens 64
"""

import argparse
import asyncio
import base64
import io
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_offline import bench_images  # noqa: E402


@dataclass
class RequestTiming:
    start: float
    chunk_times: List[float] = field(default_factory=list)
    num_output_tokens: int = 0
    error: str = ""


def image_data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


async def one_request(client, model: str, uri: str, max_tokens: int, index: int) -> RequestTiming:
    timing = RequestTiming(time.perf_counter())
    try:
        stream = await client.chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},  # fixed output length (SGLang and vLLM accept it)
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": uri}},
                {"type": "text", "text": f"Describe picture {index} in detail."}]}])
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                timing.chunk_times.append(time.perf_counter())
            if chunk.usage is not None:
                timing.num_output_tokens = chunk.usage.completion_tokens
    except Exception as exc:  # reported, not fatal: a load test counts failures
        timing.error = f"{type(exc).__name__}: {exc}"
    return timing


async def run(args) -> List[RequestTiming]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                         timeout=args.timeout)
    uris = [image_data_uri(im) for im in bench_images(args.num_requests)]
    semaphore = asyncio.Semaphore(args.concurrency)

    async def limited(i):
        async with semaphore:
            return await one_request(client, args.model, uris[i], args.max_tokens, i)

    return await asyncio.gather(*(limited(i) for i in range(args.num_requests)))


def percentiles(values: List[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"{statistics.mean(values) * 1e3:.1f} / {p(0.5) * 1e3:.1f} / {p(0.99) * 1e3:.1f}"


def report(timings: List[RequestTiming], wall_s: float, args) -> None:
    ok = [t for t in timings if not t.error and t.chunk_times]
    empty = sum(1 for t in timings if not t.error and not t.chunk_times)
    ttft = [t.chunk_times[0] - t.start for t in ok]
    tpot = [(t.chunk_times[-1] - t.chunk_times[0]) / max(1, t.num_output_tokens - 1) for t in ok]
    itl = [b - a for t in ok for a, b in zip(t.chunk_times, t.chunk_times[1:])]
    tokens = sum(t.num_output_tokens for t in ok)
    print(f"| server | requests (ok) | concurrency | TTFT ms mean/p50/p99 | TPOT ms mean/p50/p99 "
          f"| ITL ms mean/p50/p99 | req/s | output tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.base_url} | {len(timings)} ({len(ok)}) | {args.concurrency} "
          f"| {percentiles(ttft)} | {percentiles(tpot)} | {percentiles(itl)} "
          f"| {len(ok) / wall_s:.2f} | {tokens / wall_s:.1f} |")
    if empty:
        print(f"{empty} request(s) streamed no text")
    for t in timings:
        if t.error:
            print(f"error: {t.error}")
            break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    parser.add_argument("--model", default="default")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    start = time.perf_counter()
    timings = asyncio.run(run(args))
    report(timings, time.perf_counter() - start, args)


if __name__ == "__main__":
    main()
