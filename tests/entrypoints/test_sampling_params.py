import pytest

from pyvlm.entrypoints.sampling import sampling_params_from


def test_names_and_aliases_map_onto_sampling_params():
    p = sampling_params_from({"max_tokens": 7, "temperature": 0, "stop": "END", "top_k": 0,
                              "stop_token_ids": [5, 6], "logit_bias": {"3": -2},
                              "sampling_seed": 11})
    assert (p.max_new_tokens, p.temperature, p.stop, p.top_k) == (7, 0, ("END",), -1)
    assert p.stop_token_ids == (5, 6) and p.logit_bias == ((3, -2.0),) and p.seed == 11
    assert p.is_greedy


@pytest.mark.parametrize("params, message", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"min_p": 2}, "min_p"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"top_logprobs": 50}, "top_logprobs"),
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"stop": [""]}, "stop"),
    ({"top_k": -5}, "top_k"), ({"tempreature": 1}, "tempreature"),
])
def test_bad_values_name_the_field(params, message):
    with pytest.raises(ValueError, match=message):
        sampling_params_from(params)
