"""benchmarks/simulate_steps.py's --server-args: the engine API's engine
takes the same flags the HTTP server is given."""

from benchmarks.simulate_steps import extra_engine_args


def test_server_args_become_the_engine_keywords_they_change():
    assert extra_engine_args("") == {}
    assert extra_engine_args("--piecewise-cuda-graph-max-tokens 0 --vision-cuda-graphs 8") == {
        "piecewise_cuda_graph_max_tokens": 0, "vision_cuda_graphs": 8}
    assert extra_engine_args("--max-running-requests 32") == {"max_running_requests": 32}
