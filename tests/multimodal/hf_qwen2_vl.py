"""transformers' Qwen2-VL / Qwen2.5-VL processors and get_rope_index, built
in memory (no hub files), and the real checkpoints' preprocessor configs."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen2VLProcessor

from pyvlm.multimodal.qwen2_vl import Qwen2VLImageConfig

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# preprocessor_config.json of Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct.
QWEN2_VL_7B = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                   merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                   image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor")
QWEN2_5_VL_7B = dict(QWEN2_VL_7B, processor_class="Qwen2_5_VLProcessor")
# The vision_config keys of their config.json that shape patches.
VISION_CONFIG = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)

SPECIAL_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
VISION_START_ID, IMAGE_PAD_ID, VISION_END_ID, VIDEO_PAD_ID = range(4)
WORDS = SPECIAL_TOKENS + ["hello", "world", "[UNK]"]


def hf_image_processor(**kwargs) -> Qwen2VLImageProcessorPil:
    """The PIL processor built from preprocessor_config.json-style kwargs."""
    names = ("image_processor_type", "processor_class")
    kwargs = {k: v for k, v in kwargs.items() if k not in names}
    return Qwen2VLImageProcessorPil(**kwargs)


def pyvlm_config(**preprocessor) -> Qwen2VLImageConfig:
    return Qwen2VLImageConfig.from_hf_configs(preprocessor, {"vision_config": VISION_CONFIG})


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word tokenizer: the vision tokens, then a few words."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                   additional_special_tokens=SPECIAL_TOKENS)


class _NoVideoProcessor(Qwen2VLProcessor):
    """The class check of video_processor=None needs torchvision's video
    mapping, which is absent here; images do not use it."""

    def check_argument_for_proper_class(self, attribute_name, arg):
        return None


def hf_processor(**preprocessor) -> Qwen2VLProcessor:
    return _NoVideoProcessor(image_processor=hf_image_processor(**preprocessor),
                             tokenizer=word_tokenizer(), video_processor=None)


def rope_index_model(family: str):
    """A Qwen2VLModel / Qwen2_5_VLModel on the meta device: get_rope_index
    reads only its config (spatial_merge_size 2)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2VLConfig, Qwen2VLModel

    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=32, vocab_size=len(WORDS), bos_token_id=None, eos_token_id=None,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, num_heads=2, spatial_merge_size=2, patch_size=14,
                  temporal_patch_size=2)
    if family == "qwen2_vl":
        config = Qwen2VLConfig(text_config=text, vision_config=dict(vision, embed_dim=16))
        model_class = Qwen2VLModel
    else:
        config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            vision, intermediate_size=32, out_hidden_size=16, tokens_per_second=2))
        model_class = Qwen2_5_VLModel
    with torch.device("meta"):
        return model_class(config)
