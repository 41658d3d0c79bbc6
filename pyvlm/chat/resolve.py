"""Which chat template a server uses: --chat-template (a name or a Jinja
file), else the checkpoint's own Jinja template, else a default per
architecture (SGLang's choice for that model family)."""

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pyvlm.chat.conversation import FORMATS, named_template
from pyvlm.chat.jinja_template import JinjaTemplate
from pyvlm.chat.types import ChatTemplate, ChatTemplateError

DEFAULT_TEMPLATE_BY_ARCHITECTURE = {
    "LlavaOnevisionForConditionalGeneration": "chatml-llava",
    "Qwen2VLForConditionalGeneration": "qwen2-vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2-vl",
    "MllamaForConditionalGeneration": "llama_3_vision",
    "LlavaForConditionalGeneration": "vicuna_v1.1",
    "LlavaNextForConditionalGeneration": "vicuna_v1.1",
}
MIN_LLAMA3_VOCAB_SIZE = 128000  # Llama 3's 128256-token vocabulary; Vicuna (Llama 2) has 32000


def default_template_name(architectures: Sequence[str],
                          text_config: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The named template for a model family, None when none is known.
    LLaVA-NeXT follows its language backbone: Llama 3 -> llava_llama_3,
    Qwen2 -> chatml-llava, otherwise (Vicuna, Mistral) vicuna_v1.1."""
    for architecture in architectures:
        if architecture == "LlavaNextForConditionalGeneration" and text_config:
            return _llava_next_template(text_config)
        if architecture in DEFAULT_TEMPLATE_BY_ARCHITECTURE:
            return DEFAULT_TEMPLATE_BY_ARCHITECTURE[architecture]
    return None


def _llava_next_template(text_config: Mapping[str, Any]) -> str:
    model_type, vocab_size = text_config.get("model_type"), text_config.get("vocab_size") or 0
    if model_type == "llama" and vocab_size >= MIN_LLAMA3_VOCAB_SIZE:
        return "llava_llama_3"
    return "chatml-llava" if model_type == "qwen2" else "vicuna_v1.1"


def read_template_file(path: Path) -> str:
    """A Jinja file, or a JSON file holding {"chat_template": "..."} (the
    chat_template.json that processors save)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ChatTemplateError(f"cannot read chat template file {path}: {error}") from None
    if path.suffix != ".json":
        return text
    try:
        template = json.loads(text).get("chat_template")
    except (ValueError, AttributeError):
        template = None
    if not isinstance(template, str):
        raise ChatTemplateError(f"{path}: expected a JSON object with a string 'chat_template'")
    return template


def resolve_template(name_or_path: Optional[str], checkpoint_template: Optional[str],
                     architectures: Sequence[str], *, image_token: str = "<image>",
                     template_vars: Optional[Mapping[str, Any]] = None,
                     text_config: Optional[Mapping[str, Any]] = None) -> ChatTemplate:
    """The server's ChatTemplate.

    name_or_path: --chat-template (a named template or a file path).
    checkpoint_template: the checkpoint's Jinja source (chat_template.jinja,
    chat_template.json or tokenizer_config.json), if any.
    image_token: the placeholder Jinja templates emit for an image.
    template_vars: variables for Jinja templates (the tokenizer's special
    tokens). text_config: the language backbone's config, to pick a
    LLaVA-NeXT default. Raises ChatTemplateError.
    """
    if name_or_path:
        return _from_option(name_or_path, image_token, template_vars)
    if checkpoint_template:
        return JinjaTemplate(checkpoint_template, "checkpoint", image_token, template_vars)
    name = default_template_name(architectures, text_config)
    if name is None:
        raise ChatTemplateError(
            f"no chat template: the checkpoint has none and {', '.join(architectures) or 'this model'} "
            f"has no default; pass --chat-template ({', '.join(sorted(FORMATS))} or a Jinja file)")
    return named_template(name)


def _from_option(name_or_path: str, image_token: str,
                 template_vars: Optional[Mapping[str, Any]]) -> ChatTemplate:
    if name_or_path in FORMATS:
        return named_template(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        # Named by its file name only: error messages reach clients.
        return JinjaTemplate(read_template_file(path), path.name, image_token, template_vars)
    raise ChatTemplateError(
        f"--chat-template {name_or_path!r} is neither a named template "
        f"({', '.join(sorted(FORMATS))}) nor a file")
