"""The decoder's layer hook: a layer factory decides the module at each
index (Llama-3.2-Vision's cross-attention layers will come in through it);
with layers that delegate to the default ones, the output is unchanged."""

import pytest
import torch
from torch import nn

from pyvlm.layers.attention import AttentionMetadata
from pyvlm.models.decoders import decoder_for
from pyvlm.models.llama import self_attention_layer
from tests.tiny_models import text_config


class Recording(nn.Module):
    """A layer that runs the default one and counts its calls."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.num_calls = inner, 0

    def forward(self, *args):
        self.num_calls += 1
        return self.inner(*args)


def hidden_states(model, input_ids):
    shape = model.shape
    caches = [(torch.zeros(4, 16, shape.num_kv_heads, shape.head_dim),
               torch.zeros(4, 16, shape.num_kv_heads, shape.head_dim))
              for _ in range(shape.num_layers)]
    attn = AttentionMetadata.build([(0, input_ids.numel(), [2, 0])], 16, False)
    with torch.no_grad():
        return model(input_ids, torch.arange(input_ids.numel()), attn, caches)


@pytest.mark.parametrize("backbone", ["llama", "qwen2"])
def test_a_layer_factory_chooses_each_layer(backbone):
    from transformers import AutoConfig

    config = AutoConfig.for_model(**text_config(backbone))
    asked = []

    def factory(index, shape, rotary):
        asked.append(index)
        layer = self_attention_layer(index, shape, rotary)
        return Recording(layer) if index == 1 else layer

    torch.manual_seed(0)
    default = decoder_for(config)
    hooked = decoder_for(config, layer_factory=factory)
    state = {k.replace("layers.1.inner.", "layers.1."): v for k, v in hooked.state_dict().items()}
    default.load_state_dict({k: torch.randn_like(v) for k, v in state.items()})
    hooked.load_state_dict({k.replace("layers.1.", "layers.1.inner."): v
                            for k, v in default.state_dict().items()})
    input_ids = torch.randint(0, config.vocab_size, (23,))
    assert asked == list(range(config.num_hidden_layers))
    assert torch.equal(hidden_states(hooked, input_ids), hidden_states(default, input_ids))
    assert hooked.layers[1].num_calls == 1
