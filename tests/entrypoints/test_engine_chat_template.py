"""Which chat template an Engine renders messages with, resolved once at
startup as the server resolves it: chat_template= (a name or a Jinja file),
else the checkpoint's Jinja template, else the architecture's default."""

import shutil

import pytest

import pyvlm
from pyvlm.chat import ChatTemplateError, named_template
from pyvlm.scheduling.types import SamplingParams

ENGINE_ARGS = dict(device="cpu", page_size=4, max_total_tokens=1024, context_length=256)
MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "the cat sat"},
            {"role": "assistant", "content": "on the mat"},
            {"role": "user", "content": "and then?"}]
# A file template unlike both the checkpoint's and every named one.
FILE_TEMPLATE = ("{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


def prompt_ids(engine, messages=MESSAGES):
    request = engine.builder.from_messages(messages, SamplingParams())
    engine.discard(request)
    return request.prompt_ids


def text_ids(engine, text):
    return engine.state.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_without_a_checkpoint_template_the_architectures_default_is_used(
        tiny_checkpoint_qwen2, tmp_path):
    folder = tmp_path / "no_template"
    shutil.copytree(tiny_checkpoint_qwen2, folder)
    (folder / "chat_template.jinja").unlink()
    with pyvlm.Engine(model=str(folder), **ENGINE_ARGS) as engine:
        assert engine.chat_template.name == "chatml-llava"  # LlavaOnevisionForConditionalGeneration's
        expected = named_template("chatml-llava").render(MESSAGES).text
        assert prompt_ids(engine) == text_ids(engine, expected)


def test_a_jinja_file_replaces_the_checkpoints_template(tiny_checkpoint_qwen2, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text(FILE_TEMPLATE)
    with pyvlm.Engine(model=str(tiny_checkpoint_qwen2), chat_template=str(path),
                      **ENGINE_ARGS) as engine:
        assert engine.chat_template.name == "plain.jinja"
        expected = ("[system] be brief\n[user] the cat sat\n[assistant] on the mat\n"
                    "[user] and then?\n[assistant] ")
        assert prompt_ids(engine) == text_ids(engine, expected)
        assert engine.chat_template.stop_strings == ()


@pytest.mark.parametrize("option, message", [("chatml", "neither a named template"),
                                             ("/nonexistent/t.jinja", "neither a named template")])
def test_a_bad_chat_template_fails_the_engine_at_startup(tiny_checkpoint_qwen2, option, message):
    with pytest.raises(ChatTemplateError, match=message) as info:
        pyvlm.Engine(model=str(tiny_checkpoint_qwen2), chat_template=option, **ENGINE_ARGS)
    assert "chatml-llava" in str(info.value)  # it lists the named templates
