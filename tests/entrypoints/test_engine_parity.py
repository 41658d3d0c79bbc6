"""pyvlm.Engine against transformers on the same tiny checkpoints of every
family (LLaVA-OneVision on Qwen2 and Llama, Qwen2-VL, Qwen2.5-VL): greedy
tokens of 8 concurrent requests (text only, one image, two images) are the
same as transformers' generate, with and without chunked prefill, when half
of them hit the prefix cache, and when a tiny KV pool forces preemption;
two different images of the same size never share cache entries."""

import pytest
import torch
from PIL import Image

from pyvlm.scheduling.encoder_budget import tower_charge
from pyvlm.scheduling.types import SamplingParams
from tests.hf_reference import greedy_tokens, reference_inputs_for

NUM_NEW_TOKENS = 32
GREEDY = {"max_new_tokens": NUM_NEW_TOKENS, "temperature": 0, "ignore_eos": True}
WORDS = "the cat sat on a mat while seven quick zebras jumped over lazy dogs near blue hills".split()


def random_image(height: int, width: int, gen: torch.Generator) -> Image.Image:
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def make_prompts(seed: int, image: str):
    """8 prompts of different lengths: 3 text only, 3 with one image, 2 with
    two; image: the model's placeholder text for one image."""
    gen = torch.Generator().manual_seed(seed)

    def words(n):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=gen))

    sizes = [(40, 60), (130, 35), (200, 190), (33, 33), (70, 90), (64, 20), (90, 150)]
    images = [random_image(h, w, gen) for h, w in sizes]
    return [
        (words(5), []), (words(23), []), (words(41), []),
        (f"{image}\n{words(7)}", [images[0]]),
        (f"{words(3)} {image} {words(12)}", [images[1]]),
        (f"{image}\n{words(30)}", [images[2]]),
        (f"{words(4)} {image} and {image} {words(9)}", [images[3], images[4]]),
        (f"{image}{image}{words(17)}", [images[5], images[6]]),
    ]


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen2_vl", "qwen2_5_vl"])
def checkpoint(request):
    """LLaVA-OneVision on Qwen2 (QKV bias) and Llama (tied embeddings, like
    the demo model); Qwen2-VL and Qwen2.5-VL (M-RoPE)."""
    return request.getfixturevalue(f"tiny_checkpoint_{request.param}")


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()


def engine_for(checkpoint, **server_args):
    import pyvlm

    args = dict(device="cpu", dtype="float32", page_size=4, max_total_tokens=16384)
    return pyvlm.Engine(model=str(checkpoint), **{**args, **server_args})


class Reference:
    """transformers' greedy tokens per prompt, computed once."""

    def __init__(self, hf_model, engine, image_inputs=None):
        self.hf_model, self.builder = hf_model, engine.builder
        self.image_inputs = image_inputs or reference_inputs_for(engine.state.files)
        self.cache = {}

    def tokens(self, prompt: str, images) -> list:
        key = (prompt, tuple(id(im) for im in images))
        if key not in self.cache:
            ids = self.builder.from_prompt(prompt, images, SamplingParams()).prompt_ids
            self.cache[key] = greedy_tokens(self.hf_model, self.image_inputs, ids, images,
                                            NUM_NEW_TOKENS)
        return self.cache[key]


@pytest.fixture(scope="module")
def reference(hf_model, checkpoint):
    with engine_for(checkpoint) as engine:
        return Reference(hf_model, engine)


@pytest.fixture(scope="module")
def prompts(reference):
    return make_prompts(seed=1, image=reference.builder.image_token)


def generate_all(engine, prompts):
    return engine.generate([p for p, _ in prompts], GREEDY, image_data=[ims for _, ims in prompts])


def assert_same_tokens(results, prompts, reference):
    for (prompt, images), result in zip(prompts, results):
        assert result["output_ids"] == reference.tokens(prompt, images), prompt
        assert result["meta_info"]["finish_reason"]["type"] == "length"


def test_eight_concurrent_requests_match_transformers(checkpoint, prompts, reference):
    with engine_for(checkpoint) as engine:
        assert_same_tokens(generate_all(engine, prompts), prompts, reference)


def test_chunked_prefill_gives_the_same_tokens(checkpoint, prompts, reference):
    with engine_for(checkpoint, chunked_prefill_size=16) as engine:
        assert_same_tokens(generate_all(engine, prompts), prompts, reference)


