"""The contract between the scheduling core and a model runner (no torch).

The scheduler decides, each step, which requests run and which of their
tokens; it hands the runner a `ForwardBatch` of plain Python data and gets
back one `SampleResult` per chunk that asked for a sample. The runner owns
tensors, the KV pool's memory and the vision tower; the scheduler owns the
bookkeeping (which pages belong to whom, what is cached).

Token slot arithmetic is shared by both sides: token i of a sequence lives
in slot page_table[i // page_size] * page_size + i % page_size.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops (OpenAI/SGLang semantics).

    temperature 0 means greedy. top_k -1 (or 0) means no top-k limit. seed
    None lets the engine pick one; the token drawn at output step n depends
    only on (seed, n) and the logits, so a preempted and recomputed request
    produces the same tokens.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Tuple[Tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class MultimodalItem:
    """One image of a prompt, already expanded into placeholder tokens.

    hash: 64-bit content key of the image (its encoded bytes, or the
    pixels, size and mode of an in-process PIL image: pyvlm.multimodal.
    hashing) combined with the plan's processing variant; it keys the radix cache (placeholder
    positions) and the encoder cache, so different images, or one image
    processed two ways, never share entries.
    offset/length: the span of its placeholder tokens in the prompt ids.
    plan: the family processor's plan (pyvlm.multimodal.processor.ImagePlan).
    prepared: the family's tower input made from the pixels when the request
    was built (e.g. CPU pixel tiles); opaque to the scheduler, read by the
    model's encode_prepared.
    num_cross_rows: for families whose images enter through cross-attention
    (Llama-3.2-Vision), the K/V rows the image keeps in the KV pool (its
    real tiles' patches); 0 for images merged into the token embeddings.
    cross_span: the prompt positions [start, end) whose tokens attend to
    the image (end None: to the end, generated tokens included); None for
    images merged into the embeddings.
    """

    hash: int
    offset: int
    length: int
    plan: Any = None
    prepared: Any = None
    num_cross_rows: int = 0
    cross_span: Optional[Tuple[int, Optional[int]]] = None

    def is_attended_at(self, position: int) -> bool:
        """Whether the token at prompt position `position` attends to this
        image through cross-attention (cross_span covers it)."""
        start, end = self.cross_span
        return start <= position and (end is None or position < end)


@dataclass(frozen=True)
class CrossImage:
    """One image of a cross-attention request, where its K/V live: pages of
    the KV pool (the runner maps each page to its image rows) and whether
    this step must compute and write them (first use after allocation)."""

    item: MultimodalItem
    pages: Tuple[int, ...]
    needs_write: bool


@dataclass
class SequenceChunk:
    """The tokens one request runs in one step.

    token_ids are the new tokens, in sequence slots start_pos ..
    start_pos + len(token_ids) - 1; positions holds their rotary positions,
    one list per row (1 row: 1-D; 3 rows: M-RoPE), computed when the
    request was built (pyvlm.scheduling.positions). The KV of slots < start_pos is
    already in the cache (prefix cache hit, earlier chunk, or earlier decode
    steps). page_table covers every position up to the last new token.
    mm_items are the request's images whose span overlaps the new tokens (an
    image span may be split across chunks: the runner embeds the whole image
    and uses the overlapping rows). sample is True when the last new token's
    logits are sampled (last prompt chunk, or decode). cross_images lists
    every image of a cross-attention request (not only the overlapping
    ones: a token may attend to an image placed before its chunk).

    A decode is a chunk of one token at start_pos = the tokens already
    computed, with sample True; it may come in a decode batch or, mixed
    with prefill chunks, in a prefill batch (is_decode False).

    page_table, prompt_ids and output_ids are the request's own lists, not
    copies (so a step costs the scheduler time in its new tokens, not in
    the context). The runner reads them only while the call that runs the
    step (forward, or launch) builds its inputs: it must not mutate them,
    nor read them afterwards (the scheduler grows and rewrites them
    between steps); whatever it needs later it copies then.
    """

    rid: str
    token_ids: List[int]
    start_pos: int
    positions: List[List[int]]
    page_table: List[int]
    mm_items: List[MultimodalItem]
    sample: bool
    sampling: SamplingParams
    seed: int
    step: int  # number of tokens this request has generated before this step
    prompt_ids: Sequence[int] = ()  # for repetition penalty (HF applies it to prompt + output)
    output_ids: Sequence[int] = ()  # tokens generated so far (penalties)
    cross_images: Sequence[CrossImage] = ()

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_generated_token(self) -> bool:
        """One token past the prompt: a decode (in a decode step, or mixed
        into a prefill step)."""
        return self.num_new_tokens == 1 and self.start_pos >= len(self.prompt_ids)


@dataclass
class ForwardBatch:
    """One model step: is_decode True: one decode token of each request
    (the decode path); False: prefill chunks, possibly with decodes of
    running requests mixed in (1-token chunks, run as prefill chunks with
    their prefix; SequenceChunk)."""

    is_decode: bool
    chunks: List[SequenceChunk] = field(default_factory=list)
    # Images of requests still waiting, to encode into the runner's encoder
    # cache during this step for a later step's prefill
    # (pyvlm/scheduling/encode_ahead.py); none of this step's chunks reads them.
    encode_ahead: List[MultimodalItem] = field(default_factory=list)


@dataclass(frozen=True)
class SampleResult:
    """The sampled token of one chunk with its logprob and the top-N."""

    token_id: int
    logprob: float = 0.0
    top_logprobs: Tuple[Tuple[int, float], ...] = ()


class ModelRunner(Protocol):
    """What the scheduler needs from a runner (the real one and test fakes)."""

    page_size: int
    num_pages: int

    def forward(self, batch: ForwardBatch) -> List[Optional[SampleResult]]:
        """Runs the batch; returns, per chunk in order, its SampleResult
        (None for chunks with sample False)."""
        ...

    def free_encoder_cache(self) -> None:
        """Drops cached vision-tower outputs (flush_cache)."""
        ...


def image_rows_per_page_of(runner: Any) -> int:
    """Image K/V rows one pool page holds for cross-attention families (the
    runner's image_rows_per_page); 0 when the model keeps none."""
    return int(getattr(runner, "image_rows_per_page", 0) or 0)


class Tokenizer(Protocol):
    """The tokenizer surface the engine's detokenizer uses (HF compatible)."""

    eos_token_id: Optional[int]
    all_special_ids: List[int]

    def convert_ids_to_tokens(self, ids: List[int]) -> List[str]: ...

    def convert_tokens_to_string(self, tokens: List[str]) -> str: ...

    def decode(self, ids: List[int], skip_special_tokens: bool = True) -> str: ...


SchedulerStats = Dict[str, float]

# The engine's stats also count its model steps by the way each ran (decode
# graph, piecewise graphs, eager: pyvlm.runner.model_runner.STEP_PATHS), one
# entry per path named STEP_PATH_STAT + path.
STEP_PATH_STAT = "num_steps_"


def step_paths_of(stats: Mapping[str, Any]) -> Dict[str, int]:
    """{path: steps} from engine stats ({} when they count none)."""
    return {key[len(STEP_PATH_STAT):]: int(value) for key, value in stats.items()
            if key.startswith(STEP_PATH_STAT)}
