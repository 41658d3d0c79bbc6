"""pyvlm.Engine's API surface: batching forms, async streaming, aborts,
chat messages with images, cache flushing and clear errors."""

import asyncio
import base64
import io

import pytest
import torch
from PIL import Image

import pyvlm

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint_qwen2):
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2), device="cpu", page_size=4,
                      max_total_tokens=4096, context_length=512) as eng:
        yield eng


def png_data_uri(height=40, width=50) -> str:
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_single_prompt_returns_a_dict_and_a_batch_a_list(engine):
    one = engine.generate("the cat sat", GREEDY)
    assert len(one["output_ids"]) == 12 and one["meta_info"]["completion_tokens"] == 12
    both = engine.generate(["the cat sat", "a dog"], [GREEDY, dict(GREEDY, max_new_tokens=3)])
    assert [len(r["output_ids"]) for r in both] == [12, 3]
    assert both[0]["output_ids"] == one["output_ids"]  # batch neighbours change nothing


def test_token_id_prompts_equal_text_prompts(engine):
    ids = engine.state.tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    assert engine.generate(ids, GREEDY)["output_ids"] == engine.generate("the cat sat", GREEDY)["output_ids"]


def test_chat_messages_with_an_image_url_part(engine):
    uri = png_data_uri()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": "what is this?"}]}]
    result = engine.generate(messages=messages, sampling_params=GREEDY)
    # The rendered prompt with the same image as image_data gives the same tokens.
    rendered = engine.chat_template.render(messages)
    assert [ref.source for ref in rendered.image_refs] == [uri]
    assert engine.generate(rendered.text, GREEDY, image_data=uri)["output_ids"] == result["output_ids"]
    # So does the decoded image in an in-process image part.
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    in_process = [{"role": "user", "content": [{"type": "image", "image": image},
                                               {"type": "text", "text": "what is this?"}]}]
    again = engine.generate(messages=in_process, sampling_params=GREEDY)
    assert again["output_ids"] == result["output_ids"]
    assert again["meta_info"]["prompt_tokens"] == result["meta_info"]["prompt_tokens"]
    # Keyed by its pixels, not by the URI's bytes (pyvlm/multimodal/hashing.py):
    # the same image object sent again hits the cache past the image.
    thrice = engine.generate(messages=in_process, sampling_params=GREEDY)
    assert thrice["output_ids"] == result["output_ids"]
    assert thrice["meta_info"]["cached_tokens"] > again["meta_info"]["cached_tokens"]


def test_async_generate_streams_deltas_that_add_up(engine):
    async def collect():
        deltas = []
        async for delta in engine.async_generate("the cat sat", GREEDY):
            deltas.append(delta)
        return deltas

    deltas = asyncio.run(collect())
    whole = engine.generate("the cat sat", GREEDY)
    assert sum((d["token_ids"] for d in deltas), []) == whole["output_ids"]
    assert "".join(d["text"] for d in deltas) == whole["text"]
    assert [d["finished"] for d in deltas].count(True) == 1 and deltas[-1]["finished"]


def test_leaving_an_async_stream_early_aborts_and_frees_the_request(engine):
    async def take_two():
        stream = engine.async_generate("a long story", dict(GREEDY, max_new_tokens=200))
        got = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()
        return got

    assert len(asyncio.run(take_two())) == 2
    for _ in range(50):  # the abort reaches the engine thread between steps
        stats = engine.get_stats()
        if stats["num_running_reqs"] == 0:
            break
    assert stats["num_running_reqs"] == 0 and stats["num_queued_reqs"] == 0


def test_prompt_longer_than_the_context_is_refused_naming_both_numbers(engine):
    with pytest.raises(ValueError, match=r"\d+ tokens.*context length of 512"):
        engine.generate("cat " * 600, GREEDY)
    assert len(engine.generate("still fine", GREEDY)["output_ids"]) == 12


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": "x", "image_data": "data:image/png;base64,!!!"}, "base64"),
    ({"prompt": "x", "sampling_params": {"temperature": -1}}, "temperature"),
    ({"prompt": "<image> <image>", "image_data": [None]}, "image"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "audio"),
])
def test_bad_requests_raise_value_errors(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(**kwargs)


def test_repeated_image_hits_the_prefix_cache_and_flush_empties_it(engine):
    uri = png_data_uri(60, 30)
    first = engine.generate("<image>\ndescribe", GREEDY, image_data=uri)
    second = engine.generate("<image>\ndescribe", GREEDY, image_data=uri)
    assert second["meta_info"]["cached_tokens"] > 0
    assert second["output_ids"] == first["output_ids"]
    assert engine.flush_cache()
    third = engine.generate("<image>\ndescribe", GREEDY, image_data=uri)
    assert third["meta_info"]["cached_tokens"] == 0