def test_mixed_steps_that_cut_image_prompts_give_the_same_tokens(checkpoint, prompts, reference):
    """Two requests run at a time and finish at different steps, so the
    others are admitted beside decodes, under a mixed cap of 24 that their
    images' tower charge cuts: some chunks that start an image hold only
    the cap less the image's tokens (pyvlm/scheduling/encoder_budget.py)."""
    budgets = [NUM_NEW_TOKENS - k for k in (0, 5, 2, 7, 4, 1, 6, 3)]  # staggered finishes
    params = [{**GREEDY, "max_new_tokens": n} for n in budgets]
    with engine_for(checkpoint, max_running_requests=2, max_mixed_prefill_tokens=24) as engine:
        chunks = record_prefill_chunks(engine.state.runner)
        results = engine.generate([p for p, _ in prompts], params,
                                  image_data=[ims for _, ims in prompts])
    for (prompt, images), result, budget in zip(prompts, results, budgets):
        assert result["output_ids"] == reference.tokens(prompt, images)[:budget], prompt
    charged = [(c.num_new_tokens, tower_charge(c.mm_items, c.start_pos,
                                               c.start_pos + c.num_new_tokens)) for c in chunks]
    assert any(tower and tokens + tower == 24 for tokens, tower in charged), charged


def test_images_encoded_ahead_give_the_same_tokens(checkpoint, prompts, reference):
    """Two requests run at a time, so the others wait while steps encode
    their images ahead (pyvlm/scheduling/encode_ahead.py); their prefills
    read the cached rows and give transformers' tokens."""
    budgets = [NUM_NEW_TOKENS - k for k in (0, 5, 2, 7, 4, 1, 6, 3)]
    params = [{**GREEDY, "max_new_tokens": n} for n in budgets]
    with engine_for(checkpoint, max_running_requests=2, vision_encode_ahead=True,
                    engine_process="thread") as engine:  # it reads the runner
        results = engine.generate([p for p, _ in prompts], params,
                                  image_data=[ims for _, ims in prompts])
        num_encoded_ahead = engine.state.runner.vision.num_encoded_ahead
    for (prompt, images), result, budget in zip(prompts, results, budgets):
        assert result["output_ids"] == reference.tokens(prompt, images)[:budget], prompt
    assert num_encoded_ahead > 0


def record_prefill_chunks(runner) -> list:
    """Wraps runner.launch: the prefill chunks of every mixed step."""
    chunks, launch = [], runner.launch

    def recording(batch):
        if not batch.is_decode and any(c.num_new_tokens == 1 for c in batch.chunks):
            chunks.extend(c for c in batch.chunks if c.num_new_tokens > 1)
        return launch(batch)

    runner.launch = recording
    return chunks


def test_prefix_cache_hits_give_the_same_tokens(checkpoint, prompts, reference):
    fresh = make_prompts(seed=2, image=reference.builder.image_token)
    with engine_for(checkpoint) as engine:
        generate_all(engine, prompts[::2])  # warm the cache with half the prompts
        mixed = prompts[::2] + fresh[1::2]
        results = generate_all(engine, mixed)
    assert_same_tokens(results, mixed, reference)
    cached = [r["meta_info"]["cached_tokens"] for r in results]
    assert all(c > 0 for c in cached[:4]), cached
    assert all(c == 0 for c in cached[4:]), cached


def test_preemption_on_a_tiny_pool_gives_the_same_tokens(checkpoint, prompts, reference):
    longest = max(len(reference.builder.from_prompt(p, ims, SamplingParams()).prompt_ids)
                  for p, ims in prompts)
    pool_tokens = (longest + NUM_NEW_TOKENS) * 3 // 2  # one request fits, not all
    # No decode reserve (conservativeness 0): the requests are admitted together and must preempt.
    with engine_for(checkpoint, max_total_tokens=pool_tokens, disable_radix_cache=True,
                    schedule_conservativeness=0.0) as engine:
        results = generate_all(engine, prompts)
        preemptions = engine.get_stats().get("num_preemptions", 0)
    assert_same_tokens(results, prompts, reference)
    assert preemptions > 0


def test_different_images_of_one_size_share_no_cache_entries(checkpoint, reference):
    gen = torch.Generator()
    first, second = random_image(48, 64, gen), random_image(48, 64, gen)
    prompt = f"look: {reference.builder.image_token} what is it?"
    with engine_for(checkpoint) as engine:
        results = [engine.generate(prompt, GREEDY, image_data=[image]) for image in (first, second)]
        request = engine.builder.from_prompt(prompt, [second], SamplingParams())
        engine.builder.release(request)
    (item,) = request.mm_items
    for image, result in zip((first, second), results):
        assert result["output_ids"] == reference.tokens(prompt, [image])
    # The second request reuses at most the pages wholly before its image.
    page_size = 4
    assert results[1]["meta_info"]["cached_tokens"] <= item.offset // page_size * page_size
