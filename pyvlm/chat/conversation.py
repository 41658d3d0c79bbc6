"""SGLang's named conversation templates (python/sglang/srt/conversation.py,
itself adapted from FastChat), re-implemented for the five vision formats
pyvlm serves: chatml-llava, qwen2-vl, vicuna_v1.1, llama_3_vision and
llava_llama_3. The prompt strings are byte-identical to SGLang's for the same
messages, except where noted in `NamedTemplate.render`."""

from dataclasses import dataclass
from enum import Enum
from typing import Dict, List, Optional, Sequence, Tuple

from pyvlm.chat.messages import (ChatMessage, ImagePart, check_image_placeholders, image_refs_of,
                                 parse_messages)
from pyvlm.chat.types import ChatTemplate, ChatTemplateError, RenderedChat

# A turn is (role marker, message); None is the open turn the model completes.
# As in SGLang, an empty message also renders as an open turn.
Turn = Tuple[str, Optional[str]]


class SeparatorStyle(Enum):
    CHATML = "chatml"
    ADD_NEW_LINE_SINGLE = "add_new_line_single"
    ADD_COLON_TWO = "add_colon_two"
    LLAMA3 = "llama3"


@dataclass(frozen=True)
class ConversationFormat:
    """One named template: SGLang's Conversation fields that shape a prompt.

    newline_after_image: each image part renders as image_token + "\\n"
    (SGLang omits the newline for templates whose name contains "qwen2").
    """

    name: str
    system_template: str
    system_message: str
    roles: Tuple[str, str]  # (user, assistant) markers
    style: SeparatorStyle
    sep: str
    sep2: str = ""
    stop_strings: Tuple[str, ...] = ()
    image_token: str = "<image>"
    newline_after_image: bool = True


def _render_chatml(fmt: ConversationFormat, system_prompt: str, turns: Sequence[Turn]) -> str:
    text = "" if system_prompt == "" else system_prompt + fmt.sep + "\n"
    for role, message in turns:
        text += role + "\n" + (message + fmt.sep + "\n" if message else "")
    return text


def _render_add_new_line_single(fmt: ConversationFormat, system_prompt: str,
                                turns: Sequence[Turn]) -> str:
    text = "" if system_prompt == "" else system_prompt + fmt.sep
    for role, message in turns:
        text += role + "\n" + (message + fmt.sep if message else "")
    return text


def _render_add_colon_two(fmt: ConversationFormat, system_prompt: str, turns: Sequence[Turn]) -> str:
    # SGLang alternates sep/sep2 by position; for the alternating user/assistant
    # turns it builds, that is sep2 after each assistant turn, which we key on.
    text = system_prompt + fmt.sep
    for role, message in turns:
        end = fmt.sep2 if role == fmt.roles[1] else fmt.sep
        text += role + ": " + message + end if message else role + ":"
    return text


def _render_llama3(fmt: ConversationFormat, system_prompt: str, turns: Sequence[Turn],
                   system_message: str) -> str:
    text = system_prompt if system_message else ""
    for role, message in turns:
        text += f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        text += f"{message.strip()}<|eot_id|>" if message else ""
    return text


def render_turns(fmt: ConversationFormat, system_message: str, turns: Sequence[Turn]) -> str:
    """SGLang's Conversation.get_prompt for the styles above."""
    system_prompt = fmt.system_template.format(system_message=system_message)
    if fmt.style is SeparatorStyle.LLAMA3:
        return _render_llama3(fmt, system_prompt, turns, system_message)
    render = {SeparatorStyle.CHATML: _render_chatml,
              SeparatorStyle.ADD_NEW_LINE_SINGLE: _render_add_new_line_single,
              SeparatorStyle.ADD_COLON_TWO: _render_add_colon_two}[fmt.style]
    return render(fmt, system_prompt, turns)


_VISION_SYSTEM_MESSAGE = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language.")

_LLAMA3_SYSTEM_TEMPLATE = "<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>"
_CHATML_ROLES = ("<|im_start|>user", "<|im_start|>assistant")

