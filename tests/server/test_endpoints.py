"""/v1/completions, /generate, info, health, cache and metrics endpoints,
and the command line's flags."""

import asyncio
import subprocess
import sys

from pyvlm.server.args import _FLAGS, ServerArgs, add_server_arguments, server_args_from
from tests.server.conftest import acall, call, request

GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}


def engine_text(engine, prompt, max_tokens=6):
    return engine.generate(prompt, {"max_new_tokens": max_tokens, "temperature": 0,
                                    "ignore_eos": True})["text"]


def test_completions_equal_the_engine_for_text_ids_and_batches(app, engine):
    status, _, body = call(app, "POST", "/v1/completions", dict(GREEDY, prompt="the cat sat"))
    assert status == 200, body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": engine_text(engine, "the cat sat"),
                                "logprobs": None, "finish_reason": "length"}]
    ids = engine.state.tokenizer("a dog", add_special_tokens=False)["input_ids"]
    _, _, batch = call(app, "POST", "/v1/completions", dict(GREEDY, prompt=["the cat sat", ids]))
    assert [c["text"] for c in batch["choices"]] == [engine_text(engine, "the cat sat"),
                                                    engine_text(engine, "a dog")]
    assert batch["usage"]["completion_tokens"] == 12


def test_completion_stream_and_logprobs(app, engine):
    body = dict(GREEDY, prompt="the cat sat", logprobs=3, stream=True,
                stream_options={"include_usage": True})
    status, _, events = call(app, "POST", "/v1/completions", body)
    assert events[-1] == (None, "[DONE]") and events[-2][1]["choices"] == []
    chunks = [data["choices"][0] for _, data in events[:-2]]
    assert "".join(c["text"] for c in chunks) == engine_text(engine, "the cat sat")
    assert [c["finish_reason"] for c in chunks][-1] == "length"
    assert sum(c["finish_reason"] is not None for c in chunks) == 1
    tokens = [t for c in chunks for t in c["logprobs"]["tokens"]]
    assert "".join(tokens) == engine_text(engine, "the cat sat")
    assert all(len(top) <= 3 for c in chunks for top in c["logprobs"]["top_logprobs"])


def test_completion_refusals(app):
    for body, param in ((dict(GREEDY, prompt="x", echo=True), "echo"),
                        (dict(GREEDY, prompt="x", suffix="y"), "suffix"),
                        (dict(GREEDY, prompt=[]), "prompt"),
                        (dict(GREEDY, prompt=[10**9]), "prompt")):
        status, _, answer = call(app, "POST", "/v1/completions", body)
        assert status == 400 and answer["error"]["param"] == param


def test_native_generate_text_and_stream(app, engine):
    body = {"text": "the cat sat", "sampling_params": {"max_new_tokens": 5, "temperature": 0,
                                                       "ignore_eos": True}}
    status, _, answer = call(app, "POST", "/generate", body)
    expected = engine.generate("the cat sat", body["sampling_params"])
    assert status == 200 and answer["text"] == expected["text"]
    assert answer["output_ids"] == expected["output_ids"]
    _, _, events = call(app, "POST", "/generate", dict(body, stream=True))
    assert events[-1] == (None, "[DONE]") and events[-2][1]["text"] == expected["text"]
    status, _, bad = call(app, "POST", "/generate", {"text": "x", "sampling_params": {"wat": 1}})
    assert status == 400 and bad["error"]["param"] == "sampling_params.wat"


def test_info_endpoints(app_with, engine):
    app = app_with(api_key="k")
    auth = [("authorization", "Bearer k")]
    _, _, models = call(app, "GET", "/v1/models", headers=auth)
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["object"] == "model"
    _, _, info = call(app, "GET", "/get_model_info", headers=auth)
    assert info["served_model_name"] == "tiny" and info["context_length"] == 512
    _, _, server = call(app, "GET", "/get_server_info", headers=auth)
    assert server["api_key"] == "<set>" and "k" not in str(server["api_key"])
    assert server["engine_stats"]["num_running_reqs"] == 0


