"""Chat templates: OpenAI-shaped messages -> prompt text with one image
placeholder per image. SGLang's named formats (chatml-llava, qwen2-vl,
vicuna_v1.1, llama_3_vision, llava_llama_3) and Hugging Face Jinja templates,
chosen by `resolve_template`. No torch, no transformers."""

from pyvlm.chat.conversation import FORMATS, ConversationFormat, NamedTemplate, named_template
from pyvlm.chat.jinja_template import JinjaTemplate
from pyvlm.chat.resolve import default_template_name, resolve_template
from pyvlm.chat.types import ChatTemplate, ChatTemplateError, ImageRef, RenderedChat

NAMED_TEMPLATES = tuple(sorted(FORMATS))

__all__ = ["ChatTemplate", "ChatTemplateError", "ConversationFormat", "ImageRef", "JinjaTemplate",
           "NAMED_TEMPLATES", "NamedTemplate", "RenderedChat", "default_template_name",
           "named_template", "resolve_template"]
