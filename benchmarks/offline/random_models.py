"""Random-weight vision-language models of real shapes, built on the device
with no download: the configs of llava-onevision-qwen2-7b-ov-hf (Qwen2-7B +
SigLIP so400m), Qwen/Qwen2-VL-7B-Instruct (Qwen2-7B with M-RoPE + its 675M
ViT), meta-llama/Llama-3.2-11B-Vision-Instruct (Llama 3.1 8B with 8
gated cross-attention layers + a 32 + 8 layer tiled ViT),
llava-hf/llava-1.5-7b-hf (Vicuna-7B v1.5 + CLIP ViT-L/14-336) and
llava-hf/llava-v1.6-mistral-7b-hf (Mistral-7B-Instruct-v0.2 + the same CLIP,
anyres tiles), a word-level tokenizer covering the whole vocabulary (so
random tokens detokenize) with the family's special tokens and chat
template, and the real preprocessor settings. One writer serves every
family: a family is its special tokens, tokenizer roles, chat template and
preprocessor (RandomFamily)."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from tests.multimodal.hf_mllama import LLAMA_3_2_VISION as MLLAMA_PREPROCESSOR  # the real one
from tests.tiny_llava import MISTRAL_CHAT_TEMPLATE  # llava-hf/llava-v1.6-mistral-7b-hf's
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

# meta-llama/Llama-3.2-11B-Vision-Instruct's config.json, in transformers 5's
# nested form (rope_scaling {"rope_type": "llama3", ...} + rope_theta on the hub).
LLAMA_3_2_VISION_TEXT = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
    cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], num_attention_heads=32,
    num_key_value_heads=8, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    pad_token_id=128004)
LLAMA_3_2_VISION_VISION = dict(
    hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
    intermediate_size=5120, hidden_act="gelu", image_size=560, patch_size=14, num_channels=3,
    max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680,
    norm_eps=1e-5, supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2],
                                            [3, 1], [4, 1]])
# <|image|> is one past the text vocabulary: the tokenizer has 128257
# entries, transformers' text embedding vocab_size + 8 rows (the LM head
# vocab_size), so the model never emits it.
MLLAMA_IMAGE_TOKEN_ID = 128256
# Llama 3's special tokens that the chat and the config name (tokenizer.json
# of the 11B-Vision-Instruct); its other reserved ids stay plain words here.
LLAMA_3_SPECIALS = {
    128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>",
    128009: "<|eot_id|>", 128010: "<|python_tag|>", MLLAMA_IMAGE_TOKEN_ID: "<|image|>"}

# llava-hf/llava-1.5-7b-hf and llava-hf/llava-v1.6-mistral-7b-hf's config.json
# (text: lmsys/vicuna-7b-v1.5, mistralai/Mistral-7B-Instruct-v0.2; the
# vocabulary padded to 32064 around the added <image> and <pad>), in
# transformers 5's nested form.
VICUNA_7B = dict(
    model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
    max_position_embeddings=4096, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=32001)
MISTRAL_7B_INSTRUCT_V02 = dict(
    VICUNA_7B, model_type="mistral", intermediate_size=14336, num_key_value_heads=8,
    max_position_embeddings=32768, sliding_window=None,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
# openai/clip-vit-large-patch14-336, as both llava-hf configs nest it.
CLIP_VIT_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=24, num_attention_heads=16, image_size=336,
                      patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      projection_dim=768)
LLAVA_IMAGE_TOKEN_ID = 32000
LLAVA_V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
LLAVA_MODEL_KEYS = dict(image_token_index=LLAVA_IMAGE_TOKEN_ID, projector_hidden_act="gelu",
                        vision_feature_select_strategy="default", vision_feature_layer=-2,
                        tie_word_embeddings=False)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# preprocessor_config.json of llava-hf/llava-1.5-7b-hf (CLIP: shortest edge
# to 336, center crop 336x336, bicubic); the v1.6's adds the pinpoints.
LLAVA_15_PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
    "do_resize": True, "size": {"shortest_edge": 336}, "resample": 3, "do_center_crop": True,
    "crop_size": {"height": 336, "width": 336}, "do_rescale": True,
    "rescale_factor": 0.00392156862745098, "do_normalize": True, "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD, "do_convert_rgb": True}
LLAVA_NEXT_PREPROCESSOR = dict(
    LLAVA_15_PREPROCESSOR, image_processor_type="LlavaNextImageProcessor",
    processor_class="LlavaNextProcessor", aspect_ratio_setting="anyres")
# Llama 2's (Vicuna's, Mistral's) special tokens, and the two llava-hf adds.
LLAMA_2_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", LLAVA_IMAGE_TOKEN_ID: "<image>",
                    32001: "<pad>"}


@dataclass(frozen=True)
class RandomFamily:
    """What a random checkpoint of a family holds besides its config:
    special tokens (id -> text), the chat template (None: pyvlm's default
    for the architecture), preprocessor_config.json of a config, and the
    tokenizer's roles: eos, pad, bos (prepended to every encoding, as Llama
    3's and Llama 2's tokenizers do; None: no BOS, as Qwen's) and unk (Llama
    2's <unk> at id 0; None: unknown words read as the plain word w0)."""

    specials: Dict[int, str]
    chat_template: Optional[str]
    preprocessor: Callable[[object], dict]
    eos_token: str = "<|im_end|>"
    pad_token: str = "<|endoftext|>"
    bos_token: Optional[str] = None
    unk_token: Optional[str] = None


