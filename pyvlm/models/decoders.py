"""The language decoder class for a text config's model_type."""

from .llama import LayerFactory, LlamaModel, self_attention_layer
from .qwen2 import Qwen2Model

# Qwen2-VL's and Qwen2.5-VL's text models are Qwen2 with M-RoPE (their
# rope parameters carry the mrope_section the rotary reads); Llama-3.2-
# Vision's is Llama whose cross-attention layers come from its layer factory.
# Mistral is Llama's decoder; its sliding window bounds the context instead
# (pyvlm.entrypoints.startup.context_length_of), so attention stays full.
DECODERS = {"llama": LlamaModel, "qwen2": Qwen2Model, "qwen2_vl_text": Qwen2Model,
            "qwen2_5_vl_text": Qwen2Model, "mllama_text_model": LlamaModel,
            "mistral": LlamaModel}


def decoder_for(text_config, layer_factory: LayerFactory = self_attention_layer,
                **decoder_kwargs) -> LlamaModel:
    """A decoder (llama or qwen2) built from a transformers text config;
    layer_factory builds each layer (see pyvlm.models.llama.LayerFactory);
    decoder_kwargs go to the decoder class (num_extra_embeddings)."""
    model_type = getattr(text_config, "model_type", "llama")
    if model_type not in DECODERS:
        raise NotImplementedError(f"language model type {model_type!r} is not supported "
                                  f"(supported: {', '.join(sorted(DECODERS))})")
    if getattr(text_config, "use_sliding_window", False):
        raise NotImplementedError("sliding-window attention (use_sliding_window) is not "
                                  "supported")
    return DECODERS[model_type](text_config, layer_factory=layer_factory, **decoder_kwargs)
