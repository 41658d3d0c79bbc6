"""Prompt text or chat messages plus images -> a scheduler Request: chat
template, tokenization, image decoding, content hashing, planning and the
expansion of each image placeholder into its tokens. Runs in the caller's
thread (or an executor), never on the engine thread."""

import itertools
from typing import Any, List, Optional, Sequence, Union

from pyvlm.engine.request import Request
from pyvlm.engine.types import MultimodalItem, SamplingParams
from pyvlm.entrypoints.messages import convert_messages
from pyvlm.multimodal.hashing import combine_hash, image_content_hash
from pyvlm.multimodal.image_io import load_image
from pyvlm.multimodal.llava_onevision import expand_image_tokens


class RequestBuilder:
    """Builds Requests for one model (see the module docstring).

    image_config: the model's image planner (plan_prompt(sizes) -> plans
    with num_tokens and variant), None for a text-only model.
    """

    def __init__(self, tokenizer, chat_template: Optional[str], image_token: Optional[str],
                 image_token_id: Optional[int], image_config, eos_token_ids, random_seed: int = 0):
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.image_token, self.image_token_id = image_token, image_token_id
        self.image_config, self.eos_token_ids = image_config, frozenset(eos_token_ids)
        self._seeds = itertools.count(random_seed)
        self._rids = itertools.count()

    def from_messages(self, messages: Sequence[dict], sampling: SamplingParams,
                      rid: Optional[str] = None) -> Request:
        template_messages, images = convert_messages(messages)
        prompt = self.render(template_messages)
        return self.from_prompt(prompt, images, sampling, rid)

    def render(self, template_messages: List[dict]) -> str:
        if self.chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model has no chat template; send a prompt instead of messages")
        return self.tokenizer.apply_chat_template(
            template_messages, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=True)

    def from_prompt(self, prompt: Union[str, List[int]], images: Sequence[Any],
                    sampling: SamplingParams, rid: Optional[str] = None,
                    add_special_tokens: bool = False) -> Request:
        """A prompt (text or token ids) with one image placeholder per image;
        text without any placeholder gets them prepended, one line each.
        add_special_tokens: apply the tokenizer's post-processing (BOS)."""
        images = list(images or [])
        if isinstance(prompt, str):
            text = self._with_placeholders(prompt, len(images))
            prompt_ids = (self._tokenize_with_specials(text) if add_special_tokens
                          else self._tokenize(text))
        else:
            prompt_ids = [int(t) for t in prompt]
        prompt_ids, items = self._expand_images(prompt_ids, images)
        seed = sampling.seed if sampling.seed is not None else next(self._seeds)
        return Request(rid=rid or f"req-{next(self._rids)}", prompt_ids=prompt_ids,
                       sampling=sampling, mm_items=items, seed=seed,
                       eos_token_ids=self.eos_token_ids)

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

    def _expand_images(self, prompt_ids: List[int], sources: List[Any]):
        if not sources:
            if self.image_token_id is not None and self.image_token_id in prompt_ids:
                raise ValueError("the prompt has image placeholders but no images were given")
            return prompt_ids, []
        if self.image_config is None:
            raise ValueError("this model does not take images")
        images = [load_image(source) for source in sources]
        plans = self.image_config.plan_prompt([(im.height, im.width) for im in images])
        ids, spans = expand_image_tokens(prompt_ids, self.image_token_id, images,
                                         [p.num_tokens for p in plans])
        items = [MultimodalItem(combine_hash(image_content_hash(im), plan.variant), off, n,
                                (im, plan, len(images)))
                 for im, plan, (off, n) in zip(images, plans, spans)]
        return ids, items
