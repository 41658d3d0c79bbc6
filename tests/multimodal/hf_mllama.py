"""transformers' Mllama image processor and the real checkpoint's configs."""

from transformers import MllamaImageProcessorPil

# meta-llama/Llama-3.2-11B-Vision-Instruct's preprocessor_config.json.
LLAMA_3_2_VISION = dict(
    do_convert_rgb=True, do_normalize=True, do_pad=True, do_rescale=True, do_resize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_processor_type="MllamaImageProcessor",
    image_std=[0.26862954, 0.26130258, 0.27577711], max_image_tiles=4, resample=2,
    rescale_factor=0.00392156862745098, size={"height": 560, "width": 560})
# The vision_config keys of its config.json that shape tiles.
VISION_CONFIG = dict(image_size=560, max_num_tiles=4, supported_aspect_ratios=[
    [1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])


def hf_processor(**preprocessor):
    return MllamaImageProcessorPil(**{k: v for k, v in preprocessor.items()
                                      if k != "image_processor_type"})
