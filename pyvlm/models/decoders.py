"""The language decoder class for a text config's model_type."""

from .llama import LlamaModel
from .qwen2 import Qwen2Model

DECODERS = {"llama": LlamaModel, "qwen2": Qwen2Model}


def decoder_for(text_config) -> LlamaModel:
    """A decoder (llama or qwen2) built from a transformers text config."""
    model_type = getattr(text_config, "model_type", "llama")
    if model_type not in DECODERS:
        raise NotImplementedError(f"language model type {model_type!r} is not supported "
                                  f"(supported: {', '.join(sorted(DECODERS))})")
    return DECODERS[model_type](text_config)
