"""Qwen2: the Llama decoder with biases on q/k/v (none on o_proj or the MLP)."""

from .llama import LlamaModel


class Qwen2Model(LlamaModel):
    def __init__(self, config):
        super().__init__(config, qkv_bias=True)

