"""`python -m pyvlm` on the tiny LLaVA-1.5 and LLaVA-NeXT checkpoints with
the SGLang vision tutorial's templates (vicuna_v1.1 for LLaVA-v1.5/1.6,
llava_llama_3 for Llama3-LLaVA-NeXT, chatml-llava for LLaVA-NeXT of the
Yi/Qwen kind), called with the openai client: greedy answers about one and
two images are transformers' generate on the same prompt text (the
checkpoint's processor expanding the images). The authors' layout, served
with its family's default template, answers as its transformers twin."""

import pytest
import torch

from pyvlm.chat import named_template
from tests.server.test_qwen2_vl_server import data_uri, image_of
from tests.server.tiny_server import client_for, tiny_server

MAX_TOKENS = 12
SERVED = [  # (served checkpoint fixture, --chat-template, its transformers twin)
    ("llava", "vicuna_v1.1", "llava"),
    ("llava_next_mistral", "vicuna_v1.1", "llava_next_mistral"),
    ("llava_next_llama3", "llava_llama_3", "llava_next_llama3"),
    ("llava_next_mistral", "chatml-llava", "llava_next_mistral"),
    ("llava_original", None, "llava"),
]


@pytest.fixture(scope="module", params=SERVED, ids=lambda p: f"{p[0]}-{p[1] or 'default'}")
def served(request, tmp_path_factory):
    name, template, twin = request.param
    checkpoint = request.getfixturevalue(f"tiny_checkpoint_{name}")
    flags = ["--max-total-tokens", "8192"]
    if template:
        flags += ["--chat-template", template]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with tiny_server(checkpoint, flags, log) as base:
        yield base, template or "vicuna_v1.1", request.getfixturevalue(f"tiny_checkpoint_{twin}")


def answer_of(twin_dir, template: str, messages) -> str:
    """transformers' greedy answer: the named template's text, then the
    twin's own processor (image expansion, pixels) and generate."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(twin_dir), dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(twin_dir))
    text = named_template(template).render(messages).text
    images = [image_of(p["image_url"]["url"]) for m in messages for p in m["content"]
              if p["type"] == "image_url"]
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                                      skip_special_tokens=True)


def image_part(height, width):
    return {"type": "image_url", "image_url": {"url": data_uri(height, width)}}


def test_answers_are_transformers_tokens(served):
    base, template, twin_dir = served
    text = lambda words: {"type": "text", "text": words}  # noqa: E731
    # square images: the authors' pad-to-square leaves them as they are
    conversations = [
        [{"role": "user", "content": [image_part(100, 100), text("what is in the image?")]}],
        [{"role": "user", "content": [text("compare"), image_part(120, 120), text("and"),
                                      image_part(60, 60)]}],
    ]
    client = client_for(base)
    answers = []
    for messages in conversations:
        answers.append(answer_of(twin_dir, template, messages))
        response = client.chat.completions.create(model="tiny", messages=messages,
                                                  max_tokens=MAX_TOKENS, temperature=0)
        assert response.choices[0].message.content == answers[-1]
    # the random model may stop at once on fresh images; not on all of them
    assert any(answers), answers
