"""Every bad input gets its status and an OpenAI-shaped body, and the
server keeps serving afterwards."""

import asyncio

import pytest

from tests.server.conftest import acall, call
from tests.server.test_chat_completions import png_data_uri

CHAT = "/v1/chat/completions"
OK_BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


def assert_openai_error(status, body, expected_status, param=None):
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


def assert_still_serving(app):
    assert call(app, "GET", "/health")[0] == 200
    status, _, body = call(app, "POST", CHAT, OK_BODY)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


BAD_BODIES = [
    (b"{not json", None),
    (b"[1, 2]", None),
    (dict(OK_BODY, tools=[{"type": "function"}]), "tools"),
    (dict(OK_BODY, response_format={"type": "json_object"}), "response_format"),
    (dict(OK_BODY, frobnicate=1), "frobnicate"),
    (dict(OK_BODY, temperature=3.5), "temperature"),
    (dict(OK_BODY, temperature="hot"), "temperature"),
    (dict(OK_BODY, top_p=0), "top_p"),
    (dict(OK_BODY, n=True), "n"),
    (dict(OK_BODY, max_tokens=0), "max_tokens"),
    (dict(OK_BODY, top_logprobs=3), "top_logprobs"),
    (dict(OK_BODY, logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(OK_BODY, stop=[""]), "stop"),
    (dict(OK_BODY, logit_bias={"abc": 1}), "logit_bias"),
    (dict(OK_BODY, logit_bias={"999999": 1}), "logit_bias"),
    (dict(OK_BODY, stream_options={"include_usage": True}), "stream_options"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "messages[0].content[0].type"),
    # The in-process image part of pyvlm.Engine is not for remote clients.
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "/etc/passwd"}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url.url"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_chat_bodies_are_400_naming_the_field(app, body, param):
    status, _, answer = call(app, "POST", CHAT, body)
    assert_openai_error(status, answer, 400, param)


def test_after_bad_inputs_the_server_still_serves(app):
    for body, _ in BAD_BODIES[:5]:
        call(app, "POST", CHAT, body)
    assert_still_serving(app)


def test_unknown_model_is_404_and_default_is_accepted(app):
    status, _, body = call(app, "POST", CHAT, dict(OK_BODY, model="gpt-4"))
    assert_openai_error(status, body, 404, "model")
    assert call(app, "POST", CHAT, dict(OK_BODY, model="default"))[0] == 200


def test_routing_404_and_405_with_allow(app):
    status, _, body = call(app, "GET", "/nowhere")
    assert_openai_error(status, body, 404)
    status, headers, body = call(app, "GET", CHAT)
    assert_openai_error(status, body, 405)
    assert ("allow", "POST") in headers
    assert_openai_error(*call(app, "GET", "/metrics")[::2], 404)  # metrics off


def test_api_key_is_checked_everywhere_but_health(app_with):
    app = app_with(api_key="sekrit")
    assert call(app, "GET", "/health")[0] == 200
    for headers in ([], [("authorization", "Bearer wrong")], [("authorization", "sekrit")]):
        status, _, body = call(app, "GET", "/v1/models", headers=headers)
        assert_openai_error(status, body, 401)
    status, _, body = call(app, "POST", CHAT, OK_BODY, [("authorization", "Bearer sekrit")])
    assert status == 200
    # Without --api-key the header is ignored.
    assert call(app_with(), "GET", "/v1/models", headers=[("authorization", "Bearer x")])[0] == 200


def test_too_many_images_over_all_messages(app_with):
    app = app_with(limit_mm_per_prompt=2)
    part = {"type": "image_url", "image_url": {"url": png_data_uri(20, 20)}}
    messages = [{"role": "user", "content": [part, part]}, {"role": "assistant", "content": "x"},
                {"role": "user", "content": [part]}]
    status, _, body = call(app, "POST", CHAT, dict(OK_BODY, messages=messages))
    assert_openai_error(status, body, 400, "messages")
    assert "3 images" in body["error"]["message"]


def test_undecodable_image_is_422_naming_the_part(app):
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}
    body = dict(OK_BODY, messages=[{"role": "user", "content": [{"type": "text", "text": "x"},
                                                                  bad]}])
    status, _, answer = call(app, "POST", CHAT, body)
    assert_openai_error(status, answer, 422, "messages[0].content[1].image_url")
    assert_still_serving(app)


def test_prompt_too_long_names_both_numbers(app, engine):
    words = "cat dog " * 400
    for stream in (False, True):
        status, _, body = call(app, "POST", CHAT, dict(
            OK_BODY, stream=stream, messages=[{"role": "user", "content": words}]))
        assert_openai_error(status, body, 400)
        assert "512" in body["error"]["message"] and "tokens" in body["error"]["message"]
    assert_still_serving(app)


def test_queue_limit_gives_429_with_retry_after(app_with):
    app = app_with(max_running_requests=1, max_queued_requests=0)

    async def scenario():
        long_body = dict(OK_BODY, max_tokens=200, ignore_eos=True, stream=True)
        first = await app(__import__("tests.server.conftest", fromlist=["request"]).request(
            "POST", CHAT, long_body))
        status, headers, body = await acall(app, "POST", CHAT, OK_BODY)
        await first.body.aclose()  # the client goes away: frees its slot
        after = await acall(app, "POST", CHAT, OK_BODY)
        return status, headers, body, after[0]

    status, headers, body, status_after = asyncio.run(scenario())
    assert_openai_error(status, body, 429)
    assert any(k == "retry-after" for k, _ in headers)
    assert status_after == 200


def test_shutdown_makes_health_503_and_refuses_work(app):
    app.begin_shutdown()
    status, headers, body = call(app, "GET", "/health")
    assert_openai_error(status, body, 503)
    assert any(k == "retry-after" for k, _ in headers)
    assert_openai_error(*call(app, "POST", CHAT, OK_BODY)[::2], 503)