FAMILIES = {
    "llava_onevision": RandomFamily(
        {**CHATML_SPECIALS, IMAGE_TOKEN_ID: "<image>", VIDEO_TOKEN_ID: "<video>"}, None,
        lambda config: dict(PREPROCESSOR, image_grid_pinpoints=config.image_grid_pinpoints)),
    "qwen2_vl": RandomFamily(QWEN2_VL_SPECIALS, QWEN2_VL_CHAT_TEMPLATE,
                             lambda config: dict(QWEN2_VL_PREPROCESSOR)),
    "mllama": RandomFamily(LLAMA_3_SPECIALS, None, lambda config: dict(MLLAMA_PREPROCESSOR),
                           eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
                           bos_token="<|begin_of_text|>"),
    # LLaVA-1.5 has no template here: pyvlm's default for it is vicuna_v1.1
    # (SGLang's choice); llava-hf's LLaVA-NeXT-Mistral ships its own.
    "llava": RandomFamily(LLAMA_2_SPECIALS, None, lambda config: dict(LLAVA_15_PREPROCESSOR),
                          eos_token="</s>", pad_token="<pad>", bos_token="<s>",
                          unk_token="<unk>"),
    "llava_next": RandomFamily(
        LLAMA_2_SPECIALS, MISTRAL_CHAT_TEMPLATE,
        lambda config: dict(LLAVA_NEXT_PREPROCESSOR,
                            image_grid_pinpoints=config.image_grid_pinpoints),
        eos_token="</s>", pad_token="<pad>", bos_token="<s>", unk_token="<unk>"),
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


def llama_3_2_11b_vision_config():
    from transformers import MllamaConfig

    return MllamaConfig(text_config=dict(LLAMA_3_2_VISION_TEXT),
                        vision_config=dict(LLAMA_3_2_VISION_VISION),
                        image_token_index=MLLAMA_IMAGE_TOKEN_ID,
                        architectures=["MllamaForConditionalGeneration"])


def llava_1_5_7b_config():
    from transformers import LlavaConfig

    return LlavaConfig(text_config=dict(VICUNA_7B), vision_config=dict(CLIP_VIT_L_336),
                       **LLAVA_MODEL_KEYS, architectures=["LlavaForConditionalGeneration"])


def llava_next_7b_config():
    from transformers import LlavaNextConfig

    return LlavaNextConfig(text_config=dict(MISTRAL_7B_INSTRUCT_V02),
                           vision_config=dict(CLIP_VIT_L_336), **LLAVA_MODEL_KEYS,
                           image_grid_pinpoints=LLAVA_V16_PINPOINTS,
                           architectures=["LlavaNextForConditionalGeneration"])


def write_tokenizer(folder: Path, vocab_size: int, family: RandomFamily) -> None:
    """A word-level tokenizer: "w<i>" for every id but the family's specials,
    with its eos / pad / bos roles and chat template. Its size is
    vocab_size, or one past the largest special id when that is larger
    (Llama-3.2-Vision's <|image|> = vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = family.specials
    size = max(vocab_size, max(specials) + 1)
    vocab = {specials.get(i, f"w{i}"): i for i in range(size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=family.unk_token or "w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    roles = dict(eos_token=family.eos_token, pad_token=family.pad_token)
    if family.unk_token is not None:
        roles["unk_token"] = family.unk_token
    if family.bos_token is not None:
        bos = family.bos_token
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
        roles["bos_token"] = bos
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **roles,
                                   additional_special_tokens=list(specials.values()))
    if family.chat_template is not None:
        fast.chat_template = family.chat_template
    fast.save_pretrained(folder)


def write_checkpoint_metadata(folder: Path, config) -> None:
    """Everything but the weights (the benchmark hands the engine its model)."""
    family = family_of(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(family.preprocessor(config)))
    (folder / "model.safetensors").touch()  # weights are supplied in memory
    write_tokenizer(folder, config.text_config.vocab_size, family)


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
