"""Tiny random-weight Llama-3.2-Vision (mllama) models built with transformers
itself, and checkpoints of them on disk.

The vision tower keeps the released geometry at a small width: 14-pixel
patches, up to 4 tiles in the 8 supported aspect ratios, a tile of 56 pixels
(4 x 4 patches + CLS = 17 tokens per tile, padded to 24 inside the tower), a
local encoder whose intermediate layers join the output and a gated global
encoder. The language model is a Llama 3 decoder (llama3 rope scaling with
the released factors) with gated cross-attention layers among its
self-attention layers. Weights are perturbed after init (tests/tiny_models.py
perturb_), and the gates, which transformers initialises to zero (tanh 0 =
no image path), get magnitudes of 0.5 to 1.5 so the image visibly changes the
logits.

Token ids: the special tokens come first in the trained vocabulary, in the
released tokenizer's order (id here = released id - 128000), and `<|image|>`
is an added token at id VOCAB_SIZE, as 128256 is in the released model: past
the LM head's VOCAB_SIZE rows but inside the text embedding, which
transformers builds with vocab_size + 8 rows. Like the released tokenizer,
this one prepends <|begin_of_text|> when add_special_tokens is on.

`write_mllama_checkpoint` writes what transformers 5 writes
(`model.vision_model.*`, `model.language_model.*`,
`model.multi_modal_projector.*`, `lm_head.weight`; nested rope_parameters;
sharded safetensors with an index; MllamaProcessor's processor_config.json
and chat_template.jinja); `write_mllama_hub_style_checkpoint` writes the
layout of meta-llama/Llama-3.2-11B-Vision-Instruct, as transformers 4.45
wrote it (`vision_model.*`, `language_model.model.*`,
`language_model.lm_head.weight`, rope_scaling, torch_dtype,
chat_template.json), which transformers 5 still loads through its mllama key
renames.
"""

import json
from pathlib import Path
from typing import Sequence

import torch

from tests.tiny_checkpoints import MAX_SHARD_SIZE, write_json
from tests.tiny_checkpoints import train_tokenizer as train_bpe_tokenizer
from tests.tiny_models import perturb_

VOCAB_SIZE = 384  # the LM head's rows; the embedding has VOCAB_SIZE + 8
# The released tokenizer's first special tokens (128000 ... 128010), here at 0 ... 10.
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                  "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
(BEGIN_OF_TEXT_ID, END_OF_TEXT_ID, _, _, FINETUNE_RIGHT_PAD_ID, _, START_HEADER_ID,
 END_HEADER_ID, EOM_ID, EOT_ID, PYTHON_TAG_ID) = range(len(SPECIAL_TOKENS))
BOS_ID, PAD_ID = BEGIN_OF_TEXT_ID, FINETUNE_RIGHT_PAD_ID
# the Instruct model's stop tokens (its config.json and generation_config.json)
EOS_IDS = [END_OF_TEXT_ID, EOM_ID, EOT_ID]
IMAGE_TOKEN = "<|image|>"
IMAGE_TOKEN_ID = VOCAB_SIZE  # as 128256 == vocab_size in the released model

TILE_SIZE = 56
PATCH_SIZE = 14
MAX_NUM_TILES = 4
SUPPORTED_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
VISION_HIDDEN_SIZE = 32
INTERMEDIATE_LAYERS_INDICES = [0, 2]
HIDDEN_SIZE = 64  # the language model's width, which the projector maps to

NUM_HIDDEN_LAYERS = 4
CROSS_ATTENTION_LAYERS = (1, 3)  # 2 self-attention + 2 cross-attention layers

# meta-llama/Llama-3.2-11B-Vision-Instruct's chat template (images make the
# template drop its default system block; a system message with images is
# an error; strftime_now dates a text-only prompt unless date_string is given).
CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- Error out if there are images and system message #}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{#- System message if there are no images #}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\n\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\n\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


# --- configs ------------------------------------------------------------------

def vision_config() -> dict:
    """Keyword arguments of MllamaVisionConfig: tests/models/vision/test_mllama_tower.py's
    tower (3 local layers, 2 gated global ones, layers 0 and 2 joining the output)."""
    return dict(hidden_size=VISION_HIDDEN_SIZE, attention_heads=4, intermediate_size=64,
                image_size=TILE_SIZE, patch_size=PATCH_SIZE, max_num_tiles=MAX_NUM_TILES,
                num_hidden_layers=3, num_global_layers=2,
                intermediate_layers_indices=INTERMEDIATE_LAYERS_INDICES,
                vision_output_dim=VISION_HIDDEN_SIZE * (1 + len(INTERMEDIATE_LAYERS_INDICES)),
                supported_aspect_ratios=SUPPORTED_ASPECT_RATIOS, norm_eps=1e-5,
                hidden_act="gelu", num_channels=3)


def rope_parameters() -> dict:
    """Llama 3's rope scaling with the released values (all three frequency
    bands occur at head_dim 16: kept, smoothed and divided by the factor)."""
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


