"""Every sampling field is checked in one place
(pyvlm.scheduling.sampling_ranges): the server answers a value outside its
bound, or of the wrong shape, with a 400 naming the field, the offline
Engine raises a ValueError naming it with the same message, and a value on
the bound passes both. max_tokens 0 or negative is a 400 on every endpoint
(OpenAI's behaviour)."""

import pytest

from pyvlm.scheduling.sampling_ranges import BOUNDS, SamplingFieldError
from pyvlm.entrypoints.sampling import sampling_params_from
from tests.server.conftest import call

BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
API_NAMES = {"max_new_tokens": "max_tokens"}  # the engine's name -> the chat API's


def outside(name):
    bound = BOUNDS[name]
    step = 1 if bound.integer else 0.5
    values = [bound.low if bound.low_open else bound.low - step]
    if bound.high is not None:
        values.append(bound.high + step)
    if name == "top_k":
        values = [-2, -5]  # -1 and 0 both mean "off"
    return values + ["1", True]


def on_the_bound(name):
    bound = BOUNDS[name]
    return bound.high if bound.low_open else bound.low


def chat_body(name, value):
    body = dict(BODY, **{API_NAMES.get(name, name): value})
    if name == "top_logprobs":
        body["logprobs"] = True
    return body


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_both_front_doors_refuse_the_same_values(app, name):
    api_name = API_NAMES.get(name, name)
    for value in outside(name):
        status, _, body = call(app, "POST", "/v1/chat/completions", chat_body(name, value))
        assert status == 400 and body["error"]["param"] == api_name, (value, body)
        assert api_name in body["error"]["message"]
        with pytest.raises(SamplingFieldError, match=name) as raised:
            sampling_params_from({name: value})
        assert raised.value.param == name
    value = on_the_bound(name)
    sampling_params_from({name: value})
    status, _, body = call(app, "POST", "/v1/chat/completions", chat_body(name, value))
    assert status == 200, body


SHAPE_CASES = [  # (field, a value of the wrong shape)
    ("stop", [""]), ("stop", 5), ("stop", {"a": 1}), ("stop", ["a", 1]),
    ("stop_token_ids", ["x"]), ("stop_token_ids", [-1]), ("stop_token_ids", [True]),
    ("stop_token_ids", 5), ("logit_bias", {"abc": 1}), ("logit_bias", {"²": 1}),
    ("logit_bias", {"5": 101}), ("logit_bias", {"5": "1"}), ("logit_bias", [1]),
    ("ignore_eos", 1), ("skip_special_tokens", "yes"),
]


@pytest.mark.parametrize("name,value", SHAPE_CASES)
def test_both_front_doors_refuse_the_same_shapes_with_one_message(app, name, value):
    status, _, body = call(app, "POST", "/v1/chat/completions", dict(BODY, **{name: value}))
    assert status == 400 and body["error"]["param"] == name, body
    with pytest.raises(SamplingFieldError) as raised:
        sampling_params_from({name: value})
    assert raised.value.param == name
    assert body["error"]["message"] == str(raised.value) and name in str(raised.value)


@pytest.mark.parametrize("value", [0, -1])
def test_max_tokens_below_one_is_a_400_everywhere(app, value):
    for path, body, param in [
            ("/v1/chat/completions", dict(BODY, max_tokens=value), "max_tokens"),
            ("/v1/chat/completions", dict(BODY, max_completion_tokens=value),
             "max_completion_tokens"),
            ("/v1/completions", {"prompt": "hi", "max_tokens": value}, "max_tokens"),
            ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": value}},
             "sampling_params.max_new_tokens")]:
        status, _, answer = call(app, "POST", path, body)
        assert status == 400 and answer["error"]["param"] == param, (path, answer)


def test_an_invalid_max_tokens_beside_max_completion_tokens_is_a_400(app):
    status, _, body = call(app, "POST", "/v1/chat/completions",
                           dict(BODY, max_completion_tokens=2, max_tokens=-3))
    assert status == 400 and body["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_any_refused_prompt_of_a_batch_is_a_400_before_streaming(app, stream):
    """Every prompt is built before any runs: a later prompt too long for the
    context answers the whole request 400, streamed or not."""
    body = {"prompt": ["hi", "a b " * 600], "max_tokens": 2, "stream": stream}
    status, _, answer = call(app, "POST", "/v1/completions", body)
    assert status == 400 and "context length" in answer["error"]["message"], answer
    assert app.dispatcher.admission.num_in_flight == 0
    status, _, _ = call(app, "POST", "/v1/completions", dict(body, prompt=["hi", "ho"]))
    assert status == 200
