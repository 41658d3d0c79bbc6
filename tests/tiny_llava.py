"""Tiny random-weight LLaVA-1.5 and LLaVA-NeXT models built with transformers
itself, and checkpoints of them on disk in two layouts.

The CLIP tower keeps the released geometry at a small width: 14-pixel
patches on a 56-pixel tile (4 x 4 = 16 patches + CLS), features from the
second-to-last layer without CLS ("default"), a two-layer GELU projector
with biases. LLaVA-NeXT adds anyres tiling over image_grid_pinpoints (the
released [[336, 672], ...] divided by 6) and image_newline. Weights are
perturbed after init (tests/tiny_models.py perturb_), image_newline
included. With vision_feature_layer -2 the tower's last layer and
post_layernorm are never used, as in the released models.

Token ids. The base vocabulary (NUM_BASE_TOKENS entries, special tokens
first) is what the backbone's own tokenizer holds; "<image>" and "<pad>"
come right after it, as llava-hf's converters add them after the 32000 /
128256 base tokens (IMAGE_TOKEN_ID 382 stands for 32000 / 128256, PAD_ID 383
for 32001 / 128257); VOCAB_SIZE counts both (llava-hf pads to a multiple of
64 on top; these do not). Backbones "llama" (Vicuna-7B v1.5, LLaVA-1.5) and
"mistral" (Mistral-7B-Instruct-v0.2, LLaVA-1.6-Mistral) have <unk> <s> </s>
at 0 1 2; "llama3" (Llama-3-8B-Instruct, lmms-lab's LLaVA-NeXT-8B) has the
Llama 3 special tokens of tests/tiny_mllama.py at 0 ... 10 (id = released id
- 128000). Every tokenizer prepends its BOS, as the released ones do.

Layouts:
- `write_llava_checkpoint` / `write_llava_next_checkpoint`: what transformers
  5 writes (`model.language_model.*`, `model.vision_tower.*` without a
  `vision_model.` level, `model.multi_modal_projector.linear_{1,2}.*`,
  `model.image_newline`, `lm_head.weight`; sharded safetensors with an index),
  the processor's files (processor_config.json with the image processor
  nested, chat_template.jinja, tokenizer), preprocessor_config.json as the
  llava-hf repositories ship it and generation_config.json.
- `write_llava_original_checkpoint` / `write_llava_next_original_checkpoint`:
  the authors' layout (haotian-liu/LLaVA, LLaVA-VL/LLaVA-NeXT): one flat
  Llama / Mistral config with the mm_* keys, weights under LLaVA's module
  names (see ORIGINAL_PREFIXES), the backbone's tokenizer without <image>
  (LLaVA splits prompts on the "<image>" text and puts IMAGE_TOKEN_INDEX -200
  there), and the CLIP tower named by mm_vision_tower: here the absolute path
  of a CLIP folder written next to the checkpoint (`clip_dir`).

What could be verified of the real layouts (public sources, read while
writing this; the rest follows them by analogy and is marked unverified):
- weight names: transformers' convert_llava_weights_to_hf.py and
  convert_llava_next_weights_to_hf.py map `model.vision_tower.` -> ``,
  `model.mm_projector.{0,2}` -> `multi_modal_projector.linear_{1,2}`,
  `model.*` -> language model, `lm_head` -> LM head, `model.image_newline`
  -> `image_newline`; LLaVA's llava_arch.py builds `model.vision_tower`
  (CLIPVisionTower, whose `.vision_tower` is a CLIPVisionModel, hence
  `model.vision_tower.vision_tower.vision_model.*`), `model.mm_projector`
  (nn.Sequential(Linear, GELU, Linear): indices 0 and 2) and
  `model.image_newline` (only when mm_patch_merge_type has "unpad").
- tower inside or not: the LLaVA-1.5 converter loads the tower separately
  (`model.get_vision_tower().load_model()` before saving), so
  liuhaotian/llava-v1.5-7b holds no tower weights ("separate"); the v1.6
  converter reads the tower from the checkpoint ("inside"), whose config has
  unfreeze_mm_vision_tower true (which makes LLaVA build the tower before
  loading the checkpoint, so the checkpoint's tower wins).
- config keys: liuhaotian/llava-v1.6-vicuna-7b's config.json (copied into
  PaddleMIX's tests) gives the v1.6 key set used here; llava_mistral.py
  gives model_type "llava_mistral" for LlavaMistralForCausalLM. The v1.5
  key set (no rope_theta, no mm_patch_merge_type) and lmms-lab's Llama-3
  one are from memory, unverified.
- the string pinpoints "(1x1),...,(3x3)": LLaVA-NeXT's mm_utils.py expands
  the first and last "(AxB)" into the full grid, times the tower's image
  size (expand_grid_pinpoints). LLaVA reads pinpoints as (width, height),
  transformers as (height, width); the sets used here are symmetric.
- openai/clip-vit-large-patch14-336's preprocessor_config.json (int size
  and crop_size, CLIPFeatureExtractor). That repository is a whole CLIPModel
  (text tower too, config model_type "clip"); clip_layout="full" writes
  that, the default "vision" writes a CLIPVisionModel as transformers 4
  saved one (`vision_model.*`; transformers 5 itself drops that level).
- chat templates: llava-hf/llava-1.5-7b-hf's and llava-v1.6-mistral-7b-hf's
  (the latter as its loaded processor prints it, "</s> " after an assistant
  turn; an older revision had "<\\s> "); llama3-llava-next-8b-hf's from two
  identical third-party copies; llava-hf's NeXT preprocessor_config.json
  (aspect_ratio_setting "anyres"). The original-layout tokenizer configs
  (LlamaTokenizer, pad <unk>, the Mistral / Llama 3 Instruct templates) are
  from memory, unverified.
- liuhaotian/llava-v1.5-7b ships PyTorch .bin shards (from memory); the
  original-layout writers write safetensors shards with an index.
"""

