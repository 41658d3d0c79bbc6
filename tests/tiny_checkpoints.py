"""Tiny LLaVA-OneVision checkpoints on disk, in the two layouts pyvlm must load.

`write_checkpoint` writes what transformers 5 writes (`model.language_model.*`
weight names, nested rope parameters, sharded safetensors with an index);
`write_hub_style_checkpoint` writes what the llava-hf hub repositories hold,
as older transformers wrote them (`language_model.model.*`, flat rope_theta,
`torch_dtype`, one model.safetensors, chat_template.json). Both carry a
byte-level BPE tokenizer whose special tokens have the ids tests/tiny_models.py
fixes, the LLaVA-OneVision chat template and image-processor configs matching
the tiny vision tower. The weights are those of `tiny_llava_onevision`.
"""

import json
from pathlib import Path

from tests.tiny_models import (GRID_PINPOINTS, IMAGE_TOKEN_ID, SPECIAL_TOKENS, VIDEO_TOKEN_ID,
                               VISION_IMAGE_SIZE, VISION_PATCH_SIZE, VOCAB_SIZE, text_config,
                               tiny_llava_onevision, vision_config)

# llava-hf/llava-onevision-qwen2-*-ov-hf's chat template (images first, then
# videos, then text; note the space after the role, as upstream has it).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MAX_SHARD_SIZE = "100KB"  # the tiny models are ~0.5 MB: several shards
NUM_FEATURES_PER_TILE = (VISION_IMAGE_SIZE // VISION_PATCH_SIZE) ** 2

_CORPUS_WORDS = ("the a of and to in is it that was for on are with as his they be at one have "
                 "this from or had by hot word but what some we can out other were all there when "
                 "up use your how said an each she which do their time if will way about many then "
                 "them write would like so these her long make thing see him two has look more day "
                 "could go come did number sound no most people my over know water than call first "
                 "user assistant system image video describe picture color red green blue cat dog "
                 "What is in this image? Paris France capital 0 1 2 3 4 5 6 7 8 9 , . ! ? ").split()


def _corpus(num_lines: int = 400):
    """Deterministic pseudo-English lines (a fixed LCG, no global RNG)."""
    state = 12345
    for _ in range(num_lines):
        words = []
        for _ in range(12):
            state = (state * 1103515245 + 12345) % 2**31
            words.append(_CORPUS_WORDS[state % len(_CORPUS_WORDS)])
        yield " ".join(words)


LLAVA_EXTRA_SPECIAL_TOKENS = {"image_token": "<image>", "video_token": "<video>"}


def train_tokenizer(special_tokens=SPECIAL_TOKENS, vocab_size=VOCAB_SIZE,
                    extra_special_tokens=LLAVA_EXTRA_SPECIAL_TOKENS, **named_tokens):
    """A byte-level BPE tokenizer: special_tokens at the first ids (LLaVA's
    by default), vocab_size entries, trained in a second on a fixed corpus.
    named_tokens: PreTrainedTokenizerFast keywords (bos_token, add_bos_token,
    ...) over the default eos "<|im_end|>" and pad "<|endoftext|>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(_corpus(), trainer)
    assert backend.get_vocab_size() == vocab_size, backend.get_vocab_size()
    named_tokens = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", **named_tokens}
    return PreTrainedTokenizerFast(tokenizer_object=backend,
                                   extra_special_tokens=dict(extra_special_tokens), **named_tokens)


def image_processor_config() -> dict:
    """LlavaOnevisionImageProcessor settings for the tiny SigLIP tower."""
    side = {"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE}
    return {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "processor_class": "LlavaOnevisionProcessor",
        "size": side, "crop_size": side, "image_grid_pinpoints": GRID_PINPOINTS,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 3, "rescale_factor": 1 / 255,
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_pad": True,
        "do_convert_rgb": True,
    }


def processor_config(nested_image_processor: bool) -> dict:
    """processor_config.json; transformers 5 nests the image processor in it."""
    config = {"processor_class": "LlavaOnevisionProcessor", "image_token": "<image>",
              "video_token": "<video>", "num_image_tokens": NUM_FEATURES_PER_TILE,
              "vision_feature_select_strategy": "full"}
    if nested_image_processor:
        config["image_processor"] = image_processor_config()
    return config


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_checkpoint(directory: Path, backbone: str, seed: int) -> Path:
    """A transformers-5 layout checkpoint of tiny_llava_onevision(backbone, seed)."""
    directory = Path(directory)
    model = tiny_llava_onevision(backbone, seed)
    model.save_pretrained(directory, max_shard_size=MAX_SHARD_SIZE, save_original_format=False)
    train_tokenizer().save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    write_json(directory / "preprocessor_config.json", image_processor_config())
    write_json(directory / "processor_config.json", processor_config(nested_image_processor=True))
    return directory


# --- the old hub layout -------------------------------------------------------

_HUB_PREFIXES = [  # transformers-5 module path -> name in llava-hf's safetensors
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
]


def hub_weight_name(name: str) -> str:
    """The llava-hf hub name of a transformers-5 parameter name."""
    for new, old in _HUB_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    raise KeyError(name)


def hub_style_config(backbone: str = "qwen2") -> dict:
    """config.json as transformers 4.45 wrote it for llava-hf's OneVision repos."""
    text = dict(text_config(backbone), architectures=["Qwen2ForCausalLM"], torch_dtype="float32")
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision", "ignore_index": -100,
        "image_grid_pinpoints": GRID_PINPOINTS, "image_token_index": IMAGE_TOKEN_ID,
        "video_token_index": VIDEO_TOKEN_ID, "projector_hidden_act": "gelu",
        "text_config": text, "vision_config": vision_config(),
        "tie_word_embeddings": text["tie_word_embeddings"], "torch_dtype": "float32",
        "transformers_version": "4.45.0.dev0", "use_image_newline_parameter": True,
        "vision_aspect_ratio": "anyres_max_9", "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
    }