FORMATS: Dict[str, ConversationFormat] = {f.name: f for f in (
    ConversationFormat(
        name="chatml-llava", system_template="<|im_start|>system\n{system_message}",
        system_message="You are a helpful assistant.", roles=_CHATML_ROLES,
        style=SeparatorStyle.CHATML, sep="<|im_end|>",
        stop_strings=("<|endoftext|>", "<|im_end|>")),
    ConversationFormat(
        name="qwen2-vl", system_template="<|im_start|>system\n{system_message}",
        system_message="You are a helpful assistant.", roles=_CHATML_ROLES,
        style=SeparatorStyle.ADD_NEW_LINE_SINGLE, sep="<|im_end|>\n",
        stop_strings=("<|im_end|>",),
        image_token="<|vision_start|><|image_pad|><|vision_end|>", newline_after_image=False),
    ConversationFormat(
        name="vicuna_v1.1", system_template="{system_message}",
        system_message=("A chat between a curious user and an artificial intelligence assistant. "
                        "The assistant gives helpful, detailed, and polite answers to the user's "
                        "questions."),
        roles=("USER", "ASSISTANT"), style=SeparatorStyle.ADD_COLON_TWO, sep=" ", sep2="</s>"),
    ConversationFormat(
        name="llama_3_vision", system_template=_LLAMA3_SYSTEM_TEMPLATE,
        system_message=_VISION_SYSTEM_MESSAGE, roles=("user", "assistant"),
        style=SeparatorStyle.LLAMA3, sep="", stop_strings=("<|end_of_text|>", "<|eot_id|>"),
        image_token="<|image|>"),
    ConversationFormat(
        name="llava_llama_3", system_template=_LLAMA3_SYSTEM_TEMPLATE,
        system_message=_VISION_SYSTEM_MESSAGE, roles=("user", "assistant"),
        style=SeparatorStyle.LLAMA3, sep="", stop_strings=("<|end_of_text|>", "<|eot_id|>")),
)}


class NamedTemplate(ChatTemplate):
    """A ChatTemplate over one ConversationFormat.

    As in SGLang: a system message replaces the default (the last one wins)
    and may not hold images; text parts are concatenated as sent; each image
    part becomes its placeholder at its position. Unlike SGLang, which drops
    the newline after the placeholder when a message holds several images,
    every image part gets `image_token + "\\n"` (qwen2-vl: no newline), and
    assistant turns may hold images too.
    """

    def __init__(self, fmt: ConversationFormat):
        self.format = fmt
        self.name, self.image_token, self.stop_strings = fmt.name, fmt.image_token, fmt.stop_strings

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> RenderedChat:
        parsed = parse_messages(messages)
        system_message, turns = self._system_and_turns(parsed)
        if add_generation_prompt:
            turns.append((self.format.roles[1], None))
        text = render_turns(self.format, system_message, turns)
        image_refs = image_refs_of(parsed)
        check_image_placeholders(text, self.image_token, len(image_refs))
        return RenderedChat(text, image_refs, self.stop_strings)

    def _system_and_turns(self, messages: Sequence[ChatMessage]) -> Tuple[str, List[Turn]]:
        system_message, turns = self.format.system_message, []
        for index, message in enumerate(messages):
            if message.role == "system":
                system_message = self._system_text(message, index)
            else:
                role = self.format.roles[message.role == "assistant"]
                turns.append((role, self._message_text(message)))
        return system_message, turns

    def _system_text(self, message: ChatMessage, index: int) -> str:
        if message.images:
            raise ChatTemplateError(
                f"messages[{index}]: a system message cannot hold images "
                f"(chat template {self.name}); put them in a user message")
        return message.text

    def _message_text(self, message: ChatMessage) -> str:
        newline = "\n" if self.format.newline_after_image else ""
        return "".join(self.image_token + newline if isinstance(part, ImagePart) else part.text
                       for part in message.parts)


def named_template(name: str) -> NamedTemplate:
    """The named template; raises ChatTemplateError for an unknown name."""
    if name not in FORMATS:
        raise ChatTemplateError(
            f"unknown chat template {name!r}; named templates: {', '.join(sorted(FORMATS))}")
    return NamedTemplate(FORMATS[name])
