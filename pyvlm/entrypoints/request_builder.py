"""Prompt text or chat messages plus images -> a scheduler Request: chat
template, tokenization, image loading (under the media policy), content
hashing, planning against the buffer cap, the expansion of each image
placeholder into its tokens, and the images' preprocessing into tower
inputs. Runs in the caller's thread (or the server's executor), never on
the engine thread, so no request's images stall the engine step."""

import itertools
import secrets
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

from pyvlm.chat import ChatTemplate, ChatTemplateError, RenderedChat
from pyvlm.scheduling.request import Request
from pyvlm.scheduling.types import MultimodalItem, SamplingParams
from pyvlm.entrypoints.image_budget import ImageBudget
from pyvlm.multimodal.blocking_media import load_images_blocking, load_refs_blocking
from pyvlm.multimodal.hashing import combine_hash, image_content_hash
from pyvlm.multimodal.processor import expand_image_tokens
from pyvlm.multimodal.media import MediaPolicy


@dataclass(frozen=True)
class ImageInputs:
    """How a model's images become request items.

    placeholder: what a prompt writes for one image (the processor's
    placeholder_text around the image token); image_token_id: the token a
    placeholder's image span repeats. processor: the family's torch-free
    image processor (pyvlm.multimodal.processor.ImageProcessor), launch
    overrides applied. prepare(images, plans) -> one tower input per image
    is the model's prepare_images (CPU); it becomes MultimodalItem.prepared
    and holds bytes_per_value bytes per pixel value.
    """

    placeholder: str
    image_token_id: int
    processor: Any
    prepare: Callable[[Sequence[Any], Sequence[Any]], List[Any]]
    bytes_per_value: int


