"""OpenAI response objects (chat.completion, chat.completion.chunk,
text_completion) built from choice results, exactly in OpenAI's schema."""

import time
import uuid
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import orjson

from pyvlm.http.sse import sse_json
from pyvlm.server.generation import ChoiceDelta, ChoiceResult, TokenLogprob

TokenTexts = Callable[[Sequence[int]], List[str]]


class ResponseIds:
    """The id, creation time and model name shared by a response's objects."""

    def __init__(self, prefix: str, model: str):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def header(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: Optional[int]) -> dict:
    """OpenAI usage; cached_tokens None leaves prompt_tokens_details out."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def usage_of(metas: Sequence[Tuple[int, dict]], report_cached: bool) -> dict:
    """Usage over (prompt index, final meta) per choice: each prompt counted
    once (its n choices share it), completion tokens summed over choices."""
    prompts: Dict[int, dict] = {}
    for prompt_index, meta in metas:
        prompts.setdefault(prompt_index, meta)
    prompt_tokens = sum(m["prompt_tokens"] for m in prompts.values())
    cached = sum(m["cached_tokens"] for m in prompts.values()) if report_cached else None
    return usage(prompt_tokens, sum(m["completion_tokens"] for _, m in metas), cached)


def _entry(token_id: int, logprob: float, text: str) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(logprobs: Sequence[TokenLogprob], token_texts: TokenTexts) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    ids = [tid for tid, _, top in logprobs] + [t for _, _, top in logprobs for t, _ in top]
    texts = dict(zip(ids, token_texts(ids)))
    return {"content": [
        dict(_entry(tid, lp, texts[tid]),
             top_logprobs=[_entry(t, v, texts[t]) for t, v in _sorted(top)])
        for tid, lp, top in logprobs]}


def completion_logprobs(logprobs: Sequence[TokenLogprob], token_texts: TokenTexts,
                        text_offset: int) -> dict:
    """The legacy completions form: tokens, token_logprobs, top_logprobs, text_offset."""
    ids = [tid for tid, _, top in logprobs] + [t for _, _, top in logprobs for t, _ in top]
    texts = dict(zip(ids, token_texts(ids)))
    offsets, offset = [], text_offset
    for tid, _, _ in logprobs:
        offsets.append(offset)
        offset += len(texts[tid])
    return {"tokens": [texts[tid] for tid, _, _ in logprobs],
            "token_logprobs": [lp for _, lp, _ in logprobs],
            "top_logprobs": [{texts[t]: v for t, v in _sorted(top)} for _, _, top in logprobs],
            "text_offset": offsets}


def _sorted(top):
    return sorted(top, key=lambda pair: pair[1], reverse=True)


def chat_completion(ids: ResponseIds, results: Sequence[ChoiceResult], usage_: dict,
                    token_texts: TokenTexts, with_logprobs: bool) -> dict:
    choices = [{"index": r.index,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(r.logprobs, token_texts) if with_logprobs else None,
                "finish_reason": r.finish_reason} for r in results]
    return dict(ids.header("chat.completion"), choices=choices, usage=usage_)


def chat_chunk(ids: ResponseIds, index: int, delta: dict, finish_reason: Optional[str] = None,
               logprobs: Optional[dict] = None, include_usage: bool = False) -> dict:
    chunk = dict(ids.header("chat.completion.chunk"), choices=[
        {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(ids: ResponseIds, kind: str, usage_: dict) -> dict:
    return dict(ids.header(kind), choices=[], usage=usage_)


def completion(ids: ResponseIds, results: Sequence[ChoiceResult], usage_: dict,
               token_texts: TokenTexts, with_logprobs: bool) -> dict:
    choices = [{"index": r.index, "text": r.text,
                "logprobs": completion_logprobs(r.logprobs, token_texts, 0)
                if with_logprobs else None,
                "finish_reason": r.finish_reason} for r in results]
    return dict(ids.header("text_completion"), choices=choices, usage=usage_)


def completion_chunk(ids: ResponseIds, delta: ChoiceDelta, logprobs: Optional[dict],
                     include_usage: bool) -> dict:
    return completion_text_chunk(ids, delta.index, delta.text, logprobs, delta.finish_reason,
                                 include_usage)


def completion_text_chunk(ids: ResponseIds, index: int, text: str, logprobs: Optional[dict],
                          finish_reason: Optional[str], include_usage: bool) -> dict:
    chunk = dict(ids.header("text_completion"), choices=[
        {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])
    if include_usage:
        chunk["usage"] = None
    return chunk


_TEXT_SLOT = "\x00pyvlm text slot\x00"  # JSON-escaped, it cannot occur in a header


class TextEvents:
    """The SSE events of the chunks that carry text alone (no logprobs, no
    finish reason: nearly every chunk of a stream), byte for byte as
    sse_json(make_chunk(index, text)) writes them, from a template made
    once per choice: an event serializes its text, nothing else."""

    def __init__(self, make_chunk: Callable[[int, str], dict]):
        self._make_chunk = make_chunk
        self._templates: Dict[int, Optional[Tuple[bytes, bytes]]] = {}

    def event(self, index: int, text: str) -> bytes:
        template = self._templates.get(index, False)
        if template is False:
            template = self._templates[index] = self._template(index)
        if template is None:  # (never: the slot's JSON would occur twice)
            return sse_json(self._make_chunk(index, text))
        head, tail = template
        return head + orjson.dumps(text) + tail

    def _template(self, index: int) -> Optional[Tuple[bytes, bytes]]:
        parts = sse_json(self._make_chunk(index, _TEXT_SLOT)).split(orjson.dumps(_TEXT_SLOT))
        return (parts[0], parts[1]) if len(parts) == 2 else None
