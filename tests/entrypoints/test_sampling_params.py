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


def test_max_new_tokens_zero_is_refused():
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling_params_from({"max_new_tokens": 0})


def test_generation_config_fills_only_the_unset_fields():
    from pyvlm.entrypoints.sampling import generation_defaults

    defaults = generation_defaults({"temperature": 0.3, "top_p": 0.8, "top_k": 20,
                                    "do_sample": True, "max_length": 20, "eos_token_id": 2,
                                    "repetition_penalty": 1.05, "min_p": None})
    assert defaults == {"temperature": 0.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    p = sampling_params_from({"temperature": 1.0}, defaults)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (1.0, 0.8, 20, 1.05)
    assert sampling_params_from(None, defaults).temperature == 0.3


def test_generation_config_values_pyvlm_refuses_are_dropped(caplog):
    from pyvlm.entrypoints.sampling import generation_defaults

    assert generation_defaults({"temperature": -1, "top_p": 0.5}) == {"top_p": 0.5}
    assert "temperature" in caplog.text


@pytest.mark.parametrize("params, name", [
    ({"seed": {"a": 1}}, "seed"), ({"seed": 2**63}, "seed"), ({"stop": 5}, "stop"),
    ({"skip_special_tokens": []}, "skip_special_tokens"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"stop_token_ids": ["x"]}, "stop_token_ids"), ({"logit_bias": {"²": 1}}, "logit_bias"),
    ({"stop": 1.5}, "stop"), ({"stop": {"END": 1}}, "stop"), ({"stop_token_ids": 1.5}, "stop_token_ids"),
    ({"stop_token_ids": {"5": 1}}, "stop_token_ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"), ({"temperature": "hot"}, "temperature"),
])
def test_types_are_checked_too(params, name):
    """What reaches the engine can never fail its step (found by the body fuzzer)."""
    with pytest.raises(ValueError, match=name) as raised:
        sampling_params_from(params)
    assert raised.value.param == name