import re
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from tests.tiny_checkpoints import MAX_SHARD_SIZE, write_json
from tests.tiny_checkpoints import train_tokenizer as train_bpe_tokenizer
from tests.tiny_mllama import SPECIAL_TOKENS as LLAMA3_SPECIAL_TOKENS
from tests.tiny_models import perturb_

NUM_BASE_TOKENS = 382  # the backbone tokenizer's own vocabulary
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
IMAGE_TOKEN_ID, PAD_ID = NUM_BASE_TOKENS, NUM_BASE_TOKENS + 1  # as 32000 and 32001
VOCAB_SIZE = NUM_BASE_TOKENS + 2

LLAMA2_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # Vicuna's and Mistral's first ids
UNK_ID, BOS_ID, EOS_ID = range(3)
(LLAMA3_BOS_ID, LLAMA3_END_OF_TEXT_ID, _, _, _, _, START_HEADER_ID, END_HEADER_ID, _,
 EOT_ID, _) = range(len(LLAMA3_SPECIAL_TOKENS))
BACKBONES = ("llama", "mistral", "llama3")

TILE_SIZE = 56
PATCH_SIZE = 14
NUM_PATCHES = (TILE_SIZE // PATCH_SIZE) ** 2  # 16 features per tile (CLS dropped)
VISION_HIDDEN_SIZE = 32
HIDDEN_SIZE = 64
GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]  # released / 6
RANGE_GRID_PINPOINTS = "(1x1),...,(3x3)"  # the string form of some lmms-lab configs
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# llava-hf/llava-1.5-7b-hf's chat template (llava-v1.6-vicuna-7b-hf ships the same).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-v1.6-mistral-7b-hf's (no generation prompt: "[/INST]" ends a user turn).
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
# llava-hf/llama3-llava-next-8b-hf's (no BOS in it: the tokenizer prepends it).
LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# The backbones' own templates, in the original layouts' tokenizer_config.json.
MISTRAL_INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
LLAMA3_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def _check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")


# --- configs ------------------------------------------------------------------

def clip_vision_config() -> dict:
    """Keyword arguments of CLIPVisionConfig: CLIP ViT-L/14-336's shape, tiny."""
    return dict(model_type="clip_vision_model", hidden_size=VISION_HIDDEN_SIZE,
                intermediate_size=64, projection_dim=VISION_HIDDEN_SIZE, num_hidden_layers=3,
                num_attention_heads=4, image_size=TILE_SIZE, patch_size=PATCH_SIZE,
                hidden_act="quick_gelu", layer_norm_eps=1e-5)


