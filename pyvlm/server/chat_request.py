"""The body of POST /v1/chat/completions: checked field by field, messages
validated with the path of any bad part, unimplemented features refused."""

from typing import Any, List, Mapping, Optional

from pyvlm.server import fields
from pyvlm.server.errors import invalid, unsupported_field
from pyvlm.server.params import SAMPLING_FIELDS

CHAT_FIELDS = SAMPLING_FIELDS + ("messages", "max_completion_tokens", "logprobs", "top_logprobs",
                                 "tools", "tool_choice", "functions", "function_call",
                                 "parallel_tool_calls", "response_format", "audio", "modalities",
                                 "prediction", "store", "metadata", "service_tier",
                                 "reasoning_effort", "web_search_options", "mm_processor_kwargs")
ROLES = ("system", "user", "assistant")
IMAGE_DETAILS = ("auto", "low", "high")


def refuse_unimplemented(body: Mapping) -> None:
    """Features pyvlm does not implement are a 400 naming them, never
    silently ignored; their 'off' values are accepted."""
    fields.check_known(body, CHAT_FIELDS)
    for name in ("tools", "functions", "audio", "prediction", "reasoning_effort",
                 "web_search_options", "function_call"):
        if body.get(name) not in (None, [], {}):
            raise unsupported_field(name)
    if body.get("tool_choice") not in (None, "none"):
        raise unsupported_field("tool_choice")
    if body.get("store"):  # stored completions need OpenAI's storage
        raise unsupported_field("store")
    if body.get("modalities") not in (None, ["text"]):
        raise unsupported_field("modalities")
    _check_response_format(body.get("response_format"))


def _check_response_format(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping) or value.get("type") != "text":
        raise unsupported_field("response_format")


def max_tokens(body: Mapping) -> Optional[int]:
    """max_completion_tokens (OpenAI's newer name), else max_tokens; both are checked."""
    newer = fields.get_sampling(body, "max_completion_tokens", "max_new_tokens")
    older = fields.get_sampling(body, "max_tokens", "max_new_tokens")
    return newer if newer is not None else older


def num_top_logprobs(body: Mapping) -> Optional[int]:
    """None without logprobs, else how many alternatives each token lists."""
    wants = fields.get_bool(body, "logprobs", False)
    top = fields.get_sampling(body, "top_logprobs")
    if top is not None and not wants:
        raise invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    return (top or 0) if wants else None


def check_messages(body: Mapping, max_images: int) -> List[dict]:
    """The messages, validated; more than max_images images over all
    messages is a 400."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages")
    num_images = sum(_check_message(m, f"messages[{i}]") for i, m in enumerate(messages))
    if num_images > max_images:
        raise invalid(f"The request has {num_images} images; at most {max_images} are allowed "
                      f"per request (--limit-mm-per-prompt)", "messages")
    return messages


def _check_message(message: Any, path: str) -> int:
    """Checks one message; returns its number of images."""
    if not isinstance(message, Mapping):
        raise invalid(f"'{path}' must be an object", path)
    if message.get("role") not in ROLES:
        raise invalid(f"'{path}.role' must be one of {', '.join(ROLES)}", f"{path}.role")
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return 0
    if isinstance(content, str):
        return 0
    if not isinstance(content, list):
        raise invalid(f"'{path}.content' must be a string or a list of parts", f"{path}.content")
    return sum(_check_part(p, f"{path}.content[{i}]") for i, p in enumerate(content))


def _check_part(part: Any, path: str) -> int:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise invalid(f"'{path}.text' must be a string", f"{path}.text")
        return 0
    if kind == "image_url":
        _check_image_url(part.get("image_url"), f"{path}.image_url")
        return 1
    raise invalid(f"'{path}.type' must be 'text' or 'image_url'", f"{path}.type")


def _check_image_url(value: Any, path: str) -> None:
    if not isinstance(value, Mapping) or not isinstance(value.get("url"), str):
        raise invalid(f"'{path}.url' must be a string", f"{path}.url")
    if value.get("detail") not in (None,) + IMAGE_DETAILS:
        raise invalid(f"'{path}.detail' must be one of {', '.join(IMAGE_DETAILS)}",
                      f"{path}.detail")
