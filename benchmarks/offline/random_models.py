"""Random-weight vision-language models of real shapes, built on the device
with no download: the configs of llava-onevision-qwen2-7b-ov-hf (Qwen2-7B +
SigLIP so400m) and Qwen/Qwen2-VL-7B-Instruct (Qwen2-7B with M-RoPE + its
675M ViT), a word-level tokenizer covering the whole vocabulary (so random
tokens detokenize) with the family's special tokens and chat template, and
the real preprocessor settings. One writer serves every family: a family is
its special tokens, chat template and preprocessor (RandomFamily)."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from tests.tiny_qwen2_vl import CHAT_TEMPLATE as QWEN2_VL_CHAT_TEMPLATE  # the 7B-Instruct's

QWEN2_7B = dict(model_type="qwen2", vocab_size=152128, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False, eos_token_id=151645)
SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                     num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                     layer_norm_eps=1e-6, vision_use_head=False)
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151646, 151647
PREPROCESSOR = {
    "image_processor_type": "LlavaOnevisionImageProcessor", "do_resize": True,
    "size": {"height": 384, "width": 384}, "resample": 3, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "do_pad": True, "do_convert_rgb": True,
}

# Qwen/Qwen2-VL-7B-Instruct's config.json, in transformers 5's nested form
# (the hub's flat rope_theta + rope_scaling {"type": "mrope"} is the same model).
QWEN2_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                        hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 24, 24]},
                        use_sliding_window=False, sliding_window=32768, max_window_layers=28,
                        bos_token_id=151643, eos_token_id=151645)
QWEN2_VL_7B_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu",
                          mlp_ratio=4, num_heads=16, in_channels=3, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2)
QWEN2_VL_TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656,
                          vision_start_token_id=151652, vision_end_token_id=151653)
# Its preprocessor_config.json as shipped (resample is absent: bicubic, the
# default of transformers' Qwen2VLImageProcessor and of pyvlm).
QWEN2_VL_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}

CHATML_SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}
# Qwen2's added tokens (tokenizer.json of Qwen/Qwen2-VL-7B-Instruct).
QWEN2_VL_SPECIALS = {**CHATML_SPECIALS, **{
    151646: "<|object_ref_start|>", 151647: "<|object_ref_end|>", 151648: "<|box_start|>",
    151649: "<|box_end|>", 151650: "<|quad_start|>", 151651: "<|quad_end|>",
    151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
    151655: "<|image_pad|>", 151656: "<|video_pad|>"}}


@dataclass(frozen=True)
class RandomFamily:
    """What a random checkpoint of a family holds besides its config:
    special tokens (id -> text), the chat template (None: pyvlm's default
    for the architecture) and preprocessor_config.json of a config."""

    specials: Dict[int, str]
    chat_template: Optional[str]
    preprocessor: Callable[[object], dict]


FAMILIES = {
    "llava_onevision": RandomFamily(
        {**CHATML_SPECIALS, IMAGE_TOKEN_ID: "<image>", VIDEO_TOKEN_ID: "<video>"}, None,
        lambda config: dict(PREPROCESSOR, image_grid_pinpoints=config.image_grid_pinpoints)),
    "qwen2_vl": RandomFamily(QWEN2_VL_SPECIALS, QWEN2_VL_CHAT_TEMPLATE,
                             lambda config: dict(QWEN2_VL_PREPROCESSOR)),
}


def family_of(config) -> RandomFamily:
    """The RandomFamily of a transformers config (by its model_type)."""
    if config.model_type not in FAMILIES:
        raise ValueError(f"no random checkpoint for model_type {config.model_type!r}; "
                         f"known: {', '.join(FAMILIES)}")
    return FAMILIES[config.model_type]


def llava_onevision_7b_config():
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(text_config=QWEN2_7B, vision_config=SIGLIP_SO400M,
                                image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID,
                                vision_feature_select_strategy="full", vision_feature_layer=-1,
                                vision_aspect_ratio="anyres_max_9",
                                architectures=["LlavaOnevisionForConditionalGeneration"])


def qwen2_vl_7b_config():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(text_config=dict(QWEN2_VL_7B_TEXT), vision_config=dict(QWEN2_VL_7B_VISION),
                         tie_word_embeddings=False, **QWEN2_VL_TOKEN_IDS,
                         architectures=["Qwen2VLForConditionalGeneration"])


def write_tokenizer(folder: Path, vocab_size: int, specials: Optional[Dict[int, str]] = None,
                    chat_template: Optional[str] = None) -> None:
    """A word-level tokenizer: "w<i>" for every id but the specials (default:
    LLaVA-OneVision's chatml specials and <image>), saved with chat_template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = specials if specials is not None else FAMILIES["llava_onevision"].specials
    vocab = {specials.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=list(specials.values()))
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)


def write_checkpoint_metadata(folder: Path, config) -> None:
    """Everything but the weights (the benchmark hands the engine its model)."""
    family = family_of(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(family.preprocessor(config)))
    (folder / "model.safetensors").touch()  # weights are supplied in memory
    write_tokenizer(folder, config.text_config.vocab_size, family.specials, family.chat_template)


def random_hf_model(config, device: str, dtype: torch.dtype, seed: int = 0):
    """transformers' model of the config's architecture with random weights,
    created on the device."""
    import transformers

    torch.manual_seed(seed)
    model_class = getattr(transformers, config.architectures[0])
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    return model.eval()


def pyvlm_model_from(hf_model, device: str, dtype: torch.dtype):
    """pyvlm's model of the same config holding a copy of hf_model's weights."""
    from pyvlm.models.registry import model_class_for

    config = hf_model.config
    with torch.device(device):
        model = model_class_for(config.architectures)(config).to(dtype)
    model.load_weights(hf_model.state_dict().items())
    return model.eval()