class RequestBuilder:
    """Builds Requests for one model (see the module docstring).

    chat_template: what from_messages renders with (the one the server
    renders with too; None: messages are refused). images: None for a
    text-only model. media: what image sources may reach
    and cost (the server's policy; its max_pixels also caps every buffer of
    the preprocessing). image_budget: bounds the prepared images of requests
    not yet finished (request.num_image_bytes is held until release()).
    vocab_size: token-id prompts must lie in [0, vocab_size).
    random_seed: the first seed of unseeded requests; None draws a fresh
    base per process, so restarts do not repeat samples.
    """

    def __init__(self, tokenizer, chat_template: Optional[ChatTemplate], eos_token_ids,
                 images: Optional[ImageInputs], media: MediaPolicy, context_length: int,
                 random_seed: Optional[int] = None,
                 image_budget: Optional[ImageBudget] = None, vocab_size: Optional[int] = None):
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.images, self.media = images, media
        self.image_budget = image_budget or ImageBudget(1 << 62)
        self._release_lock = threading.Lock()
        self.context_length, self.vocab_size = context_length, vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        base = secrets.randbits(62) if random_seed is None else random_seed
        self._seeds = itertools.count(base)
        self._rids = itertools.count()

    @property
    def image_token(self) -> Optional[str]:
        """What a prompt writes for one image (None: the model takes none)."""
        return self.images.placeholder if self.images else None

    @property
    def image_token_id(self) -> Optional[int]:
        return self.images.image_token_id if self.images else None

    def from_messages(self, messages: Sequence[dict], sampling: SamplingParams,
                      rid: Optional[str] = None, wait: bool = True,
                      mm_processor_kwargs: Optional[Mapping[str, Any]] = None) -> Request:
        """Chat messages -> a Request, as the server builds one for
        /v1/chat/completions: rendered by the chat template (its stop strings
        join sampling's), the images loaded under the media policy (a refusal
        names the message part), the text tokenized with the tokenizer's
        special tokens (a BOS the template wrote is not doubled)."""
        rendered = self.render(messages)
        images = load_refs_blocking(rendered.image_refs, self.media)
        return self.from_prompt(rendered.text, images, with_stop_strings(sampling, rendered.stop),
                                rid, add_special_tokens=True, wait=wait,
                                mm_processor_kwargs=mm_processor_kwargs)

    def release(self, request: Request) -> None:
        """Gives back the image budget a finished request held (once: later
        calls, from any thread, do nothing)."""
        with self._release_lock:
            num_bytes, request.num_image_bytes = request.num_image_bytes, 0
        if num_bytes:
            self.image_budget.give_back(num_bytes)

    def render(self, messages: Sequence[dict]) -> RenderedChat:
        """The chat template's rendering (prompt text with one placeholder
        per image, image refs, stop strings); raises ChatTemplateError."""
        if self.chat_template is None:
            raise ChatTemplateError("this engine has no chat template; pass chat_template= "
                                    "or send a prompt instead of messages")
        return self.chat_template.render(messages, add_generation_prompt=True)

    def from_prompt(self, prompt: Union[str, List[int]], images: Sequence[Any],
                    sampling: SamplingParams, rid: Optional[str] = None,
                    add_special_tokens: bool = False, wait: bool = True,
                    mm_processor_kwargs: Optional[Mapping[str, Any]] = None) -> Request:
        """A prompt (text or token ids) with one image placeholder per image;
        text without any placeholder gets them prepended, one line each.
        add_special_tokens: apply the tokenizer's post-processing (BOS).
        wait: when the image budget is full, wait for room (else
        EngineBusyError). mm_processor_kwargs: this request's image processor
        settings over the launch's (ValueError for ones the family lacks).
        Whoever runs the request must release() it once it ends."""
        images = list(images or [])
        if isinstance(prompt, str):
            text = self._with_placeholders(prompt, len(images))
            prompt_ids = (self._tokenize_with_specials(text) if add_special_tokens
                          else self._tokenize(text))
        else:
            prompt_ids = [int(t) for t in prompt]
        self._check_token_ids(prompt_ids)
        processor = self._processor(mm_processor_kwargs)
        prompt_ids, items, num_image_bytes = self._expand_images(prompt_ids, images, wait,
                                                                 processor)
        seed = sampling.seed if sampling.seed is not None else next(self._seeds)
        mrope = None if processor is None else processor.prompt_positions(
            prompt_ids, [(item.offset, item.length) for item in items],
            [item.plan for item in items])
        return Request(rid=rid or f"req-{next(self._rids)}", prompt_ids=prompt_ids,
                       sampling=sampling, mm_items=items, seed=seed,
                       eos_token_ids=self.eos_token_ids, num_image_bytes=num_image_bytes,
                       mrope=mrope, pre_image_key=pre_image_key(processor, items))

    def _processor(self, mm_processor_kwargs: Optional[Mapping[str, Any]]):
        if self.images is None:
            if mm_processor_kwargs:
                raise ValueError("this model does not take images (mm_processor_kwargs)")
            return None
        if not mm_processor_kwargs:
            return self.images.processor
        return self.images.processor.with_overrides(mm_processor_kwargs)

    def _with_placeholders(self, prompt: str, num_images: int) -> str:
        if num_images and self.image_token and self.image_token not in prompt:
            return (self.image_token + "\n") * num_images + prompt
        return prompt

    def _tokenize(self, text: str) -> List[int]:
        # Templates already hold BOS where the model wants one.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _tokenize_with_specials(self, text: str) -> List[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        bos, bos_token = (getattr(self.tokenizer, "bos_token_id", None),
                          getattr(self.tokenizer, "bos_token", None))
        # A template that already starts with BOS must not get a second one.
        if bos is not None and ids[:2] == [bos, bos] and bos_token and text.startswith(bos_token):
            return ids[1:]
        return ids

    def _expand_images(self, prompt_ids: List[int], sources: List[Any], wait: bool, processor):
        """(expanded ids, items, bytes of image budget taken)."""
        if not sources:
            if self.image_token_id is not None and self.image_token_id in prompt_ids:
                raise ValueError("the prompt has image placeholders but no images were given")
            self.check_context(len(prompt_ids), [])
            return prompt_ids, [], 0
        if self.images is None:
            raise ValueError("this model does not take images")
        images = load_images_blocking(sources, self.media)
        plans = processor.plan_prompt([(im.height, im.width) for im in images],
                                      self.media.max_pixels)
        ids, spans = expand_image_tokens(prompt_ids, self.image_token_id, images,
                                         [p.num_tokens for p in plans])
        self.check_context(len(ids), plans)
        hashes = [combine_hash(image_content_hash(im), plan.variant)
                  for im, plan in zip(images, plans)]
        num_bytes = sum(p.num_pixel_values for p in plans) * self.images.bytes_per_value
        self.image_budget.take(num_bytes, wait)
        try:
            payloads = self.images.prepare(images, plans)
        except BaseException:
            self.image_budget.give_back(num_bytes)
            raise
        cross_spans = cross_attention_spans(processor, spans)
        return ids, [MultimodalItem(h, off, n, plan, payload,
                                    num_cross_rows=getattr(plan, "num_cross_rows", 0),
                                    cross_span=cross_span)
                     for h, (off, n), plan, payload, cross_span
                     in zip(hashes, spans, plans, payloads, cross_spans)], num_bytes

    def check_context(self, num_prompt_tokens: int, plans) -> None:
        """Refuses, before any preprocessing, a prompt too long for the
        context (naming each image's share), as the scheduler would later."""
        if num_prompt_tokens < self.context_length:
            return
        counts = ", ".join(f"image {i}: {p.num_tokens}" for i, p in enumerate(plans, start=1))
        after = f" after image expansion ({counts})" if plans else ""
        raise ValueError(
            f"The prompt has {num_prompt_tokens} tokens{after}, which exceeds the context "
            f"length of {self.context_length} tokens")

    def _check_token_ids(self, prompt_ids: List[int]) -> None:
        if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"the prompt has token ids outside the vocabulary "
                             f"[0, {self.vocab_size})")


def cross_attention_spans(processor, spans: Sequence[Tuple[int, int]]) -> list:
    """Per image, the prompt positions that cross-attend to it (the
    processor's cross_attention_spans), or None for every image of a family
    whose images are merged into the token embeddings."""
    make_spans = getattr(processor, "cross_attention_spans", None)
    if make_spans is None:
        return [None] * len(spans)
    return list(make_spans([offset for offset, _ in spans]))


def pre_image_key(processor, items: Sequence[MultimodalItem]) -> Optional[int]:
    """The images' combined hash when the processor says the text before the
    first image depends on them (text_before_images_sees_images), else None."""
    if not items or not getattr(processor, "text_before_images_sees_images", False):
        return None
    key = 0
    for item in items:
        key = combine_hash(item.hash, str(key))
    return key


def with_stop_strings(sampling: SamplingParams, stop: Tuple[str, ...]) -> SamplingParams:
    """sampling with the template's stop strings after its own (as the
    server merges them: pyvlm/server/params.py)."""
    extra = tuple(s for s in stop if s not in sampling.stop)
    return replace(sampling, stop=sampling.stop + extra) if extra else sampling
