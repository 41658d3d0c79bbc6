"""OpenAI-style chat messages -> the content format of Hugging Face chat
templates, with the images pulled out in order of appearance."""

from typing import Any, List, Mapping, Sequence, Tuple


def _image_source(part: Mapping[str, Any]) -> Any:
    """The image of an image_url / image part (a URL, data URI, path, bytes or PIL image)."""
    if part.get("type") == "image_url":
        value = part.get("image_url")
        return value.get("url") if isinstance(value, Mapping) else value
    return part.get("image") if part.get("image") is not None else part.get("url")


def _convert_part(part: Any, images: List[Any]) -> Mapping[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part.get("text", "")}
    if kind in ("image_url", "image"):
        source = _image_source(part)
        if source is None:
            raise ValueError("an image part has no image (expected image_url.url)")
        images.append(source)
        return {"type": "image"}
    raise ValueError(f"unsupported message content part type {kind!r}")


def convert_messages(messages: Sequence[Mapping[str, Any]]) -> Tuple[list, list]:
    """Returns (template messages, image sources). String contents stay
    strings; list contents become [{"type": "text"|"image"}...] parts."""
    converted, images = [], []
    for message in messages:
        if "role" not in message:
            raise ValueError("every message needs a role")
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            content = [_convert_part(p, images) for p in content]
        elif content is not None and not isinstance(content, str):
            raise ValueError("message content must be a string or a list of parts")
        converted.append({**message, "content": content if content is not None else ""})
    return converted, images