# backbone -> (model_type, layers, max positions, rope theta, bos, eos), as the
# released Vicuna-7B v1.5, Mistral-7B-Instruct-v0.2 and Llama-3-8B-Instruct
_TEXT_MODELS = {
    "llama": ("llama", 3, 4096, 10000.0, BOS_ID, EOS_ID),
    "mistral": ("mistral", 2, 32768, 1000000.0, BOS_ID, EOS_ID),
    "llama3": ("llama", 2, 8192, 500000.0, LLAMA3_BOS_ID, EOT_ID),
}


def text_config(backbone: str = "llama") -> dict:
    """Keyword arguments of the LlamaConfig / MistralConfig: head_dim 16, GQA 4 / 2."""
    _check_backbone(backbone)
    model_type, num_layers, max_positions, rope_theta, bos, eos = _TEXT_MODELS[backbone]
    config = dict(model_type=model_type, vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE,
                  intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, hidden_act="silu",
                  max_position_embeddings=max_positions, initializer_range=0.1,
                  rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                  bos_token_id=bos, eos_token_id=eos, pad_token_id=PAD_ID,
                  tie_word_embeddings=False)
    if backbone == "mistral":
        config["sliding_window"] = None  # as Mistral-7B-Instruct-v0.2
    return config


def _common_config(backbone: str) -> dict:
    return dict(text_config=text_config(backbone), vision_config=clip_vision_config(),
                image_token_index=IMAGE_TOKEN_ID, projector_hidden_act="gelu",
                vision_feature_select_strategy="default", vision_feature_layer=-2,
                multimodal_projector_bias=True, tie_word_embeddings=False,
                image_seq_length=NUM_PATCHES)


def llava_config(backbone: str = "llama"):
    """The transformers LlavaConfig of the tiny LLaVA-1.5."""
    from transformers import LlavaConfig

    return LlavaConfig(**_common_config(backbone),
                       architectures=["LlavaForConditionalGeneration"])


def llava_next_config(backbone: str = "mistral", grid_pinpoints=GRID_PINPOINTS):
    """The transformers LlavaNextConfig of the tiny LLaVA-NeXT."""
    from transformers import LlavaNextConfig

    return LlavaNextConfig(**_common_config(backbone), image_grid_pinpoints=grid_pinpoints,
                           architectures=["LlavaNextForConditionalGeneration"])


def _tiny(model_class, config, seed: int):
    torch.manual_seed(seed)
    model = model_class(config)
    perturb_(model, seed + 1)
    return model.eval().float()


def tiny_llava(seed: int = 0, backbone: str = "llama"):
    """An eval-mode float32 transformers LlavaForConditionalGeneration, the
    same for the same arguments."""
    from transformers import LlavaForConditionalGeneration

    return _tiny(LlavaForConditionalGeneration, llava_config(backbone), seed)


def tiny_llava_next(seed: int = 1, backbone: str = "mistral", grid_pinpoints=GRID_PINPOINTS):
    """An eval-mode float32 transformers LlavaNextForConditionalGeneration
    (image_newline perturbed like every other weight). The weights do not
    depend on grid_pinpoints."""
    from transformers import LlavaNextForConditionalGeneration

    return _tiny(LlavaNextForConditionalGeneration, llava_next_config(backbone, grid_pinpoints),
                 seed)


def expand_grid_pinpoints(pinpoints: Union[str, List], tile_size: int = TILE_SIZE) -> List:
    """A list of [a, b] pixel pinpoints: the list as is, or the string form
    "(1x1),...,(3x3)" expanded as LLaVA-NeXT's mm_utils does (every (i, j)
    from the first to the last pair, times the tower's image size)."""
    if not isinstance(pinpoints, str):
        return [list(pair) for pair in pinpoints]
    pairs = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
    (first_i, first_j), (last_i, last_j) = [tuple(map(int, pair)) for pair in (pairs[0], pairs[-1])]
    return [[i * tile_size, j * tile_size] for i in range(first_i, last_i + 1)
            for j in range(first_j, last_j + 1)]