def text_config(num_hidden_layers: int = NUM_HIDDEN_LAYERS,
                cross_attention_layers: Sequence[int] = CROSS_ATTENTION_LAYERS) -> dict:
    """Keyword arguments of MllamaTextConfig: head_dim 16, GQA 4 / 2."""
    if not all(0 <= i < num_hidden_layers for i in cross_attention_layers):
        raise ValueError(f"cross_attention_layers {list(cross_attention_layers)} outside "
                         f"{num_hidden_layers} layers")
    return dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=128,
                num_hidden_layers=num_hidden_layers,
                cross_attention_layers=list(cross_attention_layers),
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                max_position_embeddings=4096, rope_parameters=rope_parameters(),
                hidden_act="silu", initializer_range=0.1, tie_word_embeddings=False,
                bos_token_id=BOS_ID, eos_token_id=list(EOS_IDS), pad_token_id=PAD_ID)


def mllama_config(num_hidden_layers: int = NUM_HIDDEN_LAYERS,
                  cross_attention_layers: Sequence[int] = CROSS_ATTENTION_LAYERS):
    """The transformers MllamaConfig of the tiny model."""
    from transformers import MllamaConfig

    return MllamaConfig(vision_config=vision_config(),
                        text_config=text_config(num_hidden_layers, cross_attention_layers),
                        image_token_index=IMAGE_TOKEN_ID,
                        architectures=["MllamaForConditionalGeneration"])


