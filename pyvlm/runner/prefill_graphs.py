"""Piecewise CUDA graphs of the decoder for steps of any kind (vLLM's
piecewise cudagraphs, SGLang's piecewise CUDA graph): prefill, mixed
prefill + decode, and decode batches the decode graphs do not take.

A prefill or mixed step's kernels are as short as a decode step's where
its tokens are few (a chunk of a few hundred tokens and the decodes: tens
of microseconds each), so launching them one by one from Python can leave
the GPU idle between them. Only attention depends on the step's sequences
(their lengths, cached prefixes and pages); every other op of a decoder
layer works row by row. So the parts between attentions (o_proj, norms,
MLP, the next layer's norm, q/k/v projection and rotary) are captured once
per padded token count and replayed, and attention runs eagerly in between
over the real rows. (On an H100, a 7B model's mixed steps of a 411-token
image prompt and ~40 decodes: 21.5 -> 20.2 ms, 256 @ 64 over HTTP +6%
tokens/s; benchmarks/RESULTS.md.)

Per bucket of B tokens (prefill_graph_sizes), one graph per stretch
between eager steps: 29 graphs for a 28-layer decoder. A step of T <= B
tokens copies its embeddings and positions into static buffers, replays
the pieces and runs each attention over rows 0..T-1; rows T..B-1 hold
whatever earlier steps left there (finite values; every captured op works
row by row, so they touch no real row) and write no KV (attention and
the cache write see T rows only). Hand-offs between a piece and an eager
step go through static buffers outside the graphs' memory pool (q/k/v,
attention output, an eager layer's hidden and residual, the final hidden
states); what passes from one piece to the next (the residual across
attention) stays at its captured address in the pool. The pieces of all
buckets share one pool: they replay in the order they were captured and
never concurrently, so a piece may reuse what an earlier piece's outputs
held once the piece after it has read them (torch.cuda.graph's rule for
shared pools).

A layer without before_attention/after_attention (e.g. a cross-attention
family's image layers) runs eagerly whole between pieces.

`emulate=True` runs the same pieces and buffers eagerly (CPU tests of the
padding and hand-off logic; never faster).
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from pyvlm import ops
from pyvlm.layers.attention import AttentionMetadata

logger = logging.getLogger("pyvlm.runner")

State = Dict[str, Optional[torch.Tensor]]
Piece = Callable[[State], State]


def prefill_graph_sizes(max_tokens: int) -> List[int]:
    """Captured token counts: 1, 2, 4, 8, then every 16 to 512, every 32 to
    1,024, every 64 beyond (at most 15 padding rows, or 1/16 of a step's rows
    above 512; padding rows cost the pieces their FLOPs, and a single image
    prompt's prefill of a few hundred tokens is device bound), up to
    max_tokens. The small ones keep a decode batch the decode graphs do not
    take at its own rows: one or two rows run the skinny GEMM, sixteen
    cuBLAS's GEMMs (pyvlm.layers.linear)."""
    sizes = ([1, 2, 4, 8] + list(range(16, 513, 16)) + list(range(544, 1025, 32))
             + list(range(1088, max(max_tokens, 1) + 64, 64)))
    sizes = [s for s in sizes if s < max_tokens] + [max_tokens]
    return sorted(set(s for s in sizes if s >= 1))


def splits_at_attention(layer: torch.nn.Module) -> bool:
    """Whether the layer's forward comes in parts around attention
    (before_attention, self_attn.attend, after_attention)."""
    return hasattr(layer, "before_attention") and hasattr(layer, "after_attention")


@dataclass
class _Statics:
    """The hand-off buffers, for the largest bucket (rows sliced per bucket)."""

    embeds: torch.Tensor  # [max, hidden]: the step's input embeddings
    positions: torch.Tensor  # [rows * max]: viewed [rows, B] per bucket (M-RoPE)
    qkv: Optional[torch.Tensor]  # [max, q + 2 kv]: a piece's projected rows for attention
    attention: Optional[torch.Tensor]  # [max, q]: attention's output for the next piece
    hidden: torch.Tensor  # [max, hidden]: an eager layer's input, then its output
    residual: torch.Tensor  # [max, hidden]: likewise
    output: torch.Tensor  # [max, hidden]: the final norm's output


@dataclass
class _GraphStep:
    """Consecutive pieces captured as one graph per bucket."""

    pieces: List[Piece]
    graphs: Dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)

    def run(self, state: State) -> State:
        for piece in self.pieces:
            state = piece(state)
        return state


