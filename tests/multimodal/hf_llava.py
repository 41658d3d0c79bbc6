"""The real preprocessor and model settings of llava-hf/llava-1.5-7b-hf and
llava-hf/llava-v1.6-mistral-7b-hf (and the authors' layouts), written out,
and transformers' processors built from them in memory (no hub files)."""

from transformers import (CLIPImageProcessorPil, LlavaImageProcessorPil,
                          LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor,
                          SiglipImageProcessorPil)

from tests.multimodal.hf_llava_onevision import word_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_VISION = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
               "model_type": "clip_vision_model", "num_attention_heads": 16,
               "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}

# llava-hf/llava-1.5-7b-hf: preprocessor_config.json and the config.json keys read.
LLAVA_15_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
    "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD,
    "processor_class": "LlavaProcessor", "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}}
LLAVA_15_CONFIG = {"architectures": ["LlavaForConditionalGeneration"],
                   "vision_config": CLIP_VISION, "vision_feature_layer": -2,
                   "vision_feature_select_strategy": "default", "image_token_index": 32000}
# The same checkpoint served with transformers' LlavaImageProcessor padding to a square.
LLAVA_15_PAD_PREPROCESSOR = dict(LLAVA_15_PREPROCESSOR, image_processor_type="LlavaImageProcessor",
                                 do_pad=True)

# llava-hf/llava-v1.6-mistral-7b-hf.
LLAVA_16_PREPROCESSOR = {
    "aspect_ratio_setting": "anyres", "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
    "do_resize": True, "image_grid_pinpoints": V16_PINPOINTS, "image_mean": CLIP_MEAN,
    "image_processor_type": "LlavaNextImageProcessor", "image_std": CLIP_STD,
    "processor_class": "LlavaNextProcessor", "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}}
LLAVA_16_CONFIG = {"architectures": ["LlavaNextForConditionalGeneration"],
                   "image_grid_pinpoints": V16_PINPOINTS, "vision_config": CLIP_VISION,
                   "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                   "use_image_newline_parameter": True, "image_token_index": 32000}

# The authors' layouts: liuhaotian/llava-v1.5-7b and liuhaotian/llava-v1.6-mistral-7b
# config.json keys, and their tower openai/clip-vit-large-patch14-336's (legacy) config.
REPO_CLIP_PREPROCESSOR = {"crop_size": 336, "do_center_crop": True, "do_normalize": True,
                          "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
                          "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3,
                          "size": 336}
REPO_V15_CONFIG = {"image_aspect_ratio": "pad", "mm_vision_select_feature": "patch",
                   "mm_vision_select_layer": -2,
                   "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
REPO_V16_CONFIG = {"image_aspect_ratio": "anyres", "image_grid_pinpoints": V16_PINPOINTS,
                   "mm_patch_merge_type": "spatial_unpad", "mm_vision_select_feature": "patch",
                   "mm_vision_select_layer": -2,
                   "mm_vision_tower": "openai/clip-vit-large-patch14-336"}

_NOT_KWARGS = {"image_processor_type", "processor_class", "aspect_ratio_setting",
               "feature_extractor_type"}


def processor_kwargs(preprocessor: dict) -> dict:
    return {key: value for key, value in preprocessor.items() if key not in _NOT_KWARGS}


def hf_image_processor(preprocessor: dict):
    """transformers' PIL image processor of a preprocessor_config dict."""
    classes = {"CLIPImageProcessor": CLIPImageProcessorPil,
               "LlavaImageProcessor": LlavaImageProcessorPil,
               "LlavaNextImageProcessor": LlavaNextImageProcessorPil,
               "SiglipImageProcessor": SiglipImageProcessorPil}
    return classes[preprocessor["image_processor_type"]](**processor_kwargs(preprocessor))


def hf_llava_next_processor(preprocessor=LLAVA_16_PREPROCESSOR, strategy="default",
                            num_cls_tokens=1) -> LlavaNextProcessor:
    return LlavaNextProcessor(image_processor=hf_image_processor(preprocessor),
                              tokenizer=word_tokenizer(), patch_size=14,
                              vision_feature_select_strategy=strategy,
                              num_additional_image_tokens=num_cls_tokens)


def hf_llava_processor(preprocessor=LLAVA_15_PREPROCESSOR, strategy="default",
                       num_cls_tokens=1, patch_size=14) -> LlavaProcessor:
    return LlavaProcessor(image_processor=hf_image_processor(preprocessor),
                          tokenizer=word_tokenizer(), patch_size=patch_size,
                          vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=num_cls_tokens)
