"""Hugging Face style Jinja chat templates (a checkpoint's own, or a file
given with --chat-template), rendered the way transformers renders them:
a sandboxed environment with trim_blocks/lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, and
`{% generation %}` blocks accepted. Unlike SGLang, images are kept: image
parts reach the template as {"type": "image"} so it emits its own image
token, and the rendered placeholders are checked against the images."""

import json
from datetime import datetime
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pyvlm.chat.messages import (ChatMessage, ImagePart, check_image_placeholders, image_refs_of,
                                 parse_messages)
from pyvlm.chat.types import ChatTemplate, ChatTemplateError, RenderedChat


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for
    training masks in transformers; for serving it renders its body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _SafeNamespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore names (as transformers does), so a
    template cannot reach interpreter internals through attribute storage."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _SafeNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError("namespace attributes may not start with '_'")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def make_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox transformers renders chat templates in (see module docstring)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_SafeNamespace)
    return env


def _is_content_access(node: jinja2.nodes.Node, content_names: set) -> bool:
    while isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)) and node.node is not None:
        node = node.node
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    return isinstance(node, jinja2.nodes.Name) and node.name in content_names


def iterates_content(ast: jinja2.nodes.Template) -> bool:
    """Whether the template loops over a message's content (the part-list
    format) rather than printing it as a string. Mirrors vLLM's detection:
    a `for` over message['content'], directly, through filters, or through
    a variable set from it."""
    content_names = {a.target.name for a in ast.find_all(jinja2.nodes.Assign)
                     if isinstance(a.target, jinja2.nodes.Name) and _is_content_access(a.node, set())}
    return any(_is_content_access(loop.iter, content_names) for loop in ast.find_all(jinja2.nodes.For))


def _as_parts(message: ChatMessage) -> List[Dict[str, str]]:
    return [{"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
            for p in message.parts]


class JinjaTemplate(ChatTemplate):
    """A Jinja chat template. image_token: the placeholder the template emits
    for {"type": "image"} (the processor's image token, e.g. "<image>").
    template_vars: extra variables the template reads, normally the
    tokenizer's special tokens (bos_token, eos_token, ...), as transformers
    passes them."""

    def __init__(self, source: str, name: str, image_token: str = "<image>",
                 template_vars: Optional[Mapping[str, Any]] = None,
                 stop_strings: Sequence[str] = ()):
        env = make_environment()
        try:
            ast = env.parse(source)
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(f"chat template {name}: syntax error on line "
                                    f"{error.lineno}: {error.message}") from None
        self.name, self.image_token, self.source = name, image_token, source
        self.stop_strings = tuple(stop_strings)
        self.template_vars = dict(template_vars or {})
        self.takes_part_lists = iterates_content(ast)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> RenderedChat:
        parsed = parse_messages(messages)
        image_refs = image_refs_of(parsed)
        text = self._render(self.to_template_messages(parsed), add_generation_prompt)
        check_image_placeholders(text, self.image_token, len(image_refs))
        return RenderedChat(text, image_refs, self.stop_strings)

    def to_template_messages(self, messages: Sequence[ChatMessage]) -> List[Dict[str, Any]]:
        """Part lists for templates that loop over content (so string
        contents are not lost to a `selectattr('type', ...)`), plain strings
        for the others (which would print a list's repr)."""
        if self.takes_part_lists:
            return [{"role": m.role, "content": _as_parts(m)} for m in messages]
        for index, message in enumerate(messages):
            if message.images:
                raise ChatTemplateError(
                    f"messages[{index}]: chat template {self.name} renders text only and cannot "
                    "place images; use --chat-template with a vision template")
        return [{"role": m.role, "content": m.text} for m in messages]

    def _render(self, messages: List[Dict[str, Any]], add_generation_prompt: bool) -> str:
        variables = {**self.template_vars, "messages": messages, "tools": None, "documents": None,
                     "add_generation_prompt": add_generation_prompt}
        try:
            return self.template.render(**variables)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template {self.name}: {error.message}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
            raise ChatTemplateError(f"chat template {self.name} failed on these messages "
                                    f"({type(error).__name__})") from None
