"""Jinja chat templates against transformers' own rendering
(tokenizer.apply_chat_template), images included, plus the sandbox, errors
and template resolution."""

import json
import random

import pytest
from transformers import AutoTokenizer

from pyvlm.chat import ChatTemplateError, JinjaTemplate, NamedTemplate, resolve_template
from tests.chat.test_named_templates import image, random_conversation, text

# Qwen2-VL-Instruct's template (namespace counters, `is string`, image keys).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# A text-only Llama-3-style template: prints content as a string, reads bos_token.
TEXT_ONLY_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint_qwen2):
    return AutoTokenizer.from_pretrained(str(tiny_checkpoint_qwen2))


@pytest.fixture(scope="module")
def checkpoint_source(tiny_checkpoint_qwen2):
    return (tiny_checkpoint_qwen2 / "chat_template.jinja").read_text()


def hf_messages(messages, as_parts=True):
    """The same conversation as a transformers user writes it."""
    def part(p):
        return {"type": "image"} if p["type"] == "image_url" else {"type": "text", "text": p["text"]}

    converted = []
    for m in messages:
        content = m["content"]
        if as_parts:
            content = [text(content)] if isinstance(content, str) else [part(p) for p in content]
        elif not isinstance(content, str):
            content = "".join(p["text"] for p in content)
        converted.append({"role": m["role"], "content": content})
    return converted


def reference(tokenizer, source, messages, add_generation_prompt=True, as_parts=True):
    return tokenizer.apply_chat_template(hf_messages(messages, as_parts), chat_template=source,
                                         tokenize=False, add_generation_prompt=add_generation_prompt)


def checkpoint_template(tokenizer, source, **kwargs):
    return resolve_template(None, source, ["LlavaOnevisionForConditionalGeneration"],
                            template_vars=tokenizer.special_tokens_map, **kwargs)


MULTI_IMAGE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [text("Compare"), image("http://h/a.jpg"), image("http://h/b.jpg")]},
    {"role": "assistant", "content": "Both are cats."},
    {"role": "user", "content": [image("http://h/c.jpg"), text("And this?")]},
]


def test_checkpoint_template_with_images_matches_transformers(tokenizer, checkpoint_source):
    template = checkpoint_template(tokenizer, checkpoint_source)
    assert isinstance(template, JinjaTemplate) and template.name == "checkpoint"
    rendered = template.render(MULTI_IMAGE)
    assert rendered.text == reference(tokenizer, checkpoint_source, MULTI_IMAGE)
    assert rendered.text.count("<image>") == 3
    assert [r.source for r in rendered.image_refs] == ["http://h/a.jpg", "http://h/b.jpg", "http://h/c.jpg"]
    assert rendered.image_refs[2].param == "messages[3].content[0].image_url"


def test_string_contents_are_not_lost_to_part_list_templates(tokenizer, checkpoint_source):
    # The OneVision template only reads content parts; a string content must
    # reach it as a text part, as a transformers user would write it.
    messages = [{"role": "user", "content": "Hello there"}]
    rendered = checkpoint_template(tokenizer, checkpoint_source).render(messages)
    assert "Hello there" in rendered.text
    assert rendered.text == reference(tokenizer, checkpoint_source, messages)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_random_conversations_match_transformers(tokenizer, checkpoint_source, add_generation_prompt):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    sources = {"checkpoint": (checkpoint_source, "<image>"),
               "qwen2-vl": (QWEN2_VL_TEMPLATE, "<|image_pad|>")}
    templates = {name: checkpoint_template(tokenizer, source, image_token=token)
                 for name, (source, token) in sources.items()}
    for _ in range(60):
        name, messages = rng.choice(sorted(sources)), random_conversation(rng)
        rendered = templates[name].render(messages, add_generation_prompt=add_generation_prompt)
        expected = reference(tokenizer, sources[name][0], messages, add_generation_prompt)
        assert rendered.text == expected, f"seed={seed} template={name} messages={messages}"
        assert len(rendered.image_refs) == sum(
            isinstance(m["content"], list) and sum(p["type"] == "image_url" for p in m["content"])
            for m in messages)


def test_text_only_template_gets_strings_and_special_tokens(tokenizer):
    template = JinjaTemplate(TEXT_ONLY_TEMPLATE, "text-only", template_vars={"bos_token": "<BOS>"})
    messages = [{"role": "system", "content": [text(" Be "), text("brief. ")]},
                {"role": "user", "content": "  hi  "}]
    rendered = template.render(messages)
    expected = tokenizer.apply_chat_template(hf_messages(messages, as_parts=False),
                                             chat_template=TEXT_ONLY_TEMPLATE, bos_token="<BOS>",
                                             tokenize=False, add_generation_prompt=True)
    assert rendered.text == expected and rendered.text.startswith("<BOS><|start_header_id|>system")


