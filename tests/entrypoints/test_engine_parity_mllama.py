"""pyvlm.Engine against transformers on tiny Llama-3.2-Vision (mllama)
checkpoints (2 self-attention + 2 cross-attention layers; 3 + 1): 32
greedy tokens of 8 concurrent requests mixing text-only prompts, text
before and after images, two images apart and a run of two, images of 1 to
4 tiles, are transformers' generate tokens; again with chunked prefill of 8
tokens, with prefix-cache hits (the image K/V reused, never shared between
different images), and under preemption; the page accounting returns to
idle after each of them and after aborts."""

import asyncio

import pytest
import torch

from pyvlm.scheduling.types import SamplingParams
from tests.entrypoints.test_engine_parity import (GREEDY, NUM_NEW_TOKENS, WORDS, Reference,
                                                  assert_same_tokens, engine_for, generate_all,
                                                  random_image)


@pytest.fixture(scope="module", params=["mllama", "mllama_one_cross"])
def checkpoint(request):
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(hf_model, checkpoint):
    with engine_for(checkpoint) as engine:
        return Reference(hf_model, engine)


def make_prompts(seed: int, image: str = "<|image|>"):
    """8 prompts: 2 text only, and images (1, 2, 3 and 4 tiles of 56 px)
    first, after text, apart, in a run of two, and last."""
    gen = torch.Generator().manual_seed(seed)

    def words(n):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=gen))

    sizes = [(40, 60), (50, 110), (150, 50), (120, 120), (33, 33), (70, 90), (64, 20)]
    images = [random_image(h, w, gen) for h, w in sizes]
    return [
        (words(6), []), (words(27), []),
        (f"{image}{words(7)}", [images[0]]),
        (f"{words(5)} {image} {words(12)}", [images[1]]),
        (f"{words(9)}{image}", [images[2]]),
        (f"{words(4)} {image} and {image} {words(9)}", [images[3], images[4]]),
        (f"{words(3)}{image}{image}{words(11)}", [images[5], images[6]]),
        (f"{image}{words(30)}", [images[3]]),
    ]


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(seed=1)


def assert_idle(engine):
    """No request holds a page: flushing the cache frees every page."""
    scheduler = engine.state.scheduler
    assert not scheduler.has_work()
    assert scheduler.kv.num_used_pages == 0
    assert engine.flush_cache()
    assert scheduler.kv.allocator.num_used == 0 and not scheduler.kv.images.entries


def test_eight_concurrent_requests_match_transformers(checkpoint, prompts, reference):
    with engine_for(checkpoint) as engine:
        assert_same_tokens(generate_all(engine, prompts), prompts, reference)
        assert_idle(engine)


def test_chunked_prefill_gives_the_same_tokens(checkpoint, prompts, reference):
    with engine_for(checkpoint, chunked_prefill_size=8) as engine:
        assert_same_tokens(generate_all(engine, prompts), prompts, reference)
        assert_idle(engine)


def test_prefix_cache_hits_reuse_the_image_kv(checkpoint, prompts, reference):
    fresh = make_prompts(seed=2)
    with engine_for(checkpoint) as engine:
        generate_all(engine, prompts[1::2])  # warm the cache with half the prompts
        writes = count_image_writes(engine)
        mixed = prompts[1::2] + fresh[::2]
        results = generate_all(engine, mixed)
        assert_idle(engine)
    assert_same_tokens(results, mixed, reference)
    cached = [r["meta_info"]["cached_tokens"] for r in results]
    assert all(c > 0 for c in cached[:4]), cached
    # the warm prompts' images were not written again: only the fresh ones
    fresh_images = {id(image) for _, images in fresh[::2] for image in images}
    assert writes() == len(fresh_images)


def count_image_writes(engine):
    """Counts the images whose K/V the runner computes from now on."""
    runner, written = engine.state.runner, []
    inputs = runner._cross_attention_inputs

    def counting(chunks, pool, encode, is_decode):
        written.extend({image.item.hash for c in chunks for image in c.cross_images
                        if image.needs_write})
        return inputs(chunks, pool, encode, is_decode)

    runner._cross_attention_inputs = counting
    return lambda: len(set(written))


def test_different_images_of_one_size_share_no_cache_entries(checkpoint, reference):
    gen = torch.Generator()
    first, second = random_image(48, 64, gen), random_image(48, 64, gen)
    prompt = "look: <|image|> what is it?"
    with engine_for(checkpoint) as engine:
        results = [engine.generate(prompt, GREEDY, image_data=[image]) for image in (first, second)]
        kv = engine.state.scheduler.kv
        assert len(kv.images.entries) == 2  # each image keeps its own K/V pages
        pages = [set(entry.pages) for entry in kv.images.entries.values()]
        assert not pages[0] & pages[1]
    for image, result in zip((first, second), results):
        assert result["output_ids"] == reference.tokens(prompt, [image])
    # the text before the image attends to the image (as in transformers):
    # nothing of the second prompt comes from the first
    assert results[1]["meta_info"]["cached_tokens"] == 0


def test_preemption_on_a_tiny_pool_gives_the_same_tokens(checkpoint, prompts, reference):
    with engine_for(checkpoint) as engine:
        rows_per_page = engine.state.runner.image_rows_per_page
        requests = [engine.builder.from_prompt(p, ims, SamplingParams()) for p, ims in prompts]
        for request in requests:
            engine.builder.release(request)
    page_size = 4
    pages = [-(-(len(r.prompt_ids) + NUM_NEW_TOKENS) // page_size)
             + sum(-(-item.num_cross_rows // rows_per_page) for item in r.mm_items)
             for r in requests]
    pool_tokens = max(pages) * page_size * 3 // 2  # one request fits, not all
    with engine_for(checkpoint, max_total_tokens=pool_tokens, disable_radix_cache=True,
                    schedule_conservativeness=0.0) as engine:
        results = generate_all(engine, prompts)
        preemptions = engine.get_stats().get("num_preemptions", 0)
        assert_idle(engine)
    assert_same_tokens(results, prompts, reference)
    assert preemptions > 0


def test_aborted_requests_give_their_pages_back(checkpoint, prompts):
    """Aborts after 0, 1, 3 and 8 deltas (mid-prefill of a chunked prompt,
    first token, mid-decode) leave nothing behind."""

    async def take(engine, prompt, images, num_deltas):
        stream = engine.async_generate(prompt, dict(GREEDY, max_new_tokens=40),
                                       image_data=images)
        for _ in range(num_deltas):
            await stream.__anext__()
        await stream.aclose()

    async def run_all(engine):
        await asyncio.gather(*(take(engine, prompt, images, num)
                               for (prompt, images), num in zip(prompts, [0, 1, 3, 8] * 2)))

    with engine_for(checkpoint, chunked_prefill_size=8) as engine:
        asyncio.run(run_all(engine))
        for _ in range(200):  # the aborts reach the engine thread between steps
            if not engine.state.scheduler.has_work():
                break
            asyncio.run(asyncio.sleep(0.01))
        assert_idle(engine)
