"""What a chat template takes and gives back (no torch, no transformers)."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple


class ChatTemplateError(ValueError):
    """A request's messages cannot be rendered, or a template cannot be
    loaded. The message is client-safe and names the offending field."""


@dataclass(frozen=True)
class ImageRef:
    """One image of a chat: its URL, data URI or path as sent (or, from an
    in-process {"type": "image"} part, the image object itself: a PIL image
    or bytes), and the request field it came from (e.g.
    "messages[1].content[0].image_url")."""

    source: Any
    param: str


@dataclass(frozen=True)
class RenderedChat:
    """The prompt text with one `image_token` placeholder per image (in the
    order of image_refs), and the template's stop strings."""

    text: str
    image_refs: List[ImageRef]
    stop: Tuple[str, ...]


class ChatTemplate(ABC):
    """OpenAI-shaped messages -> prompt text. Subclasses: NamedTemplate
    (SGLang's conversation formats) and JinjaTemplate (Hugging Face style)."""

    name: str
    image_token: str
    stop_strings: Tuple[str, ...]

    @abstractmethod
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> RenderedChat:
        """Validates `messages` and renders them; raises ChatTemplateError."""
