"""Warm-ups that bring a server to its steady state before memory is
measured: on CPU the KV pool is committed by the OS page by page as it is
first written (pyvlm/runner/kv_pool.py), and the prefix cache keeps pages
until the pool is full, so resident memory grows until every page has been
used once; the encoder cache grows until it holds every image in use."""

import random
from typing import List

from benchmarks.load import client, server as srv
from benchmarks.load.workload import Outcome, Workload, send

CPU_POOL_TOKENS = 16384  # small enough for fill_kv_pool to write all of it in seconds


async def fill_kv_pool(work: Workload) -> List[Outcome]:
    """Distinct prompts until the prefix cache holds ~the whole pool
    (nothing when the server does not say how large its pool is).

    The prompts are token ids, not text: a tokenizer may map every unknown
    word to one id (the random models' word-level one does), and identical
    prompts would hit the cache instead of filling it. Ids 16-255 exist in
    every vocabulary here and are neither special nor image tokens."""
    info = await srv.server_info(work.server)
    if not info.get("max_total_tokens"):
        return []
    pool_pages = info["max_total_tokens"] // (info.get("page_size") or 1)
    models = (await client.request(work.server, "GET", "/v1/models")).json()
    length = max(16, min(models["data"][0]["max_model_len"] // 4, 1024))
    rng, outcomes, held, stalled = random.Random(1), [], -1, 0
    while stalled < 3 and len(outcomes) < 1000:
        stats = await srv.engine_stats(work.server)
        pages = stats["num_cached_pages"] + stats["num_used_pages"]
        if pages >= 0.95 * pool_pages:
            break
        stalled, held = (stalled + 1 if pages <= held else 0), max(held, pages)
        body = {"input_ids": [rng.randrange(16, 256) for _ in range(length)],
                "sampling_params": {"max_new_tokens": 1}}
        outcomes.append(await send("warmup_fill", work, "/generate", body))
    return outcomes


async def touch_every_image(work: Workload) -> List[Outcome]:
    """One request per image alone and one per pair: every encoder-cache
    entry the load will use exists afterwards."""
    rng, outcomes = random.Random(0), []
    pairs = [[u] for u in work.images] + [[a, b] for a, b in zip(work.images, work.images[1:])]
    for uris in pairs:
        body = {"model": work.model, "max_tokens": 1, "messages": [{"role": "user", "content": [
            *({"type": "image_url", "image_url": {"url": u}} for u in uris),
            {"type": "text", "text": work.text(rng)}]}]}
        outcomes.append(await send("warmup_image", work, "/v1/chat/completions", body))
    return outcomes


def pool_flags(device: str, max_total_tokens, flags: List[str]) -> List[str]:
    """--max-total-tokens for a server started on CPU (unless flags set it)."""
    pool = max_total_tokens or (CPU_POOL_TOKENS if device == "cpu" else None)
    if pool and "--max-total-tokens" not in flags:
        return ["--max-total-tokens", str(pool)]
    return []