def _legacy_tokenizer_config(directory: Path) -> None:
    """Rewrites tokenizer_config.json the way transformers 4 wrote it."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", bos_token=None,
                  additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                  added_tokens_decoder={str(i): {"content": token, "special": True, "lstrip": False,
                                                 "rstrip": False, "normalized": False,
                                                 "single_word": False}
                                        for i, token in enumerate(SPECIAL_TOKENS)})
    config.pop("backend", None)
    write_json(path, config)


def write_hub_style_checkpoint(directory: Path, seed: int = 2) -> Path:
    """An old-hub layout checkpoint of tiny_llava_onevision("qwen2", seed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_llava_onevision("qwen2", seed)
    tensors = {hub_weight_name(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    write_json(directory / "config.json", hub_style_config())
    train_tokenizer().save_pretrained(directory)
    _legacy_tokenizer_config(directory)
    write_json(directory / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(directory / "preprocessor_config.json", image_processor_config())
    write_json(directory / "processor_config.json", processor_config(nested_image_processor=False))
    return directory


# --- the LLaVA-NeXT repository's layout (lmms-lab/llava-onevision-qwen2-*) -----

_ORIGINAL_PREFIXES = [  # transformers-5 module path -> name in the lmms-lab safetensors
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.image_newline", "model.image_newline"),
]


def original_weight_name(name: str) -> str:
    for new, old in _ORIGINAL_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    raise KeyError(name)


def original_onevision_config(tower_dir: Path, backbone: str = "qwen2") -> dict:
    """config.json as lmms-lab/llava-onevision-qwen2-0.5b-ov has it: the
    Qwen2 config flat, mm_* keys, the tower named by mm_vision_tower (here a
    local folder holding the tiny SigLIP's config), pinpoints in the
    repository's "(1x1),...,(6x6)" form."""
    text = text_config(backbone)
    return dict(
        text, architectures=["LlavaQwenForCausalLM"], model_type="llava",
        image_aspect_ratio="anyres_max_9", image_grid_pinpoints="(1x1),...,(6x6)",
        image_crop_resolution=None, image_split_resolution=None,
        mm_hidden_size=vision_config()["hidden_size"], mm_patch_merge_type="spatial_unpad",
        mm_projector_lr=None, mm_projector_type="mlp2x_gelu", mm_resampler_type=None,
        mm_spatial_pool_mode="bilinear", mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,"
        "mm_language_model", mm_use_im_patch_token=False, mm_use_im_start_end=False,
        mm_vision_select_feature="patch", mm_vision_select_layer=-2,
        mm_vision_tower=str(tower_dir), mm_vision_tower_lr=2e-06,
        vision_tower_pretrained=None, tokenizer_model_max_length=32768,
        tokenizer_padding_side="right", torch_dtype="float32", use_mm_proj=True)


def write_onevision_original_checkpoint(directory: Path, seed: int = 0) -> Path:
    """tiny_llava_onevision("qwen2", seed) in lmms-lab's layout. The
    repository's SigLIP tower drops its last encoder layer and reads the
    output of the one before (hidden_states[-1] of what is left): the tower
    folder's config has one layer more than the weights inside hold."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tower_dir = directory.parent / f"{directory.name}-siglip"
    for folder in (directory, tower_dir):
        folder.mkdir(parents=True, exist_ok=True)
    model = tiny_llava_onevision("qwen2", seed)
    tensors = {original_weight_name(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    write_json(directory / "config.json", original_onevision_config(tower_dir))
    train_tokenizer().save_pretrained(directory)
    tower = dict(vision_config(), num_hidden_layers=vision_config()["num_hidden_layers"] + 1)
    write_json(tower_dir / "config.json", tower)
    write_json(tower_dir / "preprocessor_config.json",
               {k: v for k, v in image_processor_config().items()
                if k not in ("image_grid_pinpoints", "processor_class")}
               | {"image_processor_type": "SiglipImageProcessor"})
    return directory