def test_health_generate_and_flush_cache(app):
    assert call(app, "GET", "/health_generate")[0] == 200
    status, _, body = call(app, "POST", "/flush_cache")
    assert status == 200 and body["success"] is True


def test_metrics_count_tokens_and_running_returns_to_zero_after_disconnect(app_with, engine):
    app = app_with(enable_metrics=True)

    async def scenario():
        call_ = await app(request("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 300,
            "ignore_eos": True, "stream": True}))
        await call_.body.__anext__()
        running = (await acall(app, "GET", "/metrics"))[2].decode()
        await call_.body.aclose()  # the client disconnects mid-stream
        for _ in range(100):
            stats = engine.get_stats()
            if stats["num_running_reqs"] == 0:
                break
            await asyncio.sleep(0.05)
        await acall(app, "POST", "/v1/completions", dict(GREEDY, prompt="the cat"))
        return running, (await acall(app, "GET", "/metrics"))[2].decode()

    during, after = asyncio.run(scenario())
    assert 'pyvlm:num_running_reqs{model_name="tiny"} 1' in during
    assert 'pyvlm:num_running_reqs{model_name="tiny"} 0' in after
    assert "# TYPE pyvlm:time_to_first_token_seconds histogram" in after
    assert 'pyvlm:generation_tokens_total{model_name="tiny"} ' in after
    generated = [line for line in after.splitlines()
                 if line.startswith("pyvlm:generation_tokens_total")][0]
    assert float(generated.split()[-1]) >= 6
    assert 'pyvlm:e2e_request_latency_seconds_bucket{model_name="tiny",le="+Inf"}' in after
    # Steps by path: a CPU engine captures no graphs, so every step ran eagerly.
    assert "# TYPE pyvlm:model_steps_total counter" in after
    assert 'pyvlm:model_steps_total{model_name="tiny",path="decode_graph"} 0' in after
    eager = [line for line in after.splitlines()
             if line.startswith('pyvlm:model_steps_total{model_name="tiny",path="eager"}')]
    assert eager and float(eager[0].split()[-1]) >= 6, eager


def test_every_flag_is_parsed_and_documented():
    import argparse

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    args = server_args_from(parser.parse_args(
        ["--model-path", "m", "--port", "8000", "--enable-metrics", "--limit-mm-per-prompt",
         "2", "--max-queued-requests", "3", "--chunked-prefill-size", "-1"]))
    assert args == ServerArgs(model="m", port=8000, enable_metrics=True, limit_mm_per_prompt=2,
                              max_queued_requests=3, chunked_prefill_size=-1)
    assert args.model_name == "m" and args.engine_kwargs()["chunked_prefill_size"] == -1
    help_text = subprocess.run([sys.executable, "-m", "pyvlm", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    for flags, _, _ in _FLAGS:
        assert all(flag in help_text for flag in flags), flags


def test_launcher_answers_503_until_the_app_is_up():
    from pyvlm.server.launch import Launcher

    async def scenario():
        launcher = Launcher(ServerArgs())
        return await launcher.handle(request("GET", "/health"))

    response = asyncio.run(scenario())
    assert response.status == 503 and b'"error"' in response.body


def test_native_generate_logprobs_cover_every_token(app, engine):
    body = {"text": "the cat", "sampling_params": {"max_new_tokens": 7, "temperature": 0,
                                                    "ignore_eos": True},
            "return_logprob": True, "top_logprobs_num": 2}
    _, _, answer = call(app, "POST", "/generate", body)
    expected = engine.generate("the cat", dict(body["sampling_params"], logprobs=True,
                                               top_logprobs=2))
    meta = answer["meta_info"]
    assert [tid for _, tid in meta["output_token_logprobs"]] == answer["output_ids"]
    assert meta["output_token_logprobs"] == [list(p) for p in
                                             expected["meta_info"]["output_token_logprobs"]]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"]) and len(
        meta["output_top_logprobs"]) == 7
    _, _, events = call(app, "POST", "/generate", dict(body, stream=True))
    last = [data for _, data in events if data != "[DONE]"][-1]
    assert last["meta_info"]["output_token_logprobs"] == meta["output_token_logprobs"]
