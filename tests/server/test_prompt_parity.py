"""One prompt path: pyvlm.Engine's messages and POST /v1/chat/completions
over the same engine build the same request (prompt token ids, image items,
stop strings) from the same messages, with a named template and with the
checkpoint's Jinja template, with and without a tokenizer that adds a BOS,
and refuse the same messages and images with the same text."""

import asyncio
import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import pyvlm
from pyvlm.chat import ChatTemplateError, JinjaTemplate, named_template
from pyvlm.multimodal.media import MediaError
from pyvlm.server.app import App
from pyvlm.server.args import ServerArgs
from tests.server.conftest import ENGINE_ARGS, call
from tests.tiny_checkpoints import CHAT_TEMPLATE

CHAT = "/v1/chat/completions"
SAMPLING = {"max_new_tokens": 1, "temperature": 0}


class RecordingEngine:
    """The engine, keeping every request the server builds through it."""

    def __init__(self, engine):
        self._engine, self.built = engine, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def async_build(self, *args, **kwargs):
        request = await self._engine.async_build(*args, **kwargs)
        self.built.append(request)
        return request


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """allowed/ (the engine's and the server's allowed media path) and a
    PNG beside it, outside."""
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    Image.new("RGB", (8, 8)).save(root / "outside.png")
    return root


def add_bos(checkpoint, bos: str) -> None:
    """Makes the checkpoint's tokenizer prepend bos to every text it encodes
    with special tokens (as Llama tokenizers do)."""
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    ids = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    processor = tokenizer["post_processor"]
    processor["single"].insert(0, {"SpecialToken": {"id": bos, "type_id": 0}})
    processor["special_tokens"] = {bos: {"id": bos, "ids": [ids[bos]], "tokens": [bos]}}
    (checkpoint / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(dict(config, bos_token=bos)))


# (chat template, BOS): None is the checkpoint's own Jinja template
# (tests/tiny_checkpoints.py) or no BOS. Every prompt of both templates
# starts with <|im_start|>, so that BOS must not be doubled; <|endoftext|> is added.
@pytest.fixture(scope="module", params=[(None, None), ("chatml-llava", None),
                                        (None, "<|endoftext|>"), ("chatml-llava", "<|im_start|>")],
                ids=["checkpoint", "chatml-llava", "checkpoint+bos", "chatml-llava+bos"])
def served(request, tiny_checkpoint_qwen2, media_dir, tmp_path_factory):
    """(engine, recording engine, App) with one chat template, both sides
    allowing local media under media_dir/allowed."""
    template, bos = request.param
    checkpoint = tiny_checkpoint_qwen2
    if bos is not None:
        checkpoint = tmp_path_factory.mktemp("with_bos") / "checkpoint"
        shutil.copytree(tiny_checkpoint_qwen2, checkpoint)
        add_bos(checkpoint, bos)
    allowed = str(media_dir / "allowed")
    with pyvlm.Engine(model=str(checkpoint), chat_template=template,
                      allowed_local_media_path=allowed, **ENGINE_ARGS) as engine:
        assert engine.state.tokenizer.bos_token == bos
        recording = RecordingEngine(engine)
        app = App(recording, ServerArgs(model=str(checkpoint), served_model_name="tiny",
                                        chat_template=template, allowed_local_media_path=allowed))
        yield engine, recording, app


def reference_template(name):
    """The template built directly from pyvlm.chat, not through the engine."""
    if name is None:
        return JinjaTemplate(CHAT_TEMPLATE, "checkpoint")
    return named_template(name)


def png_data_uri(height, width) -> str:
    pixels = np.random.default_rng().integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text(value):
    return {"type": "text", "text": value}


