"""Stand-ins for pyvlm.chat and pyvlm.multimodal.media following their
contracts, used only while those modules are absent from this branch: the
checkpoint's own Jinja template with image parts, and data-URI decoding."""

from dataclasses import dataclass
from typing import List, Tuple

from pyvlm.multimodal.image_io import load_image


@dataclass(frozen=True)
class ImageRef:
    source: str
    param: str


@dataclass(frozen=True)
class RenderedChat:
    text: str
    image_refs: List[ImageRef]
    stop: Tuple[str, ...] = ()


class ChatTemplate:
    """The checkpoint's template (through the engine's builder)."""

    name = "checkpoint"
    stop_strings = ()

    def __init__(self, engine):
        self.engine = engine
        self.image_token = engine.model_info()["image_token"]

    def render(self, messages, add_generation_prompt=True) -> RenderedChat:
        refs, converted = [], []
        for i, message in enumerate(messages):
            content = message.get("content") or ""
            if isinstance(content, str):  # HF multimodal templates iterate parts
                content = [{"type": "text", "text": content}]
            content = [self._part(p, f"messages[{i}].content[{j}]", refs)
                       for j, p in enumerate(content)]
            converted.append({"role": message["role"], "content": content})
        return RenderedChat(self.engine.builder.render(converted), refs)

    @staticmethod
    def _part(part, path, refs):
        if part["type"] == "text":
            return part
        refs.append(ImageRef(part["image_url"]["url"], f"{path}.image_url"))
        return {"type": "image"}


class MediaError(ValueError):
    def __init__(self, message, param):
        super().__init__(message)
        self.param = param


async def load_images(refs):
    images = []
    for ref in refs:
        if not ref.source.startswith("data:"):
            raise MediaError("only data URIs in the stand-in", ref.param)
        try:
            images.append(load_image(ref.source))
        except ValueError as exc:
            raise MediaError(f"cannot decode the image: {exc}", ref.param) from None
    return images
