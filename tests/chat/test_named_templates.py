"""The named templates against SGLang's formats: literal golden prompts
worked out from SGLang's conversation.py, and random conversations compared
with an independent transcription of SGLang's code (sglang_reference)."""

import random

import pytest

from pyvlm.chat import NAMED_TEMPLATES, ChatTemplateError, ImageRef, named_template
from tests.chat import sglang_reference

QUESTION = "What is in this image?"
VISION_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the "
                 "visual content that the user provides, and assist the user with a variety of "
                 "tasks using natural language.")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")


def image(url):
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


def text(value):
    return {"type": "text", "text": value}


ONE_IMAGE = [{"role": "user", "content": [image("http://h/a.jpg"), text(QUESTION)]}]

ONE_IMAGE_GOLDEN = {
    "chatml-llava": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                     "<|im_start|>user\n<image>\nWhat is in this image?<|im_end|>\n"
                     "<|im_start|>assistant\n"),
    "qwen2-vl": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|>What is in this image?<|im_end|>\n"
                 "<|im_start|>assistant\n"),
    "vicuna_v1.1": VICUNA_SYSTEM + " USER: <image>\nWhat is in this image? ASSISTANT:",
    "llama_3_vision": ("<|start_header_id|>system<|end_header_id|>\n\n" + VISION_SYSTEM +
                       "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<|image|>\n"
                       "What is in this image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llava_llama_3": ("<|start_header_id|>system<|end_header_id|>\n\n" + VISION_SYSTEM +
                      "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\n"
                      "What is in this image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
}

STOP_STRINGS = {"chatml-llava": ("<|endoftext|>", "<|im_end|>"), "qwen2-vl": ("<|im_end|>",),
                "vicuna_v1.1": (), "llama_3_vision": ("<|end_of_text|>", "<|eot_id|>"),
                "llava_llama_3": ("<|end_of_text|>", "<|eot_id|>")}

# A custom system message, two user turns with images interleaved with text
# in different orders, and an assistant turn in between.
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [text("Compare "), image("http://h/a.jpg"), text(" and "),
                                 image("data:image/png;base64,AAAA")]},
    {"role": "assistant", "content": "Both are cats."},
    {"role": "user", "content": [image("http://h/c.jpg"), text(" And this one? ")]},
]

MULTI_TURN_GOLDEN = {
    "chatml-llava": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompare <image>\n"
                     " and <image>\n<|im_end|>\n<|im_start|>assistant\nBoth are cats.<|im_end|>\n"
                     "<|im_start|>user\n<image>\n And this one? <|im_end|>\n<|im_start|>assistant\n"),
    "qwen2-vl": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompare "
                 "<|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|>"
                 "<|vision_end|><|im_end|>\n<|im_start|>assistant\nBoth are cats.<|im_end|>\n"
                 "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|> And this one? "
                 "<|im_end|>\n<|im_start|>assistant\n"),
    "vicuna_v1.1": ("Be brief. USER: Compare <image>\n and <image>\n ASSISTANT: Both are cats.</s>"
                    "USER: <image>\n And this one?  ASSISTANT:"),
    # Llama 3 formats strip each message (the trailing image newline too).
    "llama_3_vision": ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                       "<|start_header_id|>user<|end_header_id|>\n\nCompare <|image|>\n and <|image|>"
                       "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nBoth are cats."
                       "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<|image|>\n And this one?"
                       "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
}
MULTI_TURN_GOLDEN["llava_llama_3"] = MULTI_TURN_GOLDEN["llama_3_vision"].replace("<|image|>", "<image>")
MULTI_TURN_REFS = [ImageRef("http://h/a.jpg", "messages[1].content[1].image_url"),
                   ImageRef("data:image/png;base64,AAAA", "messages[1].content[3].image_url"),
                   ImageRef("http://h/c.jpg", "messages[3].content[0].image_url")]


def in_process(messages, objects):
    """messages with each image_url part replaced by an in-process
    {"type": "image", "image": ...} part holding the next of objects."""
    objects, converted = iter(objects), []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": next(objects)} if p["type"] == "image_url" else p
                       for p in content]
        converted.append(dict(m, content=content))
    return converted


@pytest.mark.parametrize("name", sorted(MULTI_TURN_GOLDEN))
def test_in_process_image_parts_render_like_image_url_parts(name):
    objects = [object(), b"\x89PNG", "http://h/x.png"]  # the media loader judges them, not the template
    rendered = named_template(name).render(in_process(MULTI_TURN, objects))
    assert rendered.text == MULTI_TURN_GOLDEN[name]
    assert [ref.source for ref in rendered.image_refs] == objects
    assert [ref.param for ref in rendered.image_refs] == [
        r.param.replace(".image_url", ".image") for r in MULTI_TURN_REFS]


def test_all_five_templates_are_named():
    assert set(NAMED_TEMPLATES) == set(ONE_IMAGE_GOLDEN)