# --- tokenizers and processors --------------------------------------------------

def _named_tokens(backbone: str) -> dict:
    if backbone == "llama3":
        return dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None)
    return dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=None)


def _special_tokens(backbone: str) -> List[str]:
    return LLAMA3_SPECIAL_TOKENS if backbone == "llama3" else LLAMA2_SPECIAL_TOKENS


def train_base_tokenizer(backbone: str = "llama"):
    """The backbone's own tokenizer: its special tokens first,
    NUM_BASE_TOKENS entries, BOS prepended; no <image>, no pad token."""
    _check_backbone(backbone)
    return train_bpe_tokenizer(_special_tokens(backbone), NUM_BASE_TOKENS, {},
                               add_bos_token=True, **_named_tokens(backbone))


def train_tokenizer(backbone: str = "llama"):
    """train_base_tokenizer plus <image> (IMAGE_TOKEN_ID) and the pad token
    <pad> (PAD_ID), added after the base vocabulary as llava-hf adds them."""
    _check_backbone(backbone)
    tokenizer = train_bpe_tokenizer(_special_tokens(backbone), NUM_BASE_TOKENS,
                                    {"image_token": IMAGE_TOKEN}, add_bos_token=True,
                                    **_named_tokens(backbone))
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, PAD_TOKEN])
    assert ids == [IMAGE_TOKEN_ID, PAD_ID] and len(tokenizer) == VOCAB_SIZE, ids
    return tokenizer


def chat_template(backbone: str) -> str:
    """The llava-hf repository's chat template for a backbone."""
    _check_backbone(backbone)
    return {"llama": LLAVA_CHAT_TEMPLATE, "mistral": MISTRAL_CHAT_TEMPLATE,
            "llama3": LLAMA3_CHAT_TEMPLATE}[backbone]


def llava_preprocessor_config() -> dict:
    """preprocessor_config.json as llava-hf/llava-1.5-7b-hf ships it (CLIP's
    resize to the shortest edge and center crop), with a 56-pixel tile."""
    return {
        "crop_size": {"height": TILE_SIZE, "width": TILE_SIZE}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": CLIP_MEAN, "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD, "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": TILE_SIZE},
    }


def llava_next_preprocessor_config(grid_pinpoints=GRID_PINPOINTS) -> dict:
    """preprocessor_config.json as llava-hf/llava-v1.6-mistral-7b-hf ships it."""
    return dict(llava_preprocessor_config(), aspect_ratio_setting="anyres",
                image_grid_pinpoints=[list(pair) for pair in grid_pinpoints],
                image_processor_type="LlavaNextImageProcessor",
                processor_class="LlavaNextProcessor")


def _processor(processor_class, image_processor_class, preprocessor: dict, backbone: str):
    """As llava-hf's processor_config.json sets it: patch 14, one CLS, "default"."""
    settings = {k: v for k, v in preprocessor.items()
                if k not in ("image_processor_type", "processor_class", "aspect_ratio_setting")}
    return processor_class(image_processor=image_processor_class(**settings),
                           tokenizer=train_tokenizer(backbone), patch_size=PATCH_SIZE,
                           vision_feature_select_strategy="default",
                           num_additional_image_tokens=1, chat_template=chat_template(backbone))


def llava_processor(backbone: str = "llama"):
    """transformers' LlavaProcessor of the tiny checkpoint (PIL CLIP image
    processor, trained tokenizer, llava-hf's template)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    return _processor(LlavaProcessor, CLIPImageProcessorPil, llava_preprocessor_config(),
                      backbone)


def llava_next_processor(backbone: str = "mistral", grid_pinpoints=GRID_PINPOINTS):
    """transformers' LlavaNextProcessor of the tiny checkpoint."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    return _processor(LlavaNextProcessor, LlavaNextImageProcessorPil,
                      llava_next_preprocessor_config(grid_pinpoints), backbone)


