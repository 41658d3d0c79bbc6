"""What rank 0 sends the other tensor-parallel ranks each step: token ids
only for penalized requests (else their counts), cross-attention pixels
only where this step writes the image's K/V; everything else as it is.
(Every family's parity over real ranks, penalties included, is
tests/entrypoints/test_tensor_parallel_engine.py's.)"""

import pickle
import random

import pytest
import torch

from pyvlm.entrypoints.lean_batches import IdsCount, lean_batch
from pyvlm.scheduling.types import (CrossImage, ForwardBatch, MultimodalItem, SamplingParams,
                                    SequenceChunk)

PLAIN = SamplingParams(temperature=0)
PENALIZED = [SamplingParams(repetition_penalty=1.2), SamplingParams(presence_penalty=0.5),
             SamplingParams(frequency_penalty=-0.3)]


def chunk(sampling=PLAIN, prompt_len=None, new_tokens=1, cross_images=()):
    prompt_len = prompt_len or random.randint(50, 3000)
    prompt = [random.randrange(1 << 17) for _ in range(prompt_len)]
    output = [random.randrange(1 << 17) for _ in range(random.randint(0, 80))]
    start = prompt_len + len(output) if new_tokens == 1 else 0
    return SequenceChunk(rid=f"r{random.randrange(1 << 30)}", token_ids=[7] * new_tokens,
                         start_pos=start, positions=[list(range(start, start + new_tokens))],
                         page_table=list(range(start // 16 + 1)), mm_items=[], sample=True,
                         sampling=sampling, seed=random.randrange(1 << 30), step=len(output),
                         prompt_ids=prompt, output_ids=output, cross_images=cross_images)


def cross_image(needs_write: bool) -> CrossImage:
    item = MultimodalItem(hash=random.randrange(1 << 60), offset=1, length=1,
                          prepared=torch.rand(2, 3, 8, 8), cross_span=(1, None))
    return CrossImage(item, pages=(3, 4), needs_write=needs_write)


def test_only_penalized_requests_send_their_ids():
    chunks = [chunk() for _ in range(random.randint(2, 6))] + [chunk(s) for s in PENALIZED]
    random.shuffle(chunks)
    sent = pickle.loads(pickle.dumps(lean_batch(ForwardBatch(True, chunks))))
    assert sent.is_decode and len(sent.chunks) == len(chunks)
    for original, got in zip(chunks, sent.chunks):
        assert (got.rid, got.token_ids, got.start_pos, got.positions, got.page_table,
                got.sampling, got.seed, got.step) == (
            original.rid, original.token_ids, original.start_pos, original.positions,
            original.page_table, original.sampling, original.seed, original.step)
        assert len(got.prompt_ids) == len(original.prompt_ids)
        assert len(got.output_ids) == len(original.output_ids)
        if original.sampling in PENALIZED:
            assert list(got.prompt_ids) == original.prompt_ids
            assert list(got.output_ids) == original.output_ids
        else:
            assert isinstance(got.prompt_ids, IdsCount)
            with pytest.raises(LookupError, match="not sent"):
                got.prompt_ids[0]
            with pytest.raises(LookupError, match="not sent"):
                list(got.output_ids)


def test_a_decode_batch_of_long_prompts_pickles_small():
    chunks = [chunk(prompt_len=3000) for _ in range(64)]
    full = len(pickle.dumps(ForwardBatch(True, chunks)))
    lean = len(pickle.dumps(lean_batch(ForwardBatch(True, chunks))))
    assert lean * 10 < full


def test_generated_tokens_leave_the_pixels_of_images_already_written():
    images = (cross_image(needs_write=False), cross_image(needs_write=True))
    decode = chunk(cross_images=images)
    prefill = chunk(new_tokens=5, cross_images=images)
    sent = lean_batch(ForwardBatch(False, [decode, prefill]))
    written, kept = sent.chunks[0].cross_images
    assert written.item.prepared is None and written.pages == images[0].pages
    assert written.item.hash == images[0].item.hash and not written.needs_write
    assert kept.item.prepared is images[1].item.prepared  # its K/V is written this step
    assert sent.chunks[1].cross_images == images  # a prefill chunk may encode any of them
