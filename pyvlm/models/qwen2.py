"""Qwen2: the Llama decoder with biases on q/k/v (none on o_proj or the MLP)."""

from .llama import LayerFactory, LlamaModel, self_attention_layer


class Qwen2Model(LlamaModel):
    def __init__(self, config, layer_factory: LayerFactory = self_attention_layer,
                 num_extra_embeddings: int = 0):
        super().__init__(config, qkv_bias=True, layer_factory=layer_factory,
                         num_extra_embeddings=num_extra_embeddings)
