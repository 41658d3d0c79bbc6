"""Short fuzz of the JSON body -> prompt path (the long run: benchmarks/fuzz.py
body): arbitrary bodies posted to /v1/chat/completions, /v1/completions and
/generate on the real App and tiny engine, streamed and not, get 2xx or an
OpenAI-shaped 4xx, never a 5xx, and the server serves normally afterwards.
The strategies and the property are in body_fuzz_targets.py."""

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings

from pyvlm.server.errors import ApiError
from pyvlm.server.generation import EngineInput, Timing, collect_choices
from tests.server.body_fuzz_targets import (CHAT, COMPLETIONS, ENDPOINTS, GENERATE, NORMAL_REQUEST,
                                            assert_openai_error, assert_still_serving, encode,
                                            post_and_check, requests_for, unwatch_errors,
                                            watch_errors)
from tests.server.conftest import call, make_app

SHORT = settings(max_examples=80, deadline=None,
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


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_top_k_beyond_int32_samples_like_no_top_k(app, endpoint):
    """Found by the fuzzer: top_k = 2**31 overflowed the engine's int32 and
    failed its whole step; top_k >= the vocabulary keeps every token."""
    prompt = {CHAT: {"messages": [{"role": "user", "content": "hi"}]}, COMPLETIONS: {"prompt": "hi"},
              GENERATE: {"text": "hi"}}[endpoint]
    answers = []
    for top_k in (2**31, -1):
        limits = {"max_new_tokens": 4, "temperature": 1.0, "top_k": top_k, "seed": 7}
        body = (dict(prompt, sampling_params=limits) if endpoint == GENERATE else
                dict(prompt, max_tokens=4, temperature=1.0, top_k=top_k, seed=7))
        status, _, answer = call(app, "POST", endpoint, encode(body))
        assert status == 200, answer
        answers.append(answer["text"] if endpoint == GENERATE else answer["choices"][0])
    assert answers[0] == answers[1]


def test_a_failed_choice_aborts_the_other_choices(engine):
    """Found by the fuzzer (errors logged after the answer): when one choice
    of a non-streamed request failed, the others kept running in the engine."""
    inputs = [EngineInput("hi"), EngineInput("a b " * 600)]  # the second is too long: refused
    params = [{"max_new_tokens": 400, "ignore_eos": True}] * 2

    async def fail_then_count():
        with pytest.raises(ApiError):
            await collect_choices(engine, inputs, params, "fuzz", [Timing(), Timing()])
        stats = await asyncio.get_running_loop().run_in_executor(None, engine.get_stats)
        return stats["num_running_reqs"] + stats["num_queued_reqs"]

    assert asyncio.run(fail_then_count()) == 0
