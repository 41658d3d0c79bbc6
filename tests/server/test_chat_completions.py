"""POST /v1/chat/completions through App with a real engine: parity with
pyvlm.Engine, OpenAI's schema, streaming rules, n > 1, logprobs, stops."""

import base64
import io
import math

import numpy as np
from PIL import Image

from tests.server.conftest import call

GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}


def png_data_uri(height=40, width=50) -> str:
    pixels = np.random.randint(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_messages(uri):
    return [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "what is"},
                                         {"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": "this?"}]}]


def engine_answer(app, engine, messages, params):
    rendered = app.render_chat(messages)
    images = [ref.source for ref in rendered.image_refs]
    return engine.generate(rendered.text, params, image_data=images or None)


def test_greedy_answer_equals_the_engines_and_matches_the_schema(app, engine):
    messages = image_messages(png_data_uri())
    status, _, body = call(app, "POST", "/v1/chat/completions",
                           dict(GREEDY, model="tiny", messages=messages))
    assert status == 200, body
    expected = engine_answer(app, engine, messages, {"max_new_tokens": 8, "temperature": 0,
                                                     "ignore_eos": True})
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": expected["text"]},
                      "logprobs": None, "finish_reason": "length"}
    usage = body["usage"]
    assert usage["completion_tokens"] == 8 and "prompt_tokens_details" not in usage
    assert usage["prompt_tokens"] == expected["meta_info"]["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8


def test_stream_follows_the_openai_rules_and_equals_the_non_stream_text(app):
    messages = image_messages(png_data_uri())
    _, _, whole = call(app, "POST", "/v1/chat/completions", dict(GREEDY, messages=messages))
    status, headers, events = call(app, "POST", "/v1/chat/completions", dict(
        GREEDY, messages=messages, stream=True, stream_options={"include_usage": True}))
    assert status == 200
    assert events[-1] == (None, "[DONE]")
    chunks = [data for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk, choice_chunks = chunks[-1], chunks[:-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in choice_chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in choice_chunks
                if c["choices"][0]["finish_reason"] is not None]
    assert finishes == ["length"] and choice_chunks[-1]["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in choice_chunks)
    assert text == whole["choices"][0]["message"]["content"]


def test_n_choices_sum_completion_tokens_and_seeds_reproduce(app):
    body = {"messages": [{"role": "user", "content": "the cat"}], "n": 3, "seed": 7,
            "temperature": 1.0, "max_tokens": 6, "ignore_eos": True}
    _, _, first = call(app, "POST", "/v1/chat/completions", body)
    _, _, again = call(app, "POST", "/v1/chat/completions", body)
    _, _, other = call(app, "POST", "/v1/chat/completions", dict(body, seed=8))
    texts = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert first["usage"]["completion_tokens"] == 18
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert texts != [c["message"]["content"] for c in other["choices"]]
    assert len(set(texts)) > 1  # each choice samples with its own seed


def test_n_choices_stream_one_finish_each(app):
    status, _, events = call(app, "POST", "/v1/chat/completions", dict(
        GREEDY, messages=[{"role": "user", "content": "a dog"}], n=2, stream=True))
    chunks = [data for _, data in events[:-1]]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert sum(c["finish_reason"] is not None for c in mine) == 1


def test_logprobs_carry_token_texts_sorted_top_lists(app, engine):
    status, _, body = call(app, "POST", "/v1/chat/completions", dict(
        GREEDY, messages=[{"role": "user", "content": "the cat sat"}], logprobs=True,
        top_logprobs=5))
    assert status == 200, body
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 8
    tokenizer = engine.state.tokenizer
    text = "".join(entry["token"] for entry in content)
    assert text == tokenizer.decode(tokenizer(body["choices"][0]["message"]["content"],
                                              add_special_tokens=False)["input_ids"])
    for entry in content:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert math.isclose(entry["logprob"], tops[0], abs_tol=1e-5)  # greedy = argmax
        assert entry["bytes"] == list(entry["token"].encode())
        assert sum(math.exp(t) for t in tops) <= 1.0 + 1e-4


def test_stop_string_cuts_the_text_and_reports_stop(app):
    messages = [{"role": "user", "content": "the cat sat"}]
    _, _, full = call(app, "POST", "/v1/chat/completions", dict(GREEDY, messages=messages,
                                                                max_tokens=12))
    text = full["choices"][0]["message"]["content"]
    stop = text[3:5]
    _, _, cut = call(app, "POST", "/v1/chat/completions",
                     dict(GREEDY, messages=messages, max_tokens=12, stop=[stop]))
    assert cut["choices"][0]["message"]["content"] == text[:text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    _, _, events = call(app, "POST", "/v1/chat/completions",
                        dict(GREEDY, messages=messages, max_tokens=12, stop=stop, stream=True))
    streamed = "".join(d["choices"][0]["delta"].get("content", "") for _, d in events[:-1])
    assert streamed == text[:text.index(stop)]


def test_cache_report_counts_cached_prompt_tokens(app_with):
    app = app_with(enable_cache_report=True)
    words = "the cat sat on a dog in red blue green".split()
    content = " ".join(np.random.choice(words, 24))  # fresh, so not cached by other tests
    messages = [{"role": "user", "content": content}]
    _, _, first = call(app, "POST", "/v1/chat/completions", dict(GREEDY, messages=messages))
    _, _, second = call(app, "POST", "/v1/chat/completions", dict(GREEDY, messages=messages))
    details = second["usage"]["prompt_tokens_details"]
    assert 0 < details["cached_tokens"] <= second["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < details["cached_tokens"]


def test_multi_turn_with_images_in_two_turns(app, engine):
    uri_a, uri_b = png_data_uri(30, 30), png_data_uri(60, 20)
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri_a}},
                                     {"type": "text", "text": "and"}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": [{"type": "text", "text": "now"},
                                     {"type": "image_url", "image_url": {"url": uri_b,
                                                                        "detail": "low"}}]}]
    _, _, body = call(app, "POST", "/v1/chat/completions", dict(GREEDY, messages=messages))
    expected = engine_answer(app, engine, messages, {"max_new_tokens": 8, "temperature": 0,
                                                     "ignore_eos": True})
    assert body["choices"][0]["message"]["content"] == expected["text"]