@dataclass
class _AttentionStep:
    """A self-attention layer's attend() over the step's real rows."""

    layer: torch.nn.Module
    cache_index: int


@dataclass
class _EagerLayerStep:
    """A layer that does not split (a cross-attention layer), run whole."""

    layer: torch.nn.Module
    cache_index: int
    first: bool  # layer 0: it reads the embeddings, and no residual yet


class PrefillGraphs:
    """Piecewise graphs of `decoder` (a decoder with `layers` and `norm`) over
    `kv_caches`, one set per size of prefill_graph_sizes(max_tokens)."""

    def __init__(self, decoder: torch.nn.Module, kv_caches, max_tokens: int,
                 num_position_rows: int, device: torch.device, emulate: bool = False):
        self.decoder, self.kv_caches = decoder, kv_caches
        self.device, self.emulate = device, emulate
        self.sizes = prefill_graph_sizes(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.num_rows = num_position_rows
        self.steps = self._plan()
        self._statics = self._make_statics()

    # ---- the plan --------------------------------------------------------

    def _plan(self) -> List[object]:
        """Graph steps (merged runs of pieces) and eager steps, in order."""
        steps: List[object] = []
        pieces: List[Piece] = []

        def flush():
            if pieces:
                steps.append(_GraphStep(list(pieces)))
                pieces.clear()

        for index, layer in enumerate(self.decoder.layers):
            if splits_at_attention(layer):
                pieces.append(self._before_attention(layer))
                flush()
                steps.append(_AttentionStep(layer, index))
                pieces.append(self._after_attention(layer))
            else:
                if pieces:  # the layer before split: its outputs are in the pool
                    pieces.append(self._hand_to_eager_layer)
                flush()
                steps.append(_EagerLayerStep(layer, index, first=index == 0))
        pieces.append(self._final_norm)
        flush()
        return steps

    def _before_attention(self, layer) -> Piece:
        def piece(state: State) -> State:
            qkv, residual = layer.before_attention(state["positions"], state["hidden"],
                                                   state["residual"])
            rows = qkv.shape[0]
            self._statics.qkv[:rows].copy_(qkv)
            return {"positions": state["positions"], "residual": residual}

        return piece

    def _after_attention(self, layer) -> Piece:
        def piece(state: State) -> State:
            rows = state["residual"].shape[0]
            hidden, residual = layer.after_attention(self._statics.attention[:rows],
                                                     state["residual"])
            return {"positions": state["positions"], "hidden": hidden, "residual": residual}

        return piece

    def _hand_to_eager_layer(self, state: State) -> State:
        rows = state["hidden"].shape[0]
        self._statics.hidden[:rows].copy_(state["hidden"])
        self._statics.residual[:rows].copy_(state["residual"])
        return {"positions": state["positions"]}

    def _final_norm(self, state: State) -> State:
        hidden, _ = self.decoder.norm(state["hidden"], state["residual"])
        self._statics.output[:hidden.shape[0]].copy_(hidden)
        return {}

    def _make_statics(self) -> _Statics:
        decoder, rows = self.decoder, self.max_tokens
        hidden_size = decoder.shape.hidden_size
        weight = decoder.embed_tokens.weight
        make = lambda *shape, dtype=weight.dtype: torch.zeros(  # noqa: E731
            *shape, dtype=dtype, device=self.device)
        attention = next((layer.self_attn for layer in decoder.layers
                          if splits_at_attention(layer)), None)
        return _Statics(
            embeds=make(rows, hidden_size),
            positions=make(self.num_rows * rows, dtype=torch.int64),
            qkv=make(rows, attention.q_size + 2 * attention.kv_size) if attention else None,
            attention=make(rows, attention.q_size) if attention else None,
            hidden=make(rows, hidden_size), residual=make(rows, hidden_size),
            output=make(rows, hidden_size))

    def _positions(self, size: int) -> torch.Tensor:
        flat = self._statics.positions[:self.num_rows * size]
        return flat if self.num_rows == 1 else flat.view(self.num_rows, size)

    def _initial_state(self, size: int) -> State:
        return {"positions": self._positions(size), "hidden": self._statics.embeds[:size],
                "residual": None}

    # ---- capture ---------------------------------------------------------

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every bucket, largest first (the others then reuse the
        pool the largest one sized)."""
        if self.emulate:
            return
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with ops.index_checks(False):  # a check is a host sync: not capturable
            for size in reversed(self.sizes):
                self._capture_bucket(size, pool, stream)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graphs = sum(isinstance(step, _GraphStep) for step in self.steps)
        logger.info("captured prefill CUDA graphs (%d pieces each) for %d token counts up to "
                    "%d in %.1f s", graphs, len(self.sizes), self.max_tokens,
                    time.monotonic() - started)

    def _capture_bucket(self, size: int, pool, stream: torch.cuda.Stream) -> None:
        """Each graph step of this bucket in order, passing its outputs on
        (only the state the next piece reads stays referenced)."""
        state = self._initial_state(size)
        for step in self.steps:
            if isinstance(step, _GraphStep):
                with torch.cuda.stream(stream):
                    step.run(state)  # warm-up: lazy workspaces and kernel plans
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    state = step.run(state)
                step.graphs[size] = graph
            else:
                state = self._after_eager(step, state, size)

    def _after_eager(self, step, state: State, size: int) -> State:
        """The state the piece after an eager step reads (static buffers)."""
        if isinstance(step, _AttentionStep):
            return {"positions": state["positions"], "residual": state["residual"]}
        return {"positions": state["positions"], "hidden": self._statics.hidden[:size],
                "residual": self._statics.residual[:size]}

    # ---- replay ----------------------------------------------------------

    def can_run(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.max_tokens

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        """The decoder's final hidden states [T, hidden] of the step's T
        packed tokens (embeds [T, hidden]; positions [T], or [rows, T]),
        valid until the next call."""
        num_tokens = embeds.shape[0]
        size = next(s for s in self.sizes if s >= num_tokens)
        self._statics.embeds[:num_tokens].copy_(embeds)
        self._positions(size)[..., :num_tokens].copy_(positions)
        state = self._initial_state(size)
        for step in self.steps:
            if isinstance(step, _GraphStep):
                state = self._run_graph(step, state, size)
            elif isinstance(step, _AttentionStep):
                self._attend(step, attn, num_tokens)
                state = self._after_eager(step, state, size)
            else:
                self._run_eager_layer(step, attn, size, num_tokens)
                state = self._after_eager(step, state, size)
        return self._statics.output[:num_tokens]

    def _run_graph(self, step: _GraphStep, state: State, size: int) -> State:
        if self.emulate:
            return step.run(state)
        step.graphs[size].replay()
        return state  # the pieces read their captured addresses, not this

    def _attend(self, step: _AttentionStep, attn: AttentionMetadata, num_tokens: int) -> None:
        step.layer.self_attn.attend(self._statics.qkv[:num_tokens],
                                    self.kv_caches[step.cache_index], attn,
                                    out=self._statics.attention[:num_tokens])

    def _run_eager_layer(self, step: _EagerLayerStep, attn: AttentionMetadata,
                         size: int, num_tokens: int) -> None:
        """The layer over the real rows of the hand-off buffers, its
        outputs written back into them for the next piece."""
        statics = self._statics
        hidden, residual = step.layer(
            self._positions(size)[..., :num_tokens],
            (statics.embeds if step.first else statics.hidden)[:num_tokens],
            None if step.first else statics.residual[:num_tokens],
            self.kv_caches[step.cache_index], attn)
        statics.hidden[:num_tokens].copy_(hidden)
        statics.residual[:num_tokens].copy_(residual)
