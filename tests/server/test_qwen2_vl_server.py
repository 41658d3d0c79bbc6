"""`python -m pyvlm` serving the tiny Qwen2-VL checkpoint, called with the
official openai client: with SGLang's `qwen2-vl` template and with the
checkpoint's own Jinja template, greedy answers about one and two images
are transformers' tokens; per-request mm_processor_kwargs change the image's
tokens; tiny images, unknown processor settings and over-long prompts get
the answers a user expects (200, 400, 400), never a 500."""

import base64
import io
import pytest
import requests
import torch
from PIL import Image

from tests.hf_reference import qwen2_vl_inputs, qwen2_vl_processor
from tests.server.tiny_server import client_for, tiny_server

MAX_TOKENS = 12


def data_uri(height: int, width: int) -> str:
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_of(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


@pytest.fixture(scope="module", params=["qwen2-vl", "checkpoint"])
def server(request, tiny_checkpoint_qwen2_vl, tmp_path_factory):
    flags = ["--max-total-tokens", "4096", "--context-length", "256"]
    if request.param != "checkpoint":
        flags += ["--chat-template", request.param]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with tiny_server(tiny_checkpoint_qwen2_vl, flags, log) as base:
        yield base


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_qwen2_vl):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_checkpoint_qwen2_vl),
                                                        dtype=torch.float32).eval()
    processor = qwen2_vl_processor(tiny_checkpoint_qwen2_vl)

    def answer(parts) -> str:
        """transformers' greedy answer to one user message of parts."""
        content = [{"type": "image"} if p["type"] == "image_url" else p for p in parts]
        text = processor.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
        images = [image_of(p["image_url"]["url"]) for p in parts if p["type"] == "image_url"]
        inputs = qwen2_vl_inputs(processor, text, images)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        return processor.tokenizer.decode(new, skip_special_tokens=True)

    return answer


def ask(base, parts, **extra):
    response = client_for(base).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=MAX_TOKENS,
        temperature=0, **extra)
    return response


def test_answers_are_transformers_tokens(server, reference):
    one = [{"type": "image_url", "image_url": {"url": data_uri(90, 120)}},
           {"type": "text", "text": "what is in the image?"}]
    two = [{"type": "text", "text": "compare"},
           {"type": "image_url", "image_url": {"url": data_uri(40, 200)}},
           {"type": "text", "text": "and"},
           {"type": "image_url", "image_url": {"url": data_uri(150, 60)}}]
    answers = [reference(parts) for parts in (one, two)]
    assert all(answers), answers  # the random model says something before its EOS
    for parts, answer in zip((one, two), answers):
        assert ask(server, parts).choices[0].message.content == answer
    streamed = client_for(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": one}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answers[0]


def test_request_processor_settings_change_the_image_tokens(server):
    parts = [{"type": "image_url", "image_url": {"url": data_uri(200, 200)}},
             {"type": "text", "text": "what?"}]
    default = ask(server, parts).usage.prompt_tokens
    smaller = ask(server, parts, extra_body={"mm_processor_kwargs": {"max_pixels": 56 * 56}})
    # 200x200 within the checkpoint's 50,176 pixels: 7x7 merged tokens; at
    # 3,136 pixels: 2x2 merged tokens.
    assert default - smaller.usage.prompt_tokens == 49 - 4


def test_tiny_images_are_resized_up_not_refused(server):
    for height, width in ((1, 1), (27, 5), (3, 300)):
        parts = [{"type": "image_url", "image_url": {"url": data_uri(height, width)}},
                 {"type": "text", "text": "what?"}]
        assert ask(server, parts).choices[0].finish_reason in ("stop", "length")


def refusal(base, parts, **fields):
    body = {"model": "tiny", "messages": [{"role": "user", "content": parts}],
            "max_tokens": MAX_TOKENS, **fields}
    response = requests.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    return response.status_code, response.json()["error"]["message"]


def test_bad_settings_and_long_prompts_are_400s_naming_the_cause(server):
    image = {"type": "image_url", "image_url": {"url": data_uri(64, 64)}}
    status, message = refusal(server, [image], mm_processor_kwargs={"max_pixel": 1})
    assert status == 400 and "max_pixel" in message
    status, message = refusal(server, [image], mm_processor_kwargs={"min_pixels": 10**9})
    assert status == 400 and "min_pixels" in message
    status, message = refusal(server, [{"type": "image_url", "image_url": {
        "url": data_uri(10, 2100)}}])
    assert status == 400 and "aspect ratio" in message
    # 224x224 after resizing: 64 tokens each, 320 for five, over the 256 of the context.
    many = [{"type": "image_url", "image_url": {"url": data_uri(220, 220)}}] * 5
    status, message = refusal(server, many)
    assert status == 400 and "256" in message and "image 1" in message
