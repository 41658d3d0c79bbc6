"""A generation request as the scheduler tracks it, and what it streams back.

A request's KV lives in the pages of `page_table` (token i in page
page_table[i // page_size]). The leading `num_shared_pages` of them belong
to the radix cache (matched at admission or handed over after prefill) and
are protected by the lock on `cache_node`; the rest are owned by the
request alone and are freed when it finishes.
"""

import enum
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, FrozenSet, List, Optional, Tuple, Union

from pyvlm.scheduling.types import MultimodalItem, SamplingParams
from pyvlm.scheduling.positions import MropePositions, positions_of

PositionKey = Union[int, Tuple]
"""A radix-cache key: the token id, ("img", content hash, index in span), or
("pre", images' hash, token id) before the first image (pre_image_key)."""

Logprob = Tuple[int, float, Tuple[Tuple[int, float], ...]]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation request: its prompt, progress, pages and outcome.

    eos_token_ids: the tokenizer's EOS plus the chat template's stop ids;
    they end generation unless sampling.ignore_eos. num_computed_tokens
    counts the tokens whose KV is in the cache; num_cached_tokens is the
    prefix-cache hit of the first admission (reported as usage).
    """

    rid: str
    prompt_ids: List[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    mm_items: List[MultimodalItem] = field(default_factory=list)
    seed: int = 0
    eos_token_ids: FrozenSet[int] = frozenset()
    arrival: int = -1
    status: RequestStatus = RequestStatus.WAITING
    output_ids: List[int] = field(default_factory=list)
    page_table: List[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: Optional[str] = None
    matched_stop: Union[int, str, None] = None
    max_new_tokens: int = 0  # sampling.max_new_tokens clipped to the context (set by the scheduler)
    num_image_bytes: int = 0  # preprocessed image bytes held for it (its builder's budget)
    mrope: Optional[MropePositions] = None  # M-RoPE positions; None: token i at position i
    # Set when the KV of the tokens before the first image depends on the
    # images (Llama-3.2-Vision in transformers: those tokens cross-attend to
    # every image row): their radix keys then also name this value (the
    # images' combined hash), so they are shared only with the same images.
    pre_image_key: Optional[int] = None
    # Bookkeeping owned by the scheduler.
    num_shared_pages: int = 0
    cache_node: Any = None
    detokenizer: Any = None
    num_streamed_tokens: int = 0
    pending_logprobs: List[Logprob] = field(default_factory=list)
    num_preemptions: int = 0
    encoded_ahead: bool = False  # its images went to the runner ahead of its prefill (encode_ahead)
    error: Optional[str] = None  # why the engine failed it (finish_reason "error")
    image_kv: List[Any] = field(default_factory=list)  # its images' K/V page references
    # The last look at the prefix cache (KVManager.match): (cache version,
    # key limit, PrefixMatch), so ordering the queue re-walks nothing.
    prefix_match: Any = field(default=None, init=False, repr=False)
    _stop_ids: Any = field(default=None, init=False, repr=False)  # (sampling, eos ids, their stop set)
    # (prompt ids, images, pre_image_key, the prompt's position keys)
    _prompt_key_memo: Any = field(default=None, init=False, repr=False)

    @property
    def all_ids(self) -> List[int]:
        """Prompt followed by the generated tokens (a new list: O(context);
        token_ids(start, end) takes a span without building it)."""
        return self.prompt_ids + self.output_ids

    def token_ids(self, start: int, end: int) -> List[int]:
        """Tokens [start, end) of prompt + output, as a new list, in time
        proportional to the span (not to the context)."""
        num_prompt = len(self.prompt_ids)
        if end <= num_prompt:
            return self.prompt_ids[start:end]
        if start >= num_prompt:
            return self.output_ids[start - num_prompt:end - num_prompt]
        return self.prompt_ids[start:] + self.output_ids[:end - num_prompt]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def stop_token_ids(self) -> FrozenSet[int]:
        """Token ids that end generation with finish_reason "stop" (built
        once per sampling/eos pair: it is asked for every sampled token)."""
        memo = self._stop_ids
        if memo is None or memo[0] is not self.sampling or memo[1] is not self.eos_token_ids:
            extra = frozenset(self.sampling.stop_token_ids)
            stop_ids = extra if self.sampling.ignore_eos else extra | self.eos_token_ids
            memo = self._stop_ids = (self.sampling, self.eos_token_ids, stop_ids)
        return memo[2]

    def position_keys(self, start: int = 0, end: Optional[int] = None) -> List[PositionKey]:
        """The radix-cache key of each position in [start, end) of all_ids.

        Inside an image span the key names the image's content, so the same
        image shares cached KV and a different image of the same size (same
        placeholder ids) does not. Generated tokens are their own keys.
        """
        end = self.num_tokens if end is None else end
        num_prompt = len(self.prompt_ids)
        if not self.mm_items or start >= num_prompt:
            return self.token_ids(start, end)
        keys = self._prompt_keys()[start:end]
        if end > num_prompt:
            keys += self.output_ids[:end - num_prompt]
        return keys

    def _prompt_keys(self) -> List[PositionKey]:
        """position_keys of the whole prompt, built once per prompt and
        images: the walk at admission and the inserts after prefill and at
        the end read them (a few hundred image keys each)."""
        memo = self._prompt_key_memo
        if (memo is None or memo[0] is not self.prompt_ids or memo[1] is not self.mm_items
                or memo[2] != self.pre_image_key):
            memo = (self.prompt_ids, self.mm_items, self.pre_image_key, self._build_prompt_keys())
            self._prompt_key_memo = memo
        return memo[3]

    def _build_prompt_keys(self) -> List[PositionKey]:
        # zip builds the key tuples in C (an image is hundreds of positions)
        keys: List[PositionKey] = list(self.prompt_ids)
        if self.pre_image_key is not None:
            first_image = min(item.offset for item in self.mm_items)
            keys[:first_image] = zip(repeat("pre"), repeat(self.pre_image_key),
                                     keys[:first_image])
        for item in self.mm_items:
            end = min(len(keys), item.offset + item.length)
            keys[item.offset:end] = zip(repeat("img"), repeat(item.hash),
                                        range(end - item.offset))
        return keys

    def positions(self, start: int, end: int) -> List[List[int]]:
        """The rotary positions of tokens [start, end), one list per row
        (set when the request was built; the runner never derives them)."""
        return positions_of(self.mrope, start, end - start)

    def mm_items_overlapping(self, start: int, end: int) -> List[MultimodalItem]:
        """The images whose placeholder span overlaps positions [start, end)."""
        if start >= len(self.prompt_ids):  # spans lie in the prompt: none (every decode step)
            return []
        return [item for item in self.mm_items
                if item.offset < end and start < item.offset + item.length]


@dataclass
class RequestOutput:
    """What one request streams back after a step (a delta, not a total)."""

    rid: str
    new_token_ids: List[int]
    new_text: str
    finished: bool
    finish_reason: Optional[str]
    matched_stop: Union[int, str, None]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    new_logprobs: List[Logprob] = field(default_factory=list)
    error: Optional[str] = None  # set when the engine failed this request (finish "error")
