"""The model runner: turns the scheduler's ForwardBatch (plain lists) into
tensors, runs the model over the paged KV pool, and samples.

Implements pyvlm.scheduling.types.ModelRunner. A failing step raises its error
(the scheduler isolates the request that caused it), or DeviceFailure when
the device itself no longer works afterwards (a CUDA sticky error).
"""

import contextlib
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from pyvlm import ops
from pyvlm.scheduling.errors import DeviceFailure
from pyvlm.scheduling.future_tokens import FUTURE_TOKEN
from pyvlm.scheduling.types import (STEP_PATH_STAT, ForwardBatch, MultimodalItem, SampleResult,
                                    SequenceChunk)
from pyvlm.layers.attention import AttentionMetadata
from pyvlm.runner import sampler
from pyvlm.ops.host_upload import HostUpload
from pyvlm.runner.cuda_graphs import DecodeGraphs, graph_batch_sizes, position_rows_of
from pyvlm.runner.encoder_cache import VisionBatcher
from pyvlm.runner.kv_pool import KVPool
from pyvlm.runner.penalty_state import PenaltyState
from pyvlm.runner.prefill_graphs import PrefillGraphs
from pyvlm.runner.sampler import DrawnSamples


logger = logging.getLogger("pyvlm.runner")

# The ways a step's model forward runs, counted per step (ModelRunner.step_paths):
# the decode graph of its padded batch, the piecewise graphs around eager
# attention, or wholly eager. A fast path that silently stops taking the steps
# it was built for shows here (the stats and /metrics), not only as a slower run.
STEP_PATHS = ("decode_graph", "piecewise_graphs", "eager")

FaultHook = Callable[[str, Sequence[SequenceChunk]], None]
"""Test hook: called with a stage ("vision", "prefill", "decode", "sampling")
and the chunks it is about to process; raising there injects a fault."""


