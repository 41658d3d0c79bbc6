"""Validation of OpenAI-shaped chat messages into a small typed form that
every template renders from. Errors name the field, e.g.
"messages[2].content[1].type".

Content parts are OpenAI's {"type": "text"} and {"type": "image_url",
"image_url": {"url": ...}}, plus, for callers in the same process
(pyvlm.Engine), Hugging Face's {"type": "image", "image": <PIL image,
bytes, URL, data URI or path>}; the HTTP server refuses that part type
before rendering (pyvlm/server/chat_request.py)."""

from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple, Union

from pyvlm.chat.types import ChatTemplateError, ImageRef

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    ref: ImageRef


Part = Union[TextPart, ImagePart]


@dataclass(frozen=True)
class ChatMessage:
    """role: one of ROLES. content_is_string: the request sent a plain
    string (some templates render strings and part lists differently)."""

    role: str
    parts: Tuple[Part, ...]
    content_is_string: bool = False

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))

    @property
    def images(self) -> List[ImageRef]:
        return [p.ref for p in self.parts if isinstance(p, ImagePart)]


def parse_messages(messages: Any) -> List[ChatMessage]:
    """OpenAI `messages` -> ChatMessages; raises ChatTemplateError."""
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError("messages must be a list of message objects")
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    return [parse_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def parse_message(message: Any, field: str) -> ChatMessage:
    if not isinstance(message, dict):
        raise ChatTemplateError(f"{field} must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise ChatTemplateError(f"{field}.role must be one of {', '.join(ROLES)}; got {_short(role)}")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""  # OpenAI allows a null assistant content (tool calls are refused elsewhere)
    if isinstance(content, str):
        return ChatMessage(role, (TextPart(content),), content_is_string=True)
    if not isinstance(content, list):
        raise ChatTemplateError(f"{field}.content must be a string or a list of content parts")
    parts = tuple(parse_part(p, f"{field}.content[{j}]") for j, p in enumerate(content))
    return ChatMessage(role, parts)


def parse_part(part: Any, field: str) -> Part:
    if not isinstance(part, dict):
        raise ChatTemplateError(f"{field} must be an object with a 'type'")
    kind = part.get("type")
    if kind == "text":
        return TextPart(_text_of(part, field))
    if kind == "image_url":
        return ImagePart(ImageRef(_image_url_of(part, field), f"{field}.image_url"))
    if kind == "image":
        return ImagePart(ImageRef(_in_process_image_of(part, field), f"{field}.image"))
    raise ChatTemplateError(
        f"{field}.type must be 'text', 'image_url' or 'image'; got {_short(kind)}")


def _text_of(part: dict, field: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise ChatTemplateError(f"{field}.text must be a string")
    return text


def _image_url_of(part: dict, field: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else None
    if not isinstance(url, str) or not url:
        raise ChatTemplateError(f"{field}.image_url.url must be a non-empty string")
    return url


def _in_process_image_of(part: dict, field: str) -> Any:
    # What the object is (PIL image, bytes, a URL) is the media loader's to check.
    image = part.get("image")
    if image is None or (isinstance(image, str) and not image):
        raise ChatTemplateError(f"{field}.image must be an image (a PIL image, bytes, a URL, "
                                "a data URI or a path)")
    return image


_JSON_TYPE_NAMES = {dict: "an object", list: "an array", bool: "a boolean", int: "a number",
                    float: "a number", type(None): "null"}


def _short(value: Any) -> str:
    """A client-safe rendering of a bad value (never a Python repr of an object)."""
    if isinstance(value, str):
        return repr(value[:40])
    return _JSON_TYPE_NAMES.get(type(value), "a value of another type")


def image_refs_of(messages: Sequence[ChatMessage]) -> List[ImageRef]:
    return [ref for m in messages for ref in m.images]


def check_image_placeholders(text: str, image_token: str, num_images: int) -> None:
    """Each image must own exactly one placeholder in the rendered prompt: a
    message that spells the placeholder itself, or a template that drops or
    repeats images, would misplace every image after it."""
    num_placeholders = text.count(image_token)
    if num_placeholders == num_images:
        return
    if num_placeholders > num_images:
        raise ChatTemplateError(
            f"the prompt holds {num_placeholders} image placeholders for {num_images} images: "
            f"message text must not contain {image_token!r}")
    raise ChatTemplateError(
        f"the chat template placed {num_placeholders} of {num_images} images; "
        "use a template that supports images (--chat-template)")
