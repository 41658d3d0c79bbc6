"""Logits parity of LlavaOnevisionForConditionalGeneration with transformers
(text only, one small or large image, two images), run whole, in prefill
chunks plus decode steps, and batched with other sequences."""

import numpy as np
import pytest
import torch

from tests.models.paged import (PagedKV, Sequence, image_processor, random_image, random_text,
                                reference_logits, run_chunked, run_step)
from tests.tiny_models import IM_END_ID, IM_START_ID, IMAGE_TOKEN_ID

TOLERANCE = 1e-4
NUM_DECODE = 4


def assert_logits_close(out: torch.Tensor, ref: torch.Tensor):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err < TOLERANCE, f"max |logits - transformers| = {err:.3g}"


def build_prompt(model, image_sizes, rng, gen):
    """(token ids ending with NUM_DECODE continuation tokens, prompt embeds
    with image rows merged, transformers' image inputs)."""
    images = [random_image(h, w, rng) for h, w in image_sizes]
    if not images:
        ids = [IM_START_ID] + random_text(9, gen) + [IM_END_ID] + random_text(NUM_DECODE, gen)
        return ids, None, {}
    inputs = image_processor()(images=[images], return_tensors="pt")
    features = embed(model, inputs, len(images))
    ids = [IM_START_ID] + random_text(3, gen)
    for rows in features:
        ids += [IMAGE_TOKEN_ID] * rows.shape[0] + random_text(2, gen)
    num_prompt = len(ids)
    ids += random_text(NUM_DECODE, gen)
    with torch.no_grad():
        embeds = model.embed_tokens(torch.tensor(ids[:num_prompt]))
    embeds[torch.tensor(ids[:num_prompt]) == IMAGE_TOKEN_ID] = torch.cat(features)
    return ids, embeds, dict(inputs)


def embed(model, inputs, num_images):
    pixel_values = [inputs["pixel_values"][i] for i in range(num_images)]
    with torch.no_grad():
        return model.embed_images(pixel_values, inputs["image_sizes"].tolist(),
                                  [num_images] * num_images)


CASES = {"text": [], "small_image": [(20, 30)], "large_image": [(150, 90)],
         "wide_image": [(24, 200)], "two_images": [(20, 30), (100, 200)]}


@pytest.mark.parametrize("case", CASES)
def test_whole_prompt_matches_transformers(models, case):
    hf_model, model = models
    seed = int(torch.randint(0, 2**31, ()).item())
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    ids, embeds, image_inputs = build_prompt(model, CASES[case], rng, gen)
    ref = reference_logits(hf_model, ids, **image_inputs)
    kv = PagedKV(model, num_pages=64, page_size=16, seed=seed)
    out = run_chunked(model, Sequence(ids, embeds), kv, [len(ids)], num_decode=0)
    assert_logits_close(out, ref)


def test_large_image_is_downsampled(models):
    """The 150x90 image's 5x3 tile grid (20x12 features) exceeds 9 base tiles
    of area by more than 10%, so anyres_max_9 interpolates it down."""
    _, model = models
    inputs = image_processor()(images=[[random_image(150, 90, np.random.default_rng())]],
                               return_tensors="pt")
    (rows,) = embed(model, inputs, 1)
    tiles = model.num_tiles_used((150, 90), True)
    undownsampled = 16 + 20 * (12 + 1)  # base tile + rows of 12 features and a newline
    assert tiles == 16 and rows.shape[0] < undownsampled


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("case", ["text", "large_image", "two_images"])
def test_chunked_prefill_and_decode_match_transformers(models, case, page_size):
    hf_model, model = models
    seed = int(torch.randint(0, 2**31, ()).item())
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    ids, embeds, image_inputs = build_prompt(model, CASES[case], rng, gen)
    ref = reference_logits(hf_model, ids, **image_inputs)
    kv = PagedKV(model, num_pages=512 // page_size, page_size=page_size, seed=seed)
    # Chunk borders cut through image spans and through pages.
    out = run_chunked(model, Sequence(ids, embeds), kv, [5, 13, 17], num_decode=NUM_DECODE)
    assert_logits_close(out, ref)


def test_batch_of_sequences_matches_transformers(models):
    """A prefill step mixing a sequence's second chunk with two fresh ones of
    other lengths (one with an image), then batched decode steps."""
    hf_model, model = models
    seed = int(torch.randint(0, 2**31, ()).item())
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    prompts = [build_prompt(model, sizes, rng, gen) for sizes in ([], [(40, 40)], [])]
    prompts[2] = (prompts[2][0][:6], None, {})  # a short text prompt
    seqs = [Sequence(ids, embeds) for ids, embeds, _ in prompts]
    num_prompt = [len(s.token_ids) - NUM_DECODE for s in seqs[:2]] + [2]
    kv = PagedKV(model, num_pages=64, page_size=4, seed=seed)
    logits = [run_step(model, kv, [(seqs[0], 7)], is_decode=False)]
    batch = [(seqs[0], num_prompt[0] - 7), (seqs[1], num_prompt[1]), (seqs[2], num_prompt[2])]
    logits.append(run_step(model, kv, batch, is_decode=False))
    decode = [run_step(model, kv, [(s, 1) for s in seqs], is_decode=True)
              for _ in range(NUM_DECODE)]
    outs = [torch.cat([logits[0][0], logits[1][0]] + [d[0] for d in decode])]
    outs += [torch.cat([logits[1][i]] + [d[i] for d in decode]) for i in (1, 2)]
    for out, (ids, _, image_inputs) in zip(outs, prompts):
        assert_logits_close(out, reference_logits(hf_model, ids, **image_inputs))


def test_embed_images_batch_equals_one_by_one(models):
    """One tower call over several single-image and multi-image prompts'
    images gives each image the rows it gets alone."""
    _, model = models
    rng = np.random.default_rng()
    sizes, num_in_prompt = [(20, 30), (150, 90), (64, 40), (33, 90)], [1, 1, 2, 2]
    processed = [image_processor()(images=[[random_image(h, w, rng)]], return_tensors="pt")
                 for h, w in sizes]
    pixel_values = [p["pixel_values"][0] for p in processed]
    with torch.no_grad():
        batched = model.embed_images(pixel_values, sizes, num_in_prompt)
        alone = [model.embed_images([pix], [size], [num])[0]
                 for pix, size, num in zip(pixel_values, sizes, num_in_prompt)]
    for got, want in zip(batched, alone):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_embed_images_rejects_mismatched_lists(models):
    _, model = models
    with pytest.raises(ValueError, match="one entry per image"):
        model.embed_images([torch.zeros(2, 3, 32, 32)], [(20, 30)], [1, 1])
    with pytest.raises(ValueError, match="tiles"):
        model.embed_images([torch.zeros(1, 3, 32, 32)], [(150, 90)], [1])
    assert model.embed_images([], [], []) == []


def test_contract_attributes(models):
    hf_model, model = models
    text = hf_model.config.text_config
    assert model.num_layers == text.num_hidden_layers
    assert model.num_kv_heads == text.num_key_value_heads
    assert model.head_dim == text.hidden_size // text.num_attention_heads
    assert model.image_token_id == IMAGE_TOKEN_ID
