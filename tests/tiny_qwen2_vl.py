"""Tiny random-weight Qwen2-VL and Qwen2.5-VL models built with transformers
itself, and checkpoints of them on disk.

The towers keep the released models' patch geometry (14-pixel patches, 2
frames per temporal patch, 2 x 2 merge) at small widths and depths, so the
real image processor settings apply. Qwen2.5-VL's window_size of 56 pixels
is 2 x 2 merged units: a 4 x 4-unit image has four windows, a 3 x 5 one
partial windows, and block 1 attends over whole frames. Weights are
perturbed after init (tests/tiny_models.py perturb_) so every layer, norm
and bias matters.

Token ids are fixed so the trained tokenizer and the configs agree: the
special tokens come first in the vocabulary.

`write_qwen2_vl_checkpoint` writes what transformers 5 writes
(`model.visual.*`, `model.language_model.*` weight names, nested
rope_parameters, sharded safetensors with an index);
`write_qwen2_vl_hub_style_checkpoint` writes the layout of the Qwen hub
repositories (`visual.*`, `model.layers.*`, `lm_head.*`, a flat config with
rope_scaling, torch_dtype, chat_template.json), which transformers 5 still
loads through its Qwen2VLForConditionalGeneration key renames.
"""

import json
from pathlib import Path

import torch

from tests.tiny_checkpoints import MAX_SHARD_SIZE, write_json
from tests.tiny_checkpoints import train_tokenizer as train_bpe_tokenizer
from tests.tiny_models import perturb_

VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
(ENDOFTEXT_ID, IM_START_ID, IM_END_ID, VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID,
 VIDEO_PAD_ID) = range(len(SPECIAL_TOKENS))

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
WINDOW_SIZE = 56  # pixels: 56 / MERGE_SIZE / PATCH_SIZE = 2 merged units a side
FULLATT_BLOCK_INDEXES = [1]
MIN_PIXELS = 56 * 56  # as the released processors: 3136
MAX_PIXELS = 28 * 28 * 64  # small, so test images stay at most 64 merged tokens
HIDDEN_SIZE = 64  # the language model's width, which the mergers project to

# Qwen/Qwen2-VL-7B-Instruct's chat template (Qwen2.5-VL ships the same one).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

VERSIONS = ("2", "2.5")


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")


# --- configs ------------------------------------------------------------------

def vision_config(version: str) -> dict:
    """Keyword arguments of Qwen2VLVisionConfig ("2") or Qwen2_5_VLVisionConfig ("2.5")."""
    _check_version(version)
    geometry = dict(patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
                    spatial_merge_size=MERGE_SIZE, in_channels=3, initializer_range=0.1)
    if version == "2":
        return dict(geometry, depth=2, embed_dim=64, num_heads=4, mlp_ratio=2,
                    hidden_size=HIDDEN_SIZE, hidden_act="quick_gelu")
    return dict(geometry, depth=3, hidden_size=64, num_heads=4, intermediate_size=96,
                out_hidden_size=HIDDEN_SIZE, hidden_act="silu", window_size=WINDOW_SIZE,
                fullatt_block_indexes=FULLATT_BLOCK_INDEXES, tokens_per_second=2)


def text_config() -> dict:
    """A tiny Qwen2-VL language model: head_dim 16, mrope_section sums to 8."""
    return dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=0.1,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": [2, 3, 3]},
                bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID)


def architecture(version: str) -> str:
    _check_version(version)
    return "Qwen2VLForConditionalGeneration" if version == "2" else \
        "Qwen2_5_VLForConditionalGeneration"


def qwen2_vl_config(version: str = "2"):
    """The transformers Qwen2VLConfig / Qwen2_5_VLConfig of the tiny model."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    config_class = Qwen2VLConfig if version == "2" else Qwen2_5_VLConfig
    return config_class(
        text_config=text_config(), vision_config=vision_config(version),
        image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False, architectures=[architecture(version)])


def tiny_qwen2_vl(version: str = "2", seed: int = 0):
    """An eval-mode float32 transformers Qwen2VLForConditionalGeneration
    (version "2") or Qwen2_5_VLForConditionalGeneration ("2.5")."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, architecture(version))(qwen2_vl_config(version))
    perturb_(model, seed + 1)
    return model.eval().float()


# --- tokenizer and processor files ----------------------------------------------