class ModelRunner:
    """Runs one step of a model over the KV pool (see the module docstring).

    check_indices: whether the ops range-check index tensors during a step, on
    the thread running it (pyvlm.ops.index_checks; the engine turns them off
    on CUDA). Other threads keep their own setting.

    step_stream: a CUDA stream the steps run on instead of the caller's.
    Beside a vision side stream it is one of higher priority
    (step_stream_for): the block scheduler then starts a step's kernels
    before the queued blocks of a tower encoding ahead. Blocks already
    running keep their SMs, so a step beside a tower still waits on them
    (measured slower than after it); a tower stream of fewer SMs
    (pyvlm/runner/tower_stream.py) leaves the steps the rest.
    """

    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device,
                 vision: Optional[VisionBatcher] = None, check_indices: bool = True,
                 step_stream: Optional["torch.cuda.Stream"] = None):
        self.model, self.pool, self.device, self.vision = model, pool, device, vision
        self.step_stream = step_stream
        self.page_size, self.num_pages = pool.page_size, pool.num_pages
        self.image_rows_per_page = pool.image_rows_per_page
        # Families whose images enter through cross-attention build their
        # per-step image inputs themselves (pyvlm/models/README.md).
        self._cross_attention_inputs = getattr(model, "cross_attention_inputs", None)
        self.check_indices = check_indices
        self.fault_hook: Optional[FaultHook] = None
        self.graphs: Optional[DecodeGraphs] = None  # capture_decode_graphs
        self.prefill_graphs: Optional[PrefillGraphs] = None  # capture_prefill_graphs
        self.step_memory = None  # what start-up reserved beside the pool (memory_profile)
        self.penalties = PenaltyState()  # penalized requests' token counts, on the device
        self.step_paths: Dict[str, int] = dict.fromkeys(STEP_PATHS, 0)  # steps run each way
        # The last launched step's sampled tokens (device) and each request's row.
        self._previous: Optional[Tuple[torch.Tensor, Dict[str, int]]] = None

    def forward(self, batch: ForwardBatch) -> List[Optional[SampleResult]]:
        return self.launch(batch).wait()

    def launch(self, batch: ForwardBatch) -> "LaunchedStep":
        """Starts the batch on the device and returns at once; wait() gives
        its results. A chunk may feed FUTURE_TOKEN: the token its request
        sampled in the previous launched step, read on the device (overlap
        scheduling launches step N+1 before reading step N's tokens)."""
        try:
            with ops.index_checks(self.check_indices), self._on_step_stream():
                return LaunchedStep(self, batch, self._launch(batch))
        except Exception as exc:
            failure = self._as_device_failure(exc)
            if failure is exc:
                raise
            raise failure from exc

    def _as_device_failure(self, exc: Exception) -> Exception:
        if isinstance(exc, DeviceFailure) or self.device_is_usable():
            return exc
        return DeviceFailure(f"{type(exc).__name__}: {str(exc)[:500]}")

    def device_is_usable(self) -> bool:
        """Whether the device still computes after an error: a CUDA sticky
        error (illegal address, ECC, launch failure) fails every later call."""
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(self.device)
            return torch.ones(1, device=self.device).add_(1).item() == 2.0
        except Exception:  # any error here means the context is unusable
            logger.exception("the CUDA device failed its health probe")
            return False

    @torch.inference_mode()
    def _launch(self, batch: ForwardBatch) -> Optional[DrawnSamples]:
        """Queues the step's work; the drawn samples (None: nothing sampled)."""
        self._encode_ahead(batch.encode_ahead)
        chunks = batch.chunks
        if not chunks:
            return None
        upload = HostUpload()  # every list of the step goes to the device in one copy per dtype
        sampled = [i for i, c in enumerate(chunks) if c.sample]
        draw = sampler.stage([chunks[i] for i in sampled], upload, self.penalties)
        future = self._stage_future_tokens(chunks, upload)
        if self._graph_runs(batch, sampled):
            replay = self.graphs.stage(chunks, upload)
            self.step_paths["decode_graph"] += 1
            upload.to(self.device)
            self._at("decode", chunks)
            logits = replay(future)
        else:
            forward = self._stage_forward(batch, upload)
            last_rows = upload.add(_last_rows(chunks, sampled), torch.int64)
            upload.to(self.device)
            hidden = forward(future)
            if not sampled:
                self._previous = None
                return None
            logits = self.model.compute_logits(hidden.index_select(0, last_rows.tensor)).float()
        self._at("sampling", [chunks[i] for i in sampled])
        drawn = draw(logits)
        self._previous = (drawn.tokens, {chunks[i].rid: row for row, i in enumerate(sampled)})
        return drawn

    def _encode_ahead(self, items: Sequence[MultimodalItem]) -> None:
        """Encodes waiting requests' images into the encoder cache before this
        step's own work (pyvlm/scheduling/encode_ahead.py). Their requests
        are not in this step: a failure is logged and left to the step that
        admits them, which encodes the images again and fails alone."""
        if not items or self.vision is None:
            return
        try:
            self.vision.encode_ahead(items)
        except Exception:  # noqa: BLE001 - see the docstring
            if not self.device_is_usable():
                raise
            logger.warning("encoding %d images ahead failed; their requests' own steps "
                           "encode them", len(items), exc_info=True)

    def _stage_future_tokens(self, chunks: Sequence[SequenceChunk],
                             upload: HostUpload) -> Callable[[torch.Tensor], None]:
        """Plans the replacement of FUTURE_TOKEN inputs by the previous
        launch's samples; the callable patches the step's input ids."""
        where, rows = [], []
        position = 0
        for c in chunks:  # only a decode chunk (one token) feeds a future token
            if c.num_new_tokens == 1 and c.token_ids[0] == FUTURE_TOKEN:
                if self._previous is None or c.rid not in self._previous[1]:
                    raise RuntimeError(f"request {c.rid} feeds a token no launched step drew")
                where.append(position)
                rows.append(self._previous[1][c.rid])
            position += c.num_new_tokens
        if not where:
            return lambda input_ids: None
        targets, sources = upload.add(where, torch.int64), upload.add(rows, torch.int64)
        previous_tokens = self._previous[0]

        def patch(input_ids: torch.Tensor) -> None:
            input_ids.index_copy_(0, targets.tensor, previous_tokens.index_select(0, sources.tensor))

        return patch

    def capture_decode_graphs(self, max_bs: int, max_seq_len: int, emulate: bool = False) -> None:
        """Captures CUDA graphs of decode steps of up to max_bs sequences of
        up to max_seq_len tokens (emulate: the same static-buffer path run
        eagerly, for CPU tests). A cross-attention family joins through its
        static image inputs (graph_cross_attention_inputs); one without
        them decodes eagerly."""
        cross_inputs = getattr(self.model, "graph_cross_attention_inputs", None)
        cross_unsupported = self._cross_attention_inputs is not None and cross_inputs is None
        if cross_unsupported or max_bs <= 0:
            logger.info("decode steps run without CUDA graphs%s",
                        " (cross-attention model)" if cross_unsupported else "")
            return
        max_pages = -(-max_seq_len // self.page_size)
        cross = None
        if self._cross_attention_inputs is not None:
            cross = cross_inputs(graph_batch_sizes(max_bs)[-1], self.pool)
        self.graphs = DecodeGraphs(self.model, self.pool.caches, self.page_size, max_bs,
                                   max_pages, self.device, emulate, cross)
        self.graphs.capture()

    def capture_prefill_graphs(self, max_tokens: int, emulate: bool = False) -> None:
        """Captures piecewise CUDA graphs of the decoder for steps of up to
        max_tokens tokens that the decode graphs do not take (prefill,
        mixed, larger decode batches); 0: none (pyvlm.runner.prefill_graphs)."""
        decoder = getattr(self.model, "language_model", None)
        if max_tokens <= 0 or decoder is None:
            return
        self.prefill_graphs = PrefillGraphs(decoder, self.pool.caches,
                                            max_tokens, position_rows_of(self.model),
                                            self.device, emulate)
        self.prefill_graphs.capture()

    def _graph_runs(self, batch: ForwardBatch, sampled: List[int]) -> bool:
        return (self.graphs is not None and batch.is_decode and len(sampled) == len(batch.chunks)
                and self.graphs.can_run(batch.chunks))

    @torch.inference_mode()
    def token_logits(self, batch: ForwardBatch) -> torch.Tensor:
        """Runs the batch (its KV goes into the pool as in forward) and
        returns float32 logits of every new token [T, vocab], chunk after
        chunk: prompt logprobs, and the parity tests' view of a step."""
        with ops.index_checks(self.check_indices), self._on_step_stream():
            upload = HostUpload()
            forward = self._stage_forward(batch, upload)
            upload.to(self.device)
            return self.model.compute_logits(forward()).float()

    def _on_step_stream(self):
        """The step's work on step_stream, ordered after what the caller's
        stream queued before it; the caller's stream then waits for the
        step's work (what it reads of the step, e.g. token_logits, is
        complete for it). No host wait either way."""
        if self.step_stream is None:
            return contextlib.nullcontext()
        return _ordered_on(self.step_stream)

    def images_ready(self, items: Sequence[MultimodalItem]) -> bool:
        """Whether the tower work of items encoded ahead is done (a look at
        its events, no wait); items not encoded ahead count as ready (the
        step that admits them encodes them)."""
        return self.vision is None or self.vision.is_ready(items)

    @property
    def encodes_asynchronously(self) -> bool:
        """Whether images encoded ahead run beside the steps (a side stream
        that steps outrank) rather than in the step that carries them."""
        return (self.step_stream is not None and self.vision is not None
                and self.vision.encodes_beside_steps)

    def _stage_forward(self, batch: ForwardBatch,
                       upload: HostUpload) -> Callable[..., torch.Tensor]:
        """Adds the step's token and attention lists to `upload`; the returned
        callable (after upload.to(); given what patches future tokens into
        the input ids) runs the model and returns the hidden states of every
        new token."""
        chunks = batch.chunks
        ids = upload.add([max(t, 0) for c in chunks for t in c.token_ids], torch.int64)
        positions = upload.add(_position_rows(chunks), torch.int64)
        make_attn = AttentionMetadata.stage(
            [(c.start_pos, c.num_new_tokens, c.page_table) for c in chunks],
            self.page_size, batch.is_decode, upload)
        has_images = self._cross_attention_inputs is None and any(c.mm_items for c in chunks)
        targets = upload.add(_image_targets(chunks), torch.int64) if has_images else None

        def run(patch_ids: Callable[[torch.Tensor], None] = lambda ids: None) -> torch.Tensor:
            input_ids, rows = ids.tensor, positions.tensor
            patch_ids(input_ids)
            attn = make_attn()
            if self._cross_attention_inputs is None:
                embeds = self._input_embeddings(input_ids, chunks,
                                                targets.tensor if targets is not None else None)
            else:
                embeds = None
                attn.cross_attention = self._cross_images(chunks, batch.is_decode)
            self._at("decode" if batch.is_decode else "prefill", chunks)
            rows = rows[0] if len(rows) == 1 else rows
            if self.prefill_graphs is not None and self.prefill_graphs.can_run(len(input_ids)):
                self.step_paths["piecewise_graphs"] += 1
                if embeds is None:
                    embeds = self.model.embed_tokens(input_ids)
                return self.prefill_graphs.forward(embeds, rows, attn)
            self.step_paths["eager"] += 1
            return self.model.forward(input_ids, rows, attn, self.pool.caches, embeds)

        return run

    def step_path_stats(self) -> Dict[str, int]:
        """Steps run so far by path (STEP_PATHS), as engine stats
        (pyvlm.scheduling.types.STEP_PATH_STAT)."""
        return {STEP_PATH_STAT + path: count for path, count in self.step_paths.items()}

    def _at(self, stage: str, chunks: Sequence[SequenceChunk]) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage, chunks)

    def free_encoder_cache(self) -> None:
        if self.vision is not None:
            self.vision.cache.clear()

    def _input_embeddings(self, input_ids: torch.Tensor, chunks: Sequence[SequenceChunk],
                          targets: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Token embeddings with image rows merged in at `targets` (the
        packed positions of _image_spans, already on the device), or None
        (text only)."""
        items = [item for c in chunks for item in c.mm_items]
        if not items:
            return None
        if self.vision is None:
            raise ValueError("this model takes no images")
        self._at("vision", [c for c in chunks if c.mm_items])
        by_hash = self.vision.embed(items)
        rows = [by_hash[item.hash][lo:hi] for item, lo, hi, _ in _image_spans(chunks)]
        embeds = self.model.embed_tokens(input_ids)
        if rows:
            ops.merge_multimodal_embeddings(embeds, torch.cat(rows).to(embeds.dtype), targets)
        return embeds

    def _cross_images(self, chunks: Sequence[SequenceChunk], is_decode: bool):
        """The step's cross-attention inputs (None: no chunk has images)."""
        if not any(c.cross_images for c in chunks):
            return None
        if self.vision is None:
            raise ValueError("this model takes no images")
        if any(image.needs_write for c in chunks for image in c.cross_images) or not is_decode:
            self._at("vision", [c for c in chunks if c.cross_images])
        return self._cross_attention_inputs(chunks, self.pool, self.vision.embed, is_decode)


def _position_rows(chunks: Sequence[SequenceChunk]) -> List[List[int]]:
    """The step's rotary positions, one list per row (1: 1-D; 3: M-RoPE),
    as the request builder computed them."""
    rows: List[List[int]] = [[] for _ in chunks[0].positions]
    for c in chunks:
        if len(c.positions) != len(rows):
            raise ValueError("every chunk of a step needs the same number of position rows")
        for row, values in zip(rows, c.positions):
            row.extend(values)
    return rows


def _last_rows(chunks: Sequence[SequenceChunk], sampled: List[int]) -> List[int]:
    """The packed row of each sampled chunk's last new token."""
    ends, end = [], 0
    for c in chunks:
        end += c.num_new_tokens
        ends.append(end - 1)
    return [ends[i] for i in sampled]


def _image_spans(chunks: Sequence[SequenceChunk]):
    """(item, lo, hi, packed start) of each image span that overlaps a
    chunk's new tokens (a span may be split across chunks): rows lo..hi of
    the item's embedding go to packed positions start..start + hi - lo."""
    spans, base = [], 0
    for c in chunks:
        start, end = c.start_pos, c.start_pos + c.num_new_tokens
        for item in c.mm_items:
            lo, hi = max(start, item.offset), min(end, item.offset + item.length)
            if lo < hi:
                spans.append((item, lo - item.offset, hi - item.offset, base + lo - start))
        base += c.num_new_tokens
    return spans


def _image_targets(chunks: Sequence[SequenceChunk]) -> List[int]:
    return [position for _, lo, hi, start in _image_spans(chunks)
            for position in range(start, start + hi - lo)]


@contextlib.contextmanager
def _ordered_on(stream: "torch.cuda.Stream"):
    caller = torch.cuda.current_stream(stream.device)
    stream.wait_stream(caller)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        caller.wait_stream(stream)


def step_stream_for(vision: Optional[VisionBatcher]) -> Optional["torch.cuda.Stream"]:
    """The steps' own stream where the tower has a side stream: one of
    higher priority than the side stream (ModelRunner's docstring); None
    (the caller's stream) otherwise."""
    if vision is None or vision.side_stream is None:
        return None
    # CUDA's priorities run from 0 (the default, lowest) down to a negative
    # greatest; -1 is higher than the default on every card with priorities.
    return torch.cuda.Stream(vision.side_stream.device, priority=-1)


class LaunchedStep:
    """A step queued on the device; wait() reads its samples (the step's one
    host sync) and returns per chunk its SampleResult (None: not sampled)."""

    def __init__(self, runner: ModelRunner, batch: ForwardBatch, drawn: Optional[DrawnSamples]):
        self._runner, self._batch, self._drawn = runner, batch, drawn

    def wait(self) -> List[Optional[SampleResult]]:
        chunks = self._batch.chunks
        results: List[Optional[SampleResult]] = [None] * len(chunks)
        if self._drawn is None:
            return results
        try:
            drawn = self._drawn.results()
        except Exception as exc:  # an asynchronous device error surfaces here
            failure = self._runner._as_device_failure(exc)
            if failure is exc:
                raise
            raise failure from exc
        for i, result in zip([i for i, c in enumerate(chunks) if c.sample], drawn):
            results[i] = result
        return results
