"""load_weights: both naming schemes, tied heads, ignored buffers, in-place
copies, and errors naming unknown or missing weights."""

import copy
import re

import pytest
import torch

from pyvlm.models.llava_onevision import LLAVA_ONEVISION_PREFIXES, LlavaOnevisionForConditionalGeneration
from pyvlm.models.vision_language import renamed
from tests.tiny_models import tiny_llava_onevision

HUB_PREFIXES = (("model.language_model.", "language_model.model."),
                ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower.vision_model."),
                ("model.multi_modal_projector.", "multi_modal_projector."),
                ("model.image_newline", "image_newline"))


def hub_name(name: str) -> str:
    """The pre-transformers-5 checkpoint name of a transformers 5 name."""
    for new, old in HUB_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    raise AssertionError(f"unmapped name {name}")


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def hf_model(request):
    return tiny_llava_onevision(request.param, seed=int(torch.randint(0, 1000, ()).item()))


def fresh(hf_model):
    return LlavaOnevisionForConditionalGeneration(hf_model.config).eval()


def logits_of(model, hf_model):
    """The last-token logits of a short text through both models."""
    from tests.models.paged import PagedKV, Sequence, run_chunked

    ids = torch.randint(5, 300, (9,)).tolist()
    out = run_chunked(model, Sequence(ids), PagedKV(model, 4, 4, seed=0), [9], 0)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([ids])).logits[0]
    return out, ref


@pytest.mark.parametrize("naming", ["transformers5", "hub"])
def test_both_namings_load_to_the_same_logits(hf_model, naming):
    weights = list(hf_model.state_dict().items())
    if naming == "hub":
        weights = [(hub_name(name), tensor) for name, tensor in weights]
    model = fresh(hf_model)
    model.load_weights(iter(weights))
    out, ref = logits_of(model, hf_model)
    assert (out - ref).abs().max().item() < 1e-4


def test_a_deep_copied_model_loads_too(hf_model):
    """Parameters rebuilt by deepcopy lose their weight_loader attributes; the
    loader goes through the layers, which keep theirs."""
    model = copy.deepcopy(fresh(hf_model))
    model.load_weights(iter(hf_model.state_dict().items()))
    out, ref = logits_of(model, hf_model)
    assert (out - ref).abs().max().item() < 1e-4


def test_rotary_buffers_are_ignored_and_tied_head_may_be_absent(hf_model):
    weights = dict(hf_model.state_dict())
    weights["model.language_model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    if hf_model.config.tie_word_embeddings:
        del weights["lm_head.weight"]  # old tied checkpoints do not store it
    model = fresh(hf_model)
    model.load_weights(weights.items())
    embed = model.language_model.embed_tokens.weight
    assert (model.lm_head.weight is embed) == bool(hf_model.config.tie_word_embeddings)
    torch.testing.assert_close(model.lm_head.weight, hf_model.lm_head.weight, rtol=0, atol=0)


def test_weights_are_copied_into_the_existing_parameters(hf_model):
    model = fresh(hf_model)
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    model.load_weights(hf_model.state_dict().items())
    assert storage == {name: p.data_ptr() for name, p in model.named_parameters()}
    qkv = model.language_model.layers[1].self_attn.qkv_proj.weight
    q_size = qkv.shape[0] - 2 * model.num_kv_heads * model.head_dim
    hf_q = hf_model.model.language_model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(qkv[:q_size], hf_q, rtol=0, atol=0)


def test_unknown_weight_is_named(hf_model):
    weights = list(hf_model.state_dict().items()) + [("model.extra_head.weight", torch.ones(2))]
    with pytest.raises(ValueError, match="unknown weights.*model.extra_head.weight"):
        fresh(hf_model).load_weights(weights)


@pytest.mark.parametrize("dropped", ["model.language_model.layers.2.self_attn.k_proj.weight",
                                     "model.language_model.layers.1.mlp.up_proj.weight",
                                     "model.image_newline", "model.language_model.norm.weight",
                                     "model.vision_tower.encoder.layers.1.self_attn.v_proj.bias"])
def test_missing_weight_is_named(hf_model, dropped):
    weights = dict(hf_model.state_dict())
    del weights[dropped]
    with pytest.raises(ValueError, match="missing.*" + re.escape(renamed(dropped, LLAVA_ONEVISION_PREFIXES))):
        fresh(hf_model).load_weights(weights.items())


@pytest.mark.parametrize("name", ["model.multi_modal_projector.linear_2.bias",  # nn.Linear
                                  "model.language_model.layers.1.self_attn.k_proj.weight",  # fused
                                  "model.language_model.layers.0.self_attn.o_proj.weight",  # row
                                  "model.vision_tower.encoder.layers.0.mlp.fc1.bias"])  # column
def test_wrong_shape_is_named(hf_model, name):
    weights = dict(hf_model.state_dict())
    weights[name] = torch.ones(3, *weights[name].shape[1:])
    with pytest.raises(ValueError, match=re.escape(renamed(name, LLAVA_ONEVISION_PREFIXES)) + ": expected shape"):
        fresh(hf_model).load_weights(weights.items())