def train_tokenizer():
    """A byte-level BPE tokenizer: SPECIAL_TOKENS at ids 0..6, VOCAB_SIZE entries."""
    return train_bpe_tokenizer(SPECIAL_TOKENS, VOCAB_SIZE, {
        "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})


def preprocessor_config(version: str) -> dict:
    """preprocessor_config.json as Qwen/Qwen2-VL-7B-Instruct and
    Qwen/Qwen2.5-VL-7B-Instruct ship it (CLIP mean/std), with a small max_pixels."""
    return {
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "patch_size": PATCH_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor" if version == "2" else "Qwen2_5_VLProcessor",
    }


def generation_config() -> dict:
    """generation_config.json: the released models' stop tokens (<|im_end|>
    and <|endoftext|>) without their sampling defaults, so greedy parity
    tests stay greedy."""
    return {"bos_token_id": ENDOFTEXT_ID, "pad_token_id": ENDOFTEXT_ID,
            "eos_token_id": [IM_END_ID, ENDOFTEXT_ID]}


def _write_side_files(directory: Path, version: str) -> None:
    train_tokenizer().save_pretrained(directory)
    write_json(directory / "preprocessor_config.json", preprocessor_config(version))
    write_json(directory / "generation_config.json", generation_config())


def write_qwen2_vl_checkpoint(directory: Path, version: str = "2", seed: int = 0) -> Path:
    """A transformers-5 layout checkpoint of tiny_qwen2_vl(version, seed)."""
    directory = Path(directory)
    model = tiny_qwen2_vl(version, seed)
    model.save_pretrained(directory, max_shard_size=MAX_SHARD_SIZE, save_original_format=False)
    _write_side_files(directory, version)
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return directory


# --- the hub layout ---------------------------------------------------------------

def hub_weight_name(name: str) -> str:
    """The Qwen hub name of a transformers-5 parameter name."""
    for new, old in (("model.visual.", "visual."), ("model.language_model.", "model."),
                     ("lm_head.", "lm_head.")):
        if name.startswith(new):
            return old + name[len(new):]
    raise KeyError(name)


def hub_style_config(version: str = "2") -> dict:
    """config.json as the Qwen hub repositories hold it: text fields at the
    top level, rope_scaling {"type": "mrope"}, torch_dtype, "in_chans"."""
    text = text_config()
    rope = text.pop("rope_parameters")
    vision = vision_config(version)
    vision["in_chans"] = vision.pop("in_channels")
    vision.pop("initializer_range")
    return dict(
        text, architectures=[architecture(version)],
        model_type="qwen2_vl" if version == "2" else "qwen2_5_vl",
        vision_config=vision, rope_theta=rope["rope_theta"],
        rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
        image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
        hidden_act="silu", attention_dropout=0.0, max_window_layers=3,
        sliding_window=4096, use_sliding_window=False, use_cache=True,
        tie_word_embeddings=False, torch_dtype="float32",
        transformers_version="4.41.2" if version == "2" else "4.49.0.dev0")


def _legacy_tokenizer_config(directory: Path) -> None:
    """Rewrites tokenizer_config.json as the Qwen hub repositories hold it
    (tokenizer class and special tokens spelled out, chat template inside)."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class="Qwen2Tokenizer", bos_token=None, errors="replace",
                  model_max_length=32768, split_special_tokens=False, chat_template=CHAT_TEMPLATE,
                  additional_special_tokens=SPECIAL_TOKENS[1:],
                  added_tokens_decoder={str(i): {"content": token, "special": True,
                                                 "lstrip": False, "rstrip": False,
                                                 "normalized": False, "single_word": False}
                                        for i, token in enumerate(SPECIAL_TOKENS)})
    for key in ("backend", "extra_special_tokens"):
        config.pop(key, None)
    write_json(path, config)


def write_qwen2_vl_hub_style_checkpoint(directory: Path, version: str = "2",
                                        seed: int = 2) -> Path:
    """A Qwen hub layout checkpoint of tiny_qwen2_vl(version, seed).

    The weights are what transformers 5's save_pretrained writes by default
    (save_original_format=True reverts its Qwen2-VL key renames to the hub
    names); config.json, tokenizer_config.json and chat_template.json are
    rewritten in the hub repositories' older form."""
    directory = Path(directory)
    model = tiny_qwen2_vl(version, seed)
    model.save_pretrained(directory, max_shard_size=MAX_SHARD_SIZE)
    write_json(directory / "config.json", hub_style_config(version))
    _write_side_files(directory, version)
    _legacy_tokenizer_config(directory)
    write_json(directory / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    return directory