def generation_config(backbone: str) -> dict:
    """generation_config.json: the released stop tokens (Llama 3 Instruct
    stops on <|end_of_text|> and <|eot_id|>), no sampling defaults."""
    _check_backbone(backbone)
    if backbone == "llama3":
        return {"bos_token_id": LLAMA3_BOS_ID, "eos_token_id": [LLAMA3_END_OF_TEXT_ID, EOT_ID],
                "pad_token_id": PAD_ID}
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


# --- the transformers-5 layout -----------------------------------------------------

def _save_transformers_checkpoint(directory: Path, model, processor, preprocessor: dict,
                                  backbone: str) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size=MAX_SHARD_SIZE, save_original_format=False)
    processor.save_pretrained(directory)
    write_json(directory / "preprocessor_config.json", preprocessor)
    write_json(directory / "generation_config.json", generation_config(backbone))
    return directory


def write_llava_checkpoint(directory: Path, seed: int = 0, backbone: str = "llama") -> Path:
    """A transformers-5 layout checkpoint of tiny_llava(seed, backbone)."""
    return _save_transformers_checkpoint(directory, tiny_llava(seed, backbone),
                                         llava_processor(backbone), llava_preprocessor_config(),
                                         backbone)


def write_llava_next_checkpoint(directory: Path, seed: int = 1, backbone: str = "mistral",
                                grid_pinpoints=GRID_PINPOINTS) -> Path:
    """A transformers-5 layout checkpoint of tiny_llava_next(seed, backbone, grid_pinpoints)."""
    return _save_transformers_checkpoint(
        directory, tiny_llava_next(seed, backbone, grid_pinpoints),
        llava_next_processor(backbone, grid_pinpoints),
        llava_next_preprocessor_config(grid_pinpoints), backbone)


# --- the original layout: weights -----------------------------------------------------

ORIGINAL_PREFIXES = [  # transformers-5 name -> name in the authors' checkpoints
    ("model.language_model.", "model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("model.image_newline", "model.image_newline"),
    ("lm_head.", "lm_head."),
]
TOWER_PREFIX = "model.vision_tower."


def original_weight_name(name: str) -> str:
    """The LLaVA-code name of a transformers-5 parameter name."""
    for new, old in ORIGINAL_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    raise KeyError(name)


def clip_weight_name(name: str) -> str:
    """The CLIP-folder name (`vision_model.*`) of a transformers-5 tower name."""
    if not name.startswith(TOWER_PREFIX):
        raise KeyError(name)
    return "vision_model." + name[len(TOWER_PREFIX):]


def original_state_dict(model, tower: str = "inside") -> dict:
    """The model's tensors under LLaVA's names; tower "separate" leaves the
    CLIP tower out (it lives in the folder mm_vision_tower names)."""
    _check_tower(tower)
    return {original_weight_name(name): tensor.contiguous()
            for name, tensor in model.state_dict().items()
            if tower == "inside" or not name.startswith(TOWER_PREFIX)}


def _check_tower(tower: str) -> None:
    if tower not in ("inside", "separate"):
        raise ValueError(f"tower must be 'inside' or 'separate', got {tower!r}")


def write_sharded_safetensors(directory: Path, tensors: dict) -> None:
    """model-0000i-of-0000n.safetensors shards and model.safetensors.index.json,
    as save_pretrained shards (MAX_SHARD_SIZE)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, str(directory / filename),
                  metadata={"format": "pt"})
    total = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    write_json(directory / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename})


# --- the original layout: the CLIP folder -----------------------------------------------

def openai_clip_preprocessor_config() -> dict:
    """preprocessor_config.json as openai/clip-vit-large-patch14-336 ships it
    (the old feature-extractor form: int size and crop_size)."""
    return {"crop_size": TILE_SIZE, "do_center_crop": True, "do_normalize": True,
            "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3, "size": TILE_SIZE}


def pretrained_clip_tower(seed: int):
    """A stand-in for openai's CLIP weights before LLaVA fine-tuned the tower:
    a tiny CLIPVisionModel unlike any tiny_llava / tiny_llava_next tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed + 1000)
    config = {k: v for k, v in clip_vision_config().items() if k != "model_type"}
    tower = CLIPVisionModel(CLIPVisionConfig(**config))
    perturb_(tower, seed + 1001)
    return tower.eval()