def test_text_only_template_refuses_images():
    template = JinjaTemplate(TEXT_ONLY_TEMPLATE, "text-only")
    with pytest.raises(ChatTemplateError, match=r"messages\[0\].*cannot place images"):
        template.render([{"role": "user", "content": [image("http://h/a.png"), text("hi")]}])


def test_template_that_drops_images_is_refused():
    source = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
              "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="placed 0 of 1 images"):
        JinjaTemplate(source, "lossy").render([{"role": "user", "content": [image("http://h/a.png")]}])


def test_tojson_does_not_escape_html_like_transformers(tokenizer):
    source = "{{ messages[0]['content'] | tojson }}"
    messages = [{"role": "user", "content": "<b>é & ü</b>"}]
    rendered = JinjaTemplate(source, "json").render(messages, add_generation_prompt=False)
    assert rendered.text == reference(tokenizer, source, messages, False, as_parts=False)
    assert rendered.text == json.dumps("<b>é & ü</b>", ensure_ascii=False)


def test_raise_exception_becomes_a_chat_template_error():
    source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="first turn must be user"):
        JinjaTemplate(source, "strict").render([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("source", ["{{ ''.__class__.__mro__[1].__subclasses__() }}",
                                    "{% set ns = namespace(_x=1) %}{{ ns }}",
                                    "{{ messages.append(1) }}"])
def test_sandbox_refuses_escapes(source):
    with pytest.raises(ChatTemplateError):
        JinjaTemplate(source, "evil").render([{"role": "user", "content": "x"}])


def test_syntax_errors_are_reported_at_load():
    with pytest.raises(ChatTemplateError, match="syntax error on line 1"):
        JinjaTemplate("{% for m in messages %}", "broken")


# --- resolution ---------------------------------------------------------------

def test_chat_template_option_names_a_template_or_a_file(tmp_path, checkpoint_source):
    assert resolve_template("qwen2-vl", checkpoint_source, []).name == "qwen2-vl"
    jinja_path = tmp_path / "t.jinja"
    jinja_path.write_text(TEXT_ONLY_TEMPLATE)
    from_jinja = resolve_template(str(jinja_path), checkpoint_source, [])
    assert isinstance(from_jinja, JinjaTemplate) and from_jinja.source == TEXT_ONLY_TEMPLATE
    assert from_jinja.name == "t.jinja"  # no server paths in client-facing errors
    json_path = tmp_path / "chat_template.json"
    json_path.write_text(json.dumps({"chat_template": checkpoint_source}))
    assert resolve_template(str(json_path), None, []).source == checkpoint_source
    with pytest.raises(ChatTemplateError, match="neither a named template"):
        resolve_template("no-such-template", checkpoint_source, [])
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ChatTemplateError, match="chat_template"):
        resolve_template(str(tmp_path / "bad.json"), None, [])


@pytest.mark.parametrize("architecture,text_config,name", [
    ("LlavaOnevisionForConditionalGeneration", None, "chatml-llava"),
    ("Qwen2VLForConditionalGeneration", None, "qwen2-vl"),
    ("Qwen2_5_VLForConditionalGeneration", None, "qwen2-vl"),
    ("MllamaForConditionalGeneration", None, "llama_3_vision"),
    ("LlavaForConditionalGeneration", None, "vicuna_v1.1"),
    ("LlavaNextForConditionalGeneration", None, "vicuna_v1.1"),
    ("LlavaNextForConditionalGeneration", {"model_type": "llama", "vocab_size": 32064}, "vicuna_v1.1"),
    ("LlavaNextForConditionalGeneration", {"model_type": "llama", "vocab_size": 128256}, "llava_llama_3"),
    ("LlavaNextForConditionalGeneration", {"model_type": "qwen2", "vocab_size": 152064}, "chatml-llava"),
])
def test_default_template_per_architecture(architecture, text_config, name):
    template = resolve_template(None, None, [architecture], text_config=text_config)
    assert isinstance(template, NamedTemplate) and template.name == name


def test_no_template_anywhere_is_an_error():
    with pytest.raises(ChatTemplateError, match="pass --chat-template"):
        resolve_template(None, None, ["GPT2LMHeadModel"])
