"""Short fuzz of the JSON body -> prompt path (the long run: benchmarks/fuzz.py
body): arbitrary bodies posted to /v1/chat/completions, /v1/completions and
/generate on the real App and tiny engine, streamed and not, get 2xx or an
OpenAI-shaped 4xx, never a 5xx, and the server serves normally afterwards.
The strategies and the property are in body_fuzz_targets.py."""

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings

from tests.server.body_fuzz_targets import (CHAT, COMPLETIONS, ENDPOINTS, GENERATE, NORMAL_REQUEST,
                                            assert_openai_error, assert_still_serving, encode,
                                            post_and_check, requests_for, unwatch_errors,
                                            watch_errors)
from tests.server.conftest import call, make_app

SHORT = settings(max_examples=40, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_arbitrary_bodies_get_2xx_or_an_openai_4xx(engine, base_args, endpoint, stream):
    app = make_app(engine, base_args)
    errors = watch_errors()

    @SHORT
    @given(requests_for(endpoint, stream))
    def post(request):
        asyncio.run(post_and_check(app, *request, errors))

    try:
        post()
        asyncio.run(assert_still_serving(app))
    finally:
        unwatch_errors(errors)


# Bodies the fuzzer found answered 500 (or 400 with a torch message after
# failing the engine's whole step): (endpoint, body, the param the 400 names).
FOUND = [
    (COMPLETIONS, {"prompt": "", "max_tokens": 1, "logit_bias": {"፩": 0.0}}, "logit_bias"),
    (CHAT, dict(NORMAL_REQUEST, logit_bias={"²": 1}), "logit_bias"),
    (GENERATE, {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "seed": 2**63}},
     "sampling_params.seed"),
    (GENERATE, {"text": "0", "sampling_params": {"max_new_tokens": 1, "seed": {"a": True}}},
     "sampling_params.seed"),
    (GENERATE, {"text": "0", "sampling_params": {"max_new_tokens": 1, "seed": "x"}},
     "sampling_params.seed"),
    (GENERATE, {"text": "0", "sampling_params": {"max_new_tokens": 1, "skip_special_tokens": []}},
     "sampling_params.skip_special_tokens"),
    (GENERATE, {"text": "0", "sampling_params": {"max_new_tokens": 1, "stop": 5}},
     "sampling_params.stop"),
    (GENERATE, {"text": "0", "sampling_params": {"max_new_tokens": 1.5}},
     "sampling_params.max_new_tokens"),
    (GENERATE, {"text": "0", "sampling_params": {"max_new_tokens": 1, "logit_bias": {"999": 1}}},
     "sampling_params.logit_bias"),
]


@pytest.mark.parametrize("endpoint,body,param", FOUND)
def test_bodies_the_fuzzer_found_are_400_naming_the_field(app, endpoint, body, param):
    errors = watch_errors()
    try:
        status, _, answer = call(app, "POST", endpoint, encode(body))
        assert not errors.take()
    finally:
        unwatch_errors(errors)
    assert status == 400, answer
    assert_openai_error(answer)
    assert answer["error"]["param"] == param, answer
    asyncio.run(assert_still_serving(app))