def _clip_text_config() -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                pad_token_id=1, hidden_act="quick_gelu", projection_dim=VISION_HIDDEN_SIZE)


def write_clip_checkpoint(directory: Path, tower_state: dict, layout: str = "vision") -> Path:
    """A CLIP folder holding tower_state (a CLIPVisionModel state dict under
    transformers-5 names): layout "vision" as transformers 4's
    CLIPVisionModel.save_pretrained wrote it (config model_type
    clip_vision_model, `vision_model.*`), "full" as
    openai/clip-vit-large-patch14-336 is (a CLIPModel: config model_type
    clip with text_config and vision_config, `vision_model.*`,
    `text_model.*`, the projections, logit_scale); both with openai's
    preprocessor_config.json."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"vision_model." + name: tensor.contiguous() for name, tensor in tower_state.items()}
    vision = {k: v for k, v in clip_vision_config().items() if k != "model_type"}
    if layout == "vision":
        config = dict(vision, architectures=["CLIPVisionModel"], model_type="clip_vision_model",
                      torch_dtype="float32", transformers_version="4.31.0")
    elif layout == "full":
        config, text_tensors = _full_clip(vision)
        tensors.update(text_tensors)
    else:
        raise ValueError(f"layout must be 'vision' or 'full', got {layout!r}")
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_json(directory / "config.json", config)
    write_json(directory / "preprocessor_config.json", openai_clip_preprocessor_config())
    return directory


def _full_clip(vision: dict):
    """(config.json, the non-vision tensors) of a tiny CLIPModel."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=_clip_text_config(), vision_config=vision,
                        projection_dim=VISION_HIDDEN_SIZE, architectures=["CLIPModel"])
    model = CLIPModel(config)
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()
               if not name.startswith("vision_model.")}
    return dict(config.to_dict(), torch_dtype="float32"), tensors


# --- the original layout: configs and tokenizers ---------------------------------------------

def _original_text_fields(backbone: str) -> dict:
    """The flat Llama / Mistral config fields of the backbone."""
    text = text_config(backbone)
    fields = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                   "num_hidden_layers", "num_key_value_heads", "rms_norm_eps",
                                   "max_position_embeddings", "vocab_size", "hidden_act",
                                   "bos_token_id", "eos_token_id", "tie_word_embeddings")}
    fields.update(initializer_range=0.02, use_cache=True, torch_dtype="float32")
    if backbone != "mistral":  # MistralConfig had no rope_scaling then
        fields["rope_scaling"] = None
    return fields


def original_llava_config(clip_path: Union[str, Path], tower: str = "separate") -> dict:
    """config.json of liuhaotian/llava-v1.5-7b (LlavaLlamaForCausalLM,
    model_type "llava", image_aspect_ratio "pad", no rope_theta and no
    mm_patch_merge_type: LLaVA's defaults 10000 and "flat"). tower "inside"
    adds unfreeze_mm_vision_tower, as the v1.6 configs whose tower is in the
    checkpoint have it."""
    _check_tower(tower)
    config = dict(
        _original_text_fields("llama"), _name_or_path="lmsys/vicuna-7b-v1.5",
        architectures=["LlavaLlamaForCausalLM"], model_type="llava", pad_token_id=UNK_ID,
        freeze_mm_mlp_adapter=False, image_aspect_ratio="pad", max_length=4096,
        mm_hidden_size=VISION_HIDDEN_SIZE, mm_projector_type="mlp2x_gelu",
        mm_use_im_patch_token=False, mm_use_im_start_end=False,
        mm_vision_select_feature="patch", mm_vision_select_layer=-2,
        mm_vision_tower=str(clip_path), pretraining_tp=1, transformers_version="4.31.0",
        tune_mm_mlp_adapter=False, use_mm_proj=True)
    if tower == "inside":
        config["unfreeze_mm_vision_tower"] = True
    return config


# backbone -> (architecture, model_type, base model, transformers_version, extra keys)
_ORIGINAL_NEXT = {
    "mistral": ("LlavaMistralForCausalLM", "llava_mistral", "mistralai/Mistral-7B-Instruct-v0.2",
                "4.36.2", {"sliding_window": None, "attention_dropout": 0.0}),
    "llama3": ("LlavaLlamaForCausalLM", "llava", "meta-llama/Meta-Llama-3-8B-Instruct",
               "4.40.0.dev0", {"attention_bias": False, "attention_dropout": 0.0,
                               "pretraining_tp": 1}),
}


