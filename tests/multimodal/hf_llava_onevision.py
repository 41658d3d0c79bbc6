"""transformers' LLaVA-OneVision processors built in memory (no hub files),
for the tiny test config and the real 7B one, next to pyvlm's config."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil,
                          LlavaOnevisionProcessor, PreTrainedTokenizerFast)

from pyvlm.multimodal.llava_onevision import LlavaOnevisionImageConfig
from tests import tiny_models

TINY_PREPROCESSOR = dict(size={"height": tiny_models.VISION_IMAGE_SIZE,
                               "width": tiny_models.VISION_IMAGE_SIZE},
                         image_grid_pinpoints=tiny_models.GRID_PINPOINTS,
                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=3,
                         rescale_factor=1 / 255, do_pad=True)
# llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP 384 tiles, pinpoints from the config defaults.
SEVEN_B_PREPROCESSOR = dict(size={"height": 384, "width": 384},
                            image_grid_pinpoints=LlavaOnevisionConfig().image_grid_pinpoints,
                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=3,
                            rescale_factor=0.00392156862745098, do_pad=True)
VISION = {"tiny": (TINY_PREPROCESSOR, tiny_models.VISION_IMAGE_SIZE, tiny_models.VISION_PATCH_SIZE),
          "7b": (SEVEN_B_PREPROCESSOR, 384, 14)}


def pyvlm_config(name: str, strategy: str = "full") -> LlavaOnevisionImageConfig:
    preprocessor, image_size, patch_size = VISION[name]
    return LlavaOnevisionImageConfig.from_configs(
        preprocessor, vision_image_size=image_size, vision_patch_size=patch_size,
        vision_aspect_ratio="anyres_max_9", vision_feature_select_strategy=strategy)


def hf_image_processor(name: str) -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(**VISION[name][0])


class _NoVideoProcessor(LlavaOnevisionProcessor):
    """The class check of video_processor=None needs torchvision's video
    mapping, which is absent here; images do not use it."""

    def check_argument_for_proper_class(self, attribute_name, arg):
        return None


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word tokenizer whose special tokens have tiny_models' ids."""
    words = tiny_models.SPECIAL_TOKENS + ["hello", "world", "[UNK]"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                   additional_special_tokens=tiny_models.SPECIAL_TOKENS)


def hf_processor(name: str, strategy: str = "full") -> LlavaOnevisionProcessor:
    _, image_size, patch_size = VISION[name]
    return _NoVideoProcessor(image_processor=hf_image_processor(name), tokenizer=word_tokenizer(),
                             video_processor=None, vision_feature_select_strategy=strategy,
                             num_image_tokens=(image_size // patch_size) ** 2)
