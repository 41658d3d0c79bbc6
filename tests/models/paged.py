"""Test helpers: run a pyvlm model over a paged KV cache the way the runner
does (prefill chunks, then decode steps), with shuffled, non-contiguous
pages, and the transformers reference for the same inputs."""

import random
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from pyvlm import ops
from pyvlm.layers.attention import AttentionMetadata
from tests.tiny_models import GRID_PINPOINTS, IMAGE_TOKEN_ID, VISION_IMAGE_SIZE, VOCAB_SIZE


def image_processor():
    """transformers' LLaVA-OneVision image processor at the tiny tower's size."""
    from transformers import LlavaOnevisionImageProcessorPil

    side = {"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE}
    return LlavaOnevisionImageProcessorPil(size=side, crop_size=side,
                                           image_grid_pinpoints=GRID_PINPOINTS)


def random_image(height: int, width: int, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_text(num_tokens: int, gen: torch.Generator) -> List[int]:
    """Ordinary (non-special) token ids."""
    return torch.randint(5, VOCAB_SIZE, (num_tokens,), generator=gen).tolist()


class PagedKV:
    """One KV pool for all layers; pages are handed out in shuffled order so
    that no sequence's pages are contiguous or ascending."""

    def __init__(self, model, num_pages: int, page_size: int, seed: int):
        shape = (num_pages, page_size, model.num_kv_heads, model.head_dim)
        # NaN: a read of a slot nobody wrote poisons the logits.
        self.caches = [(torch.full(shape, float("nan")), torch.full(shape, float("nan")))
                       for _ in range(model.num_layers)]
        self.page_size = page_size
        self.free = list(range(num_pages))
        random.Random(seed).shuffle(self.free)

    def grow(self, page_table: List[int], num_tokens: int) -> None:
        """Adds pages to page_table until it covers num_tokens positions."""
        while len(page_table) * self.page_size < num_tokens:
            page_table.append(self.free.pop())


@dataclass
class Sequence:
    """One request: its tokens (and merged embeddings for the prompt part)."""

    token_ids: List[int]
    prompt_embeds: Optional[torch.Tensor] = None  # [num_prompt_tokens, hidden] or None
    num_computed: int = 0
    page_table: List[int] = field(default_factory=list)

    def embeds_of(self, start: int, stop: int) -> Optional[torch.Tensor]:
        if self.prompt_embeds is None or start >= self.prompt_embeds.shape[0]:
            return None
        return self.prompt_embeds[start:stop]


def run_step(model, kv: PagedKV, steps: List[tuple], is_decode: bool) -> List[torch.Tensor]:
    """Runs (sequence, num_new_tokens) pairs as one forward; returns each
    one's logits [num_new_tokens, vocab] and advances the sequences."""
    chunks, ids, positions, embeds = [], [], [], []
    for seq, num_new in steps:
        start = seq.num_computed
        kv.grow(seq.page_table, start + num_new)
        chunks.append((start, num_new, list(seq.page_table)))
        ids += seq.token_ids[start:start + num_new]
        positions += range(start, start + num_new)
        embeds.append(seq.embeds_of(start, start + num_new))
    input_ids = torch.tensor(ids)
    inputs_embeds = merged_embeds(model, input_ids, steps, embeds)
    attn = AttentionMetadata.build(chunks, kv.page_size, is_decode)
    with torch.no_grad():
        hidden = model(input_ids, torch.tensor(positions), attn, kv.caches, inputs_embeds)
        logits = model.compute_logits(hidden)
    for seq, num_new in steps:
        seq.num_computed += num_new
    return list(logits.split([num_new for _, num_new in steps]))


def merged_embeds(model, input_ids, steps, embeds) -> Optional[torch.Tensor]:
    """Token embeddings with the image rows of the prompt put back in place."""
    if all(e is None for e in embeds):
        return None
    with torch.no_grad():
        out = model.embed_tokens(input_ids)
    offset = 0
    for (seq, num_new), rows in zip(steps, embeds):
        if rows is not None:  # rows may stop short of the chunk (continuation tokens)
            is_image = input_ids[offset:offset + rows.shape[0]] == IMAGE_TOKEN_ID
            positions = torch.nonzero(is_image).reshape(-1) + offset
            ops.merge_multimodal_embeddings(out, rows[is_image], positions)
        offset += num_new
    return out


def run_chunked(model, seq: Sequence, kv: PagedKV, chunk_sizes: List[int],
                num_decode: int) -> torch.Tensor:
    """Prefill in chunks of chunk_sizes (the last one takes the rest of the
    prompt), then num_decode single-token steps; all logits [T, vocab]."""
    num_prompt = len(seq.token_ids) - num_decode
    logits = []
    for size in chunk_sizes + [num_prompt]:
        size = min(size, num_prompt - seq.num_computed)
        if size > 0:
            logits += run_step(model, kv, [(seq, size)], is_decode=False)
    for _ in range(num_decode):
        logits += run_step(model, kv, [(seq, 1)], is_decode=True)
    return torch.cat(logits)


def reference_logits(hf_model, token_ids: List[int], **image_inputs) -> torch.Tensor:
    """transformers' logits of one whole sequence [T, vocab]."""
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([token_ids]), **image_inputs).logits[0]