@pytest.mark.parametrize("name", sorted(ONE_IMAGE_GOLDEN))
def test_default_system_and_one_image(name):
    rendered = named_template(name).render(ONE_IMAGE)
    assert rendered.text == ONE_IMAGE_GOLDEN[name]
    assert rendered.image_refs == [ImageRef("http://h/a.jpg", "messages[0].content[0].image_url")]
    assert rendered.stop == STOP_STRINGS[name] == named_template(name).stop_strings


@pytest.mark.parametrize("name", sorted(MULTI_TURN_GOLDEN))
def test_custom_system_multi_turn_and_interleaved_images(name):
    rendered = named_template(name).render(MULTI_TURN)
    assert rendered.text == MULTI_TURN_GOLDEN[name]
    assert rendered.image_refs == MULTI_TURN_REFS


@pytest.mark.parametrize("name", ["chatml-llava", "qwen2-vl"])
def test_chatml_formats_always_emit_the_system_block(name):
    rendered = named_template(name).render([{"role": "system", "content": ""},
                                            {"role": "user", "content": "hi"}])
    assert rendered.text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi")


@pytest.mark.parametrize("name", ["llama_3_vision", "llava_llama_3"])
def test_llama3_formats_drop_an_empty_system_block(name):
    rendered = named_template(name).render([{"role": "system", "content": ""},
                                            {"role": "user", "content": " hi "}])
    assert rendered.text == ("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_without_generation_prompt_the_assistant_turn_stays_closed():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = named_template("chatml-llava").render(messages, add_generation_prompt=False)
    assert rendered.text.endswith("<|im_start|>assistant\nyo<|im_end|>\n")


# --- random conversations against the SGLang transcription -------------------

TEXTS = ["Describe it.", " padded text ", "line\nbreak", "", "é ü 漢字", "What is here?", "\n"]


def random_user_content(rng):
    if rng.random() < 0.3:
        return rng.choice(TEXTS)
    parts = [text(rng.choice(TEXTS)) for _ in range(rng.randint(0, 3))]
    for _ in range(rng.randint(0, 3)):
        parts.insert(rng.randint(0, len(parts)), image(f"http://img/{rng.randint(0, 99)}.png"))
    return parts or [text("x")]


def random_conversation(rng):
    messages = []
    if rng.random() < 0.6:
        system = rng.choice(["Be brief.", " sys ", ""])
        messages.append({"role": "system", "content": system if rng.random() < 0.5 else [text(system)]})
    for turn in range(rng.randint(1, 4)):
        if turn:
            answer = rng.choice(TEXTS[:3])
            messages.append({"role": "assistant", "content": answer if rng.random() < 0.5 else [text(answer)]})
        messages.append({"role": "user", "content": random_user_content(rng)})
    return messages


def test_random_conversations_match_sglang():
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for _ in range(300):
        name, messages = rng.choice(NAMED_TEMPLATES), random_conversation(rng)
        expected_text, expected_urls, expected_stop = sglang_reference.generate_prompt(name, messages)
        rendered = named_template(name).render(messages)
        context = f"seed={seed} template={name} messages={messages}"
        assert rendered.text == expected_text, context
        assert [ref.source for ref in rendered.image_refs] == expected_urls, context
        assert rendered.stop == expected_stop, context


# --- errors --------------------------------------------------------------------

BAD_MESSAGES = [
    ({"role": "user"}, "messages must be a list"),
    ([], "must not be empty"),
    (["hello"], "messages[0] must be an object"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content must be a string or a list"),
    ([{"role": "user", "content": None}], "messages[0].content must be a string or a list"),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content[0] must be an object"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [text("a"), {"type": "text", "text": 5}]}],
     "messages[0].content[1].text must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [{"type": "image"}]}], "messages[0].content[0].image must be"),
    ([{"role": "user", "content": [{"type": "image", "image": ""}]}],
     "messages[0].content[0].image must be"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": [image("http://h/x.png")]}],
     "messages[1]: a system message cannot hold images"),
    ([{"role": "user", "content": "look: <image>"}], "must not contain '<image>'"),
]


@pytest.mark.parametrize("messages,message_part", BAD_MESSAGES)
def test_invalid_messages_raise_errors_naming_the_field(messages, message_part):
    with pytest.raises(ChatTemplateError) as error:
        named_template("chatml-llava").render(messages)
    assert message_part in str(error.value)
    assert isinstance(error.value, ValueError)


def test_error_messages_carry_no_python_reprs():
    with pytest.raises(ChatTemplateError) as error:
        named_template("vicuna_v1.1").render([{"role": object(), "content": "x"}])
    assert "object at 0x" not in str(error.value) and "<" not in str(error.value)


def test_unknown_template_name_lists_the_known_ones():
    with pytest.raises(ChatTemplateError, match="chatml-llava"):
        named_template("chatml")