def conversations():
    """Fresh images every run, of different sizes (so different token counts)."""
    a, b, c = png_data_uri(40, 50), png_data_uri(90, 30), png_data_uri(20, 70)
    return {
        "text only": [{"role": "user", "content": "the cat sat on the mat"}],
        "one image": [{"role": "user", "content": [image(a), text("what is this?")]}],
        "two images interleaved": [{"role": "user", "content": [
            text("compare"), image(a), text("with"), image(b), text("please")]}],
        "system message": [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": [text("what is"), image(c), text("this?")]}],
        "assistant turn": [{"role": "user", "content": [image(a), text("a cat?")]},
                           {"role": "assistant", "content": "yes, a cat"},
                           {"role": "user", "content": [text("and this one?"), image(b)]}],
    }


def engine_request(engine, messages):
    async def build():
        return await engine.async_build(messages=messages, sampling_params=SAMPLING)

    request = asyncio.run(build())
    engine.discard(request)
    return request


def server_request(app, recording, messages):
    status, _, body = call(app, "POST", CHAT, {"messages": messages, "max_tokens": 1,
                                               "temperature": 0})
    assert status == 200, body
    return recording.built[-1]


def expected_ids(tokenizer, text):
    """The text's ids, after the tokenizer's BOS unless the text begins with it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token
    return ids if bos is None or text.startswith(bos) else [tokenizer.bos_token_id] + ids


def collapsed(request, image_token_id):
    """The prompt ids with each image's span back to one placeholder."""
    ids = list(request.prompt_ids)
    for item in sorted(request.mm_items, key=lambda item: -item.offset):
        assert set(ids[item.offset:item.offset + item.length]) == {image_token_id}
        ids[item.offset:item.offset + item.length] = [image_token_id]
    return ids


@pytest.mark.parametrize("case", list(conversations()))
def test_the_engine_and_the_server_build_the_same_prompt(served, case):
    engine, recording, app = served
    messages = conversations()[case]
    ours, theirs = engine_request(engine, messages), server_request(app, recording, messages)
    assert ours.prompt_ids == theirs.prompt_ids
    assert [(i.hash, i.offset, i.length) for i in ours.mm_items] == [
        (i.hash, i.offset, i.length) for i in theirs.mm_items]
    assert ours.sampling.stop == theirs.sampling.stop
    # ... and it is the template's prompt: the one named, or the checkpoint's.
    name = engine.config.model.chat_template
    reference = reference_template(name).render(messages)
    assert collapsed(ours, engine.builder.image_token_id) == expected_ids(
        engine.state.tokenizer, reference.text)
    assert len(ours.mm_items) == len(reference.image_refs)
    assert ours.sampling.stop == reference.stop == (() if name is None else
                                                    ("<|endoftext|>", "<|im_end|>"))
    assert app.template is engine.chat_template


def test_template_stop_strings_come_after_the_callers(served):
    engine, _, _ = served
    messages = [{"role": "user", "content": "hi"}]
    request = asyncio.run(engine.async_build(messages=messages, sampling_params={
        "stop": ["<|im_end|>", "cat"], "max_new_tokens": 1}))
    engine.discard(request)
    template_stop = engine.chat_template.stop_strings
    assert request.sampling.stop == ("<|im_end|>", "cat") + tuple(
        s for s in template_stop if s not in ("<|im_end|>", "cat"))


def refused_by_both(served, messages, error_type):
    """(the engine's error, the server's error body) for messages."""
    engine, _, app = served
    with pytest.raises(error_type) as info:
        engine.generate(messages=messages, sampling_params=SAMPLING)
    status, _, body = call(app, "POST", CHAT, {"messages": messages, "max_tokens": 1})
    return info.value, status, body["error"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.png", "http://10.0.0.1/x.png",
                                 "http://[::1]/x.png", "http://localhost/x.png"])
def test_a_private_address_url_is_refused_the_same_way(served, url):
    messages = [{"role": "user", "content": [text("look"), image(url)]}]
    error, status, answer = refused_by_both(served, messages, MediaError)
    assert status == 422 and answer["param"] == error.param == "messages[0].content[1].image_url"
    assert str(error) == f"{answer['param']}: {answer['message']}"
    assert "private" in answer["message"] or "loopback" in answer["message"]


@pytest.mark.parametrize("where", ["outside", "up", "missing"])
def test_a_local_path_outside_the_allowed_media_path_is_refused_the_same_way(
        served, media_dir, where):
    path = {"outside": str(media_dir / "outside.png"),
            "up": str(media_dir / "allowed" / ".." / "outside.png"),
            "missing": str(media_dir / "allowed" / "missing.png")}[where]
    for source in (path, f"file://{path}"):
        messages = [{"role": "user", "content": [image(source), text("what?")]}]
        error, status, answer = refused_by_both(served, messages, MediaError)
        assert status == 422 and answer["param"] == error.param
        assert str(error) == f"{answer['param']}: {answer['message']}"
        assert "inside the allowed media directory" in answer["message"]


def test_messages_the_template_refuses_are_refused_with_the_same_text(served):
    engine, _, _ = served
    cases = [[{"role": "user", "content": [image(png_data_uri(4, 4)), text("look: <image>")]}]]
    if engine.config.model.chat_template is not None:  # the checkpoint's renders these
        cases.append([{"role": "system", "content": [image(png_data_uri(4, 4))]},
                      {"role": "user", "content": "x"}])
    for messages in cases:
        error, status, answer = refused_by_both(served, messages, ChatTemplateError)
        assert status == 400 and str(error) == answer["message"]


def test_in_process_images_give_the_prompt_of_the_same_image_sent_as_a_url(served):
    engine, _, _ = served
    uri = png_data_uri(50, 40)
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    encoded = base64.b64decode(uri.split(",", 1)[1])
    by_url = engine_request(engine, [{"role": "user", "content": [image(uri), text("what?")]}])
    keys = []
    for obj in (decoded, encoded):
        in_process = engine_request(engine, [{"role": "user", "content": [
            {"type": "image", "image": obj}, text("what?")]}])
        assert in_process.prompt_ids == by_url.prompt_ids
        keys.append([i.hash for i in in_process.mm_items])
    # Cache keys (pyvlm/multimodal/hashing.py): the same bytes get the URL's;
    # a PIL image is keyed by its pixels, a miss where the URL's could hit.
    assert keys[1] == [i.hash for i in by_url.mm_items] != keys[0]
