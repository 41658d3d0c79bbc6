"""`python -m pyvlm` serving the tiny Llama-3.2-Vision (mllama) checkpoint,
called with the official openai client: with SGLang's `llama_3_vision`
template and with the checkpoint's own Jinja template, greedy answers about
one image, two images and an image in an earlier turn are transformers'
tokens (plain and streamed); prompts whose image K/V cannot fit the pool
and too many images get a 400 naming the cause."""

import pytest
import requests
import torch

from pyvlm.chat import named_template
from tests.server.test_qwen2_vl_server import data_uri, image_of
from tests.server.tiny_server import client_for, tiny_server

MAX_TOKENS = 12
POOL_TOKENS = 1024


@pytest.fixture(scope="module", params=["llama_3_vision", "checkpoint"])
def server(request, tiny_checkpoint_mllama, tmp_path_factory):
    flags = ["--max-total-tokens", str(POOL_TOKENS), "--limit-mm-per-prompt", "3"]
    if request.param != "checkpoint":
        flags += ["--chat-template", request.param]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with tiny_server(tiny_checkpoint_mllama, flags, log) as base:
        yield base, request.param


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_mllama):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_checkpoint_mllama),
                                                        dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint_mllama))

    def answer(messages, template: str) -> str:
        """transformers' greedy answer: the prompt rendered by the named
        template (SGLang's text) or the checkpoint's, then MllamaProcessor."""
        hf_messages = [{"role": m["role"], "content": [
            {"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
            for m in messages]
        if template == "checkpoint":
            text = processor.apply_chat_template(hf_messages, add_generation_prompt=True)
        else:
            text = named_template(template).render(messages).text
        images = [image_of(p["image_url"]["url"]) for m in messages for p in m["content"]
                  if p["type"] == "image_url"]
        # add_special_tokens=False, as the model card calls it: the processor
        # itself puts BOS where the text has none (the tokenizer's would double it)
        inputs = processor(text=text, images=images or None, return_tensors="pt",
                           add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        return processor.tokenizer.decode(new, skip_special_tokens=True)

    return answer


def image_part(height, width):
    return {"type": "image_url", "image_url": {"url": data_uri(height, width)}}


def user(*parts):
    return {"role": "user", "content": list(parts)}


def conversations():
    text = lambda words: {"type": "text", "text": words}  # noqa: E731
    one = [user(image_part(90, 120), text("what is in the image?"))]
    two = [user(text("compare"), image_part(40, 200), text("and"), image_part(150, 60))]
    earlier = [user(image_part(70, 70), text("describe it")),
               {"role": "assistant", "content": [text("a cat on a mat")]},
               user(text("and what colour is it?"))]
    return one, two, earlier


def test_answers_are_transformers_tokens(server, reference):
    base, template = server
    client = client_for(base)
    answers = []
    for messages in conversations():
        answers.append(reference(messages, template))
        response = client.chat.completions.create(model="tiny", messages=messages,
                                                  max_tokens=MAX_TOKENS, temperature=0)
        assert response.choices[0].message.content == answers[-1]
    # the random model may stop at once on fresh images; not on all of them
    assert any(answers), answers
    messages = conversations()[0]
    streamed = client.chat.completions.create(model="tiny", messages=messages,
                                              max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert ("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            == reference(messages, template))


def refusal(base, messages):
    body = {"model": "tiny", "messages": messages, "max_tokens": MAX_TOKENS}
    response = requests.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    return response.status_code, response.json()["error"]["message"]


def test_too_many_images_and_image_kv_over_the_pool_are_400s(server, tiny_checkpoint_mllama):
    from transformers import AutoTokenizer

    base, template = server
    status, message = refusal(base, [user(*[image_part(30, 30)] * 4)])
    assert status == 400 and "image" in message and "3" in message
    # A prompt whose tokens fit the pool with two pages to spare, beside a
    # 4-tile image whose K/V take 17 pages (68 rows over 4 rows a page), is
    # refused naming both; 80 tokens fewer (20 pages) it is served.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint_mllama))
    image = image_part(120, 120)

    def num_tokens(words):
        messages = [user(image, {"type": "text", "text": words})]
        if template == "checkpoint":
            return len(tokenizer.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words}]}],
                add_generation_prompt=True, tokenize=True, return_dict=False))
        return len(tokenizer(named_template(template).render(messages).text)["input_ids"])

    num_words = 300
    while num_tokens("cat " * num_words) + 1 <= POOL_TOKENS - 8:
        num_words += 1
    words = {"type": "text", "text": "cat " * (num_words - 1)}
    status, message = refusal(base, [user(image, words)])
    assert status == 400 and str(POOL_TOKENS) in message and "17 pages" in message, message
    shorter = {"type": "text", "text": "cat " * (num_words - 41)}
    response = client_for(base).chat.completions.create(
        model="tiny", messages=[user(image, shorter)], max_tokens=1)
    assert response.choices[0].finish_reason in ("stop", "length")