def original_llava_next_config(clip_path: Union[str, Path], backbone: str = "mistral",
                               grid_pinpoints=GRID_PINPOINTS) -> dict:
    """config.json of liuhaotian/llava-v1.6-mistral-7b ("mistral") or
    lmms-lab/llama3-llava-next-8b ("llama3"): the v1.6 key set
    (anyres, spatial_unpad, the unused 224 crop/split resolutions, the tower
    unfrozen and in the checkpoint). grid_pinpoints: a list, written as
    a list of pairs, or the string form, written as is."""
    if backbone not in _ORIGINAL_NEXT:
        raise ValueError(f"backbone must be one of {tuple(_ORIGINAL_NEXT)}, got {backbone!r}")
    architecture, model_type, base, version, extra = _ORIGINAL_NEXT[backbone]
    text = text_config(backbone)
    max_tokens = text["max_position_embeddings"] if backbone == "llama3" else 4096
    return dict(
        _original_text_fields(backbone), **extra, _name_or_path=base,
        architectures=[architecture], model_type=model_type,
        rope_theta=text["rope_parameters"]["rope_theta"],
        freeze_mm_mlp_adapter=False, freeze_mm_vision_resampler=False,
        image_aspect_ratio="anyres", image_crop_resolution=224, image_split_resolution=224,
        image_grid_pinpoints=grid_pinpoints if isinstance(grid_pinpoints, str)
        else [list(pair) for pair in grid_pinpoints],
        mm_hidden_size=VISION_HIDDEN_SIZE, mm_patch_merge_type="spatial_unpad",
        mm_projector_lr=None, mm_projector_type="mlp2x_gelu", mm_resampler_type=None,
        mm_use_im_patch_token=False, mm_use_im_start_end=False,
        mm_vision_select_feature="patch", mm_vision_select_layer=-2,
        mm_vision_tower=str(clip_path), mm_vision_tower_lr=2e-06,
        pretrain_mm_mlp_adapter=None, tokenizer_model_max_length=max_tokens,
        tokenizer_padding_side="right", transformers_version=version,
        tune_mm_mlp_adapter=False, tune_mm_vision_resampler=False,
        unfreeze_mm_vision_tower=True, use_mm_proj=True)


def _added_tokens_decoder(tokens: Sequence[str]) -> dict:
    return {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True} for i, token in enumerate(tokens)}


def original_tokenizer_config(backbone: str) -> dict:
    """tokenizer_config.json of the backbone's kind: LlamaTokenizer (Vicuna,
    Mistral; pad <unk>, as LLaVA's training sets it) or Llama 3's
    PreTrainedTokenizerFast, with the backbone's chat template where its
    base model ships one. Unverified against the repositories."""
    _check_backbone(backbone)
    config = {"added_tokens_decoder": _added_tokens_decoder(_special_tokens(backbone)),
              "clean_up_tokenization_spaces": False, "model_max_length": 2048,
              "padding_side": "right"}
    if backbone == "llama3":
        return dict(config, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                    chat_template=LLAMA3_INSTRUCT_TEMPLATE, clean_up_tokenization_spaces=True,
                    model_input_names=["input_ids", "attention_mask"], model_max_length=8192,
                    pad_token="<|end_of_text|>", tokenizer_class="PreTrainedTokenizerFast")
    config.update(add_bos_token=True, add_eos_token=False, bos_token="<s>", eos_token="</s>",
                  legacy=False, pad_token="<unk>", sp_model_kwargs={},
                  tokenizer_class="LlamaTokenizer", unk_token="<unk>")
    if backbone == "mistral":
        config.update(chat_template=MISTRAL_INSTRUCT_TEMPLATE, model_max_length=4096)
    return config


