"""Tiny random-weight LLaVA-OneVision models built with transformers itself.

Shared by the model parity tests (in memory) and the checkpoint fixtures (on
disk). Weights are perturbed after init so that every layer and every bias
matters and greedy choices have clear margins.

Token ids are fixed so the trained tokenizer (tests/tiny_checkpoints.py) and
the configs agree: the special tokens come first in the vocabulary.
"""

import torch

VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
ENDOFTEXT_ID, IM_START_ID, IM_END_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = range(5)

VISION_IMAGE_SIZE = 32  # SigLIP input side; anyres tiles are this size
VISION_PATCH_SIZE = 8  # -> 4 x 4 = 16 features per tile
GRID_PINPOINTS = [[VISION_IMAGE_SIZE * i, VISION_IMAGE_SIZE * j]
                  for i in range(1, 7) for j in range(1, 7)]


def vision_config() -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, image_size=VISION_IMAGE_SIZE,
                patch_size=VISION_PATCH_SIZE, layer_norm_eps=1e-6, vision_use_head=False)


def text_config(backbone: str) -> dict:
    """backbone: "qwen2" (QKV bias, untied head) or "llama" (tied embeddings, like SmolLM2)."""
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=0.1,
                  eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID)
    if backbone == "qwen2":
        return dict(common, model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=False)
    if backbone == "llama":
        return dict(common, model_type="llama", rope_theta=10000.0, tie_word_embeddings=True,
                    bos_token_id=IM_START_ID, attention_bias=False, mlp_bias=False)
    raise ValueError(f"unknown backbone {backbone!r}")


def llava_onevision_config(backbone: str = "qwen2"):
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        text_config=text_config(backbone), vision_config=vision_config(),
        image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=GRID_PINPOINTS,
        tie_word_embeddings=text_config(backbone)["tie_word_embeddings"],
        architectures=["LlavaOnevisionForConditionalGeneration"])


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Adds seeded noise to every parameter (norm weights, biases and the
    image_newline included), so no layer is an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * scale)


def tiny_llava_onevision(backbone: str = "qwen2", seed: int = 0):
    """An eval-mode float32 transformers LlavaOnevisionForConditionalGeneration."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(llava_onevision_config(backbone))
    perturb_(model, seed + 1)
    return model.eval().float()
