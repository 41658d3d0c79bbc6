"""OpenAI-API load generator for vision servers (pyvlm, SGLang, vLLM, ...).

Sends N chat-completion requests, each with one image (a data URI of a
distinct photo crop) and a fixed max_tokens, at a given concurrency, with
streaming on (a loopback server; the client is benchmarks/load/client.py,
standard library only), and reports TTFT, time per output token (TPOT), inter-token
latency (ITL) as mean/p50/p99, and request and output-token throughput.

  python benchmarks/bench_serving.py --base-url http://127.0.0.1:30010/v1 \\
      --num-requests 64 --concurrency 16 --max-tokens 64
"""

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_offline import bench_images  # noqa: E402
from benchmarks.load import client  # noqa: E402


PROMPT = "Describe picture {index} in detail."


@dataclass
class RequestTiming:
    start: float
    chunk_times: List[float] = field(default_factory=list)
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0
    error: str = ""


def image_data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


async def one_request(target, model: str, uri: str, max_tokens: int, index: int,
                      extra_text: str = "") -> RequestTiming:
    """One streamed chat with one image (benchmarks/load/client.py, no openai);
    extra_text follows PROMPT (a longer prompt)."""
    server, path, headers, timeout = target
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,  # fixed output length (SGLang and vLLM accept it)
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": uri}},
                {"type": "text", "text": PROMPT.format(index=index) + extra_text}]}]}
    timing = RequestTiming(time.perf_counter())
    try:
        reply = await client.post_json(server, path, body, timeout=timeout, headers=headers)
        read_stream(reply, timing)
    except Exception as exc:  # reported, not fatal: a load test counts failures
        timing.error = f"{type(exc).__name__}: {exc}"
    return timing


def read_stream(reply, timing: RequestTiming) -> None:
    """Text-chunk arrival times and the usage of a chat-completion stream."""
    if reply.status != 200:
        raise RuntimeError(f"HTTP {reply.status}: {reply.body[:200]!r}")
    for (name, data), at in zip(reply.events, reply.event_times):
        if name == "error":
            raise RuntimeError(f"error event: {data[:200]}")
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
            timing.chunk_times.append(at)
        if chunk.get("usage"):
            timing.num_output_tokens = chunk["usage"]["completion_tokens"]
            timing.num_prompt_tokens = chunk["usage"].get("prompt_tokens", 0)


def chat_target(base_url: str, api_key: str = "EMPTY", timeout: float = 600.0):
    """What one_request takes: (server, chat-completions path, headers, timeout)."""
    return (client.Server.from_url(base_url),
            urlsplit(base_url).path.rstrip("/") + "/chat/completions",
            [("Authorization", f"Bearer {api_key}")], timeout)


async def run_requests(target, model: str, uris: List[str], max_tokens: int,
                       concurrency: int, extra_text: str = "") -> List[RequestTiming]:
    """One request per image URI, at most `concurrency` in flight."""
    semaphore = asyncio.Semaphore(concurrency)

    async def limited(i):
        async with semaphore:
            return await one_request(target, model, uris[i], max_tokens, i, extra_text)

    return await asyncio.gather(*(limited(i) for i in range(len(uris))))


async def run(args) -> List[RequestTiming]:
    target = chat_target(args.base_url, args.api_key, args.timeout)
    uris = [image_data_uri(im) for im in bench_images(args.num_requests)]
    return await run_requests(target, args.model, uris, args.max_tokens, args.concurrency)


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