def _make_gates_matter_(model, seed: int) -> None:
    """Cross-attention gates to +-(0.5 + U[0, 1)) (transformers inits them to
    0, which tanh keeps at 0), and large noise on the vision tower's gates and
    embeddings, as tests/models/vision/test_mllama_tower.py does."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.model.vision_model.named_parameters():
            if "gate" in name or "embedding" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.5)
        for layer in model.model.language_model.layers:
            for name in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
                gate = getattr(layer, name, None)
                if gate is not None:
                    sign = torch.randn(gate.shape, generator=gen).sign()
                    gate.copy_(sign * (0.5 + torch.rand(gate.shape, generator=gen)))


def tiny_mllama(seed: int = 0, cross_attention_layers: Sequence[int] = CROSS_ATTENTION_LAYERS,
                num_hidden_layers: int = NUM_HIDDEN_LAYERS):
    """An eval-mode float32 transformers MllamaForConditionalGeneration, the
    same for the same arguments."""
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(mllama_config(num_hidden_layers,
                                                         cross_attention_layers))
    perturb_(model, seed + 1)
    _make_gates_matter_(model, seed + 2)
    return model.eval().float()


# --- tokenizer and processor files ----------------------------------------------

def train_tokenizer():
    """A byte-level BPE tokenizer: SPECIAL_TOKENS at ids 0..10, VOCAB_SIZE
    trained entries, then <|image|> added at id VOCAB_SIZE; BOS prepended
    (add_special_tokens), eos <|eot_id|>, as the released Instruct tokenizer."""
    from tokenizers import AddedToken

    tokenizer = train_bpe_tokenizer(
        SPECIAL_TOKENS, VOCAB_SIZE, {}, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", add_bos_token=True)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)],
                         special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == IMAGE_TOKEN_ID, image_id
    return tokenizer


def preprocessor_config() -> dict:
    """preprocessor_config.json as meta-llama/Llama-3.2-11B-Vision-Instruct
    ships it (tests/multimodal/hf_mllama.py LLAMA_3_2_VISION), with a 56-pixel tile."""
    return {
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
        "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "MllamaImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "max_image_tiles": MAX_NUM_TILES,
        "resample": 2, "rescale_factor": 0.00392156862745098,
        "size": {"height": TILE_SIZE, "width": TILE_SIZE},
    }


def generation_config() -> dict:
    """generation_config.json: the released stop and pad tokens without its
    sampling defaults (temperature 0.6, top_p 0.9), so greedy parity tests
    stay greedy."""
    return {"bos_token_id": BOS_ID, "eos_token_id": list(EOS_IDS), "pad_token_id": PAD_ID}


def mllama_processor(tokenizer=None):
    """transformers' MllamaProcessor of the tiny checkpoint (its PIL image
    processor, the trained tokenizer, CHAT_TEMPLATE)."""
    from transformers import MllamaImageProcessorPil, MllamaProcessor

    settings = {k: v for k, v in preprocessor_config().items() if k != "image_processor_type"}
    return MllamaProcessor(image_processor=MllamaImageProcessorPil(**settings),
                           tokenizer=tokenizer if tokenizer is not None else train_tokenizer(),
                           chat_template=CHAT_TEMPLATE)


def write_mllama_checkpoint(directory: Path, seed: int = 0,
                            cross_attention_layers: Sequence[int] = CROSS_ATTENTION_LAYERS,
                            num_hidden_layers: int = NUM_HIDDEN_LAYERS) -> Path:
    """A transformers-5 layout checkpoint of tiny_mllama(seed, ...): what
    save_pretrained of the model and of MllamaProcessor write (the processor
    writes processor_config.json with the image processor nested, and
    chat_template.jinja), plus preprocessor_config.json."""
    directory = Path(directory)
    model = tiny_mllama(seed, cross_attention_layers, num_hidden_layers)
    model.save_pretrained(directory, max_shard_size=MAX_SHARD_SIZE, save_original_format=False)
    mllama_processor().save_pretrained(directory)
    write_json(directory / "preprocessor_config.json", preprocessor_config())
    write_json(directory / "generation_config.json", generation_config())
    return directory


# --- the hub layout ---------------------------------------------------------------

_HUB_PREFIXES = [  # transformers-5 module path -> name in the meta-llama repository
    ("model.vision_model.", "vision_model."),
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
]


def hub_weight_name(name: str) -> str:
    """The meta-llama hub name of a transformers-5 parameter name."""
    for new, old in _HUB_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    raise KeyError(name)


# What transformers 4.45 wrote for every sub-config (PretrainedConfig's own
# attributes, serialised in full), as the released config.json holds them.
_PRETRAINED_CONFIG_DEFAULTS = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": None,
    "bad_words_ids": None, "begin_suppress_tokens": None, "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None,
    "finetuning_task": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0, "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0,
    "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False,
    "sep_token_id": None, "suppress_tokens": None, "task_specific_params": None,
    "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": "float32",
    "torchscript": False, "typical_p": None, "use_bfloat16": False,
}


def hub_style_config(num_hidden_layers: int = NUM_HIDDEN_LAYERS,
                     cross_attention_layers: Sequence[int] = CROSS_ATTENTION_LAYERS) -> dict:
    """config.json as meta-llama/Llama-3.2-11B-Vision-Instruct holds it
    (transformers 4.45): nested text_config / vision_config in full, rope
    as rope_scaling + rope_theta, torch_dtype, dropout 0, use_cache."""
    text = text_config(num_hidden_layers, cross_attention_layers)
    rope = dict(text.pop("rope_parameters"))
    text.update(_PRETRAINED_CONFIG_DEFAULTS, model_type="mllama_text_model",
                rope_theta=rope.pop("rope_theta"), rope_scaling=rope, dropout=0,
                initializer_range=0.02, use_cache=True)
    vision = dict(_PRETRAINED_CONFIG_DEFAULTS, **vision_config(),
                  model_type="mllama_vision_model", initializer_range=0.02)
    return {"architectures": ["MllamaForConditionalGeneration"],
            "image_token_index": IMAGE_TOKEN_ID, "model_type": "mllama",
            "text_config": text, "torch_dtype": "float32",
            "transformers_version": "4.45.0.dev0", "vision_config": vision}


def _legacy_tokenizer_files(directory: Path) -> None:
    """tokenizer_config.json (and special_tokens_map.json) the way the
    meta-llama repository holds them: PreTrainedTokenizerFast, every added
    token spelled out, the chat template inside, model_max_length 131072."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    added = {i: token for i, token in enumerate(SPECIAL_TOKENS)}
    added[IMAGE_TOKEN_ID] = IMAGE_TOKEN
    config.update(tokenizer_class="PreTrainedTokenizerFast", bos_token="<|begin_of_text|>",
                  eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
                  chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=True,
                  model_input_names=["input_ids", "attention_mask"], model_max_length=131072,
                  added_tokens_decoder={str(i): {"content": token, "special": True,
                                                 "lstrip": False, "rstrip": False,
                                                 "normalized": False, "single_word": False}
                                        for i, token in added.items()})
    for key in ("backend", "extra_special_tokens", "add_bos_token", "processor_class"):
        config.pop(key, None)
    write_json(path, config)
    write_json(directory / "special_tokens_map.json",
               {"bos_token": {"content": "<|begin_of_text|>", "lstrip": False,
                              "normalized": False, "rstrip": False, "single_word": False},
                "eos_token": {"content": "<|eot_id|>", "lstrip": False, "normalized": False,
                              "rstrip": False, "single_word": False},
                "pad_token": "<|finetune_right_pad_id|>"})


def write_mllama_hub_style_checkpoint(
        directory: Path, seed: int = 2,
        cross_attention_layers: Sequence[int] = CROSS_ATTENTION_LAYERS,
        num_hidden_layers: int = NUM_HIDDEN_LAYERS) -> Path:
    """A meta-llama hub layout checkpoint of tiny_mllama(seed, ...).

    The weights are what transformers 5's save_pretrained writes by default
    (save_original_format=True reverts its mllama key renames to the hub
    names); config.json and the tokenizer files are rewritten in the hub
    repository's older form; preprocessor_config.json and chat_template.json
    stand beside them, with no processor_config.json."""
    directory = Path(directory)
    model = tiny_mllama(seed, cross_attention_layers, num_hidden_layers)
    model.save_pretrained(directory, max_shard_size=MAX_SHARD_SIZE)
    write_json(directory / "config.json",
               hub_style_config(num_hidden_layers, cross_attention_layers))
    train_tokenizer().save_pretrained(directory)
    _legacy_tokenizer_files(directory)
    write_json(directory / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(directory / "preprocessor_config.json", preprocessor_config())
    write_json(directory / "generation_config.json", generation_config())
    return directory