def _write_original_tokenizer(directory: Path, backbone: str) -> None:
    """The backbone tokenizer without <image> (tokenizer.json), and
    tokenizer_config.json / special_tokens_map.json of its kind."""
    train_base_tokenizer(backbone).save_pretrained(directory)
    config = original_tokenizer_config(backbone)
    write_json(directory / "tokenizer_config.json", config)
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    write_json(directory / "special_tokens_map.json",
               {name: config[name] for name in names if name in config})


def original_generation_config(backbone: str) -> dict:
    """generation_config.json without the sampling defaults."""
    if backbone == "llama3":
        return {"bos_token_id": LLAMA3_BOS_ID, "eos_token_id": [LLAMA3_END_OF_TEXT_ID, EOT_ID]}
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": UNK_ID}


def default_clip_dir(directory: Path) -> Path:
    """Where the original-layout writers put the CLIP folder: next to the checkpoint."""
    directory = Path(directory)
    return directory.with_name(directory.name + "-clip-vit")


def _write_original(directory: Path, model, tower: str, config: dict, backbone: str,
                    clip_dir: Path, clip_layout: str, seed: int) -> Path:
    tower_state = {name[len(TOWER_PREFIX):]: tensor for name, tensor in model.state_dict().items()
                   if name.startswith(TOWER_PREFIX)}
    if tower == "inside":  # the folder holds the tower before fine-tuning, as openai's does
        tower_state = pretrained_clip_tower(seed).state_dict()
    write_clip_checkpoint(clip_dir, tower_state, clip_layout)
    directory.mkdir(parents=True, exist_ok=True)
    write_sharded_safetensors(directory, original_state_dict(model, tower))
    write_json(directory / "config.json", config)
    _write_original_tokenizer(directory, backbone)
    write_json(directory / "generation_config.json", original_generation_config(backbone))
    return directory


def write_llava_original_checkpoint(directory: Path, seed: int = 0, tower: str = "inside",
                                    clip_dir: Optional[Path] = None,
                                    clip_layout: str = "vision") -> Path:
    """tiny_llava(seed, "llama") in liuhaotian/llava-v1.5-7b's layout.

    tower "separate" (as the real repository): no tower weights here; the
    CLIP folder at clip_dir (default: next to directory, default_clip_dir)
    holds this model's tower. tower "inside": the tower's weights here under
    `model.vision_tower.vision_tower.vision_model.*`, and the CLIP folder
    holds a different tower (pretrained_clip_tower), as openai's weights
    differ from a fine-tuned tower: a loader must take the checkpoint's.
    mm_vision_tower is the CLIP folder's absolute path either way."""
    directory = Path(directory)
    clip_dir = Path(clip_dir) if clip_dir is not None else default_clip_dir(directory)
    config = original_llava_config(clip_dir.resolve(), tower)
    return _write_original(directory, tiny_llava(seed, "llama"), tower, config, "llama",
                           clip_dir, clip_layout, seed)


def write_llava_next_original_checkpoint(directory: Path, seed: int = 1,
                                         backbone: str = "mistral",
                                         grid_pinpoints: Union[str, List] = GRID_PINPOINTS,
                                         clip_dir: Optional[Path] = None,
                                         clip_layout: str = "vision") -> Path:
    """tiny_llava_next(seed, backbone, pinpoints) in the layout of
    liuhaotian/llava-v1.6-mistral-7b ("mistral": LlavaMistralForCausalLM) or
    lmms-lab/llama3-llava-next-8b ("llama3": LlavaLlamaForCausalLM): tower
    inside (the CLIP folder holds pretrained_clip_tower), image_newline at
    `model.image_newline`. grid_pinpoints: a list, or the string form
    RANGE_GRID_PINPOINTS, written as is; the transformers twin has
    expand_grid_pinpoints(grid_pinpoints)."""
    directory = Path(directory)
    clip_dir = Path(clip_dir) if clip_dir is not None else default_clip_dir(directory)
    config = original_llava_next_config(clip_dir.resolve(), backbone, grid_pinpoints)
    model = tiny_llava_next(seed, backbone, expand_grid_pinpoints(grid_pinpoints))
    return _write_original(directory, model, "inside", config, backbone, clip_dir, clip_layout,
                           seed)


def read_safetensors_folder(directory: Path) -> dict:
    """Every tensor of a folder's safetensors files, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors

