"""What of a step rank 0 sends the other tensor-parallel ranks: the batch
less what no rank reads, pickled every step.

A chunk carries its request's prompt and output ids for the penalties
(the runner reads their values only for a request with a repetition,
presence or frequency penalty; otherwise only their counts, e.g. where a
cross-attention family's prompt ends). 256 requests of 3k-token prompts make 3.4 MB and
20 ms of pickling a step (50 ms to unpickle) where the rest of the batch
takes 1 ms: unpenalized chunks send only the counts (IdsCount). Likewise
a generated token of a cross-attention request reads its images' K/V
from the pool, never their pixels, unless the image is written this step:
those pixels stay behind.
"""

import dataclasses
from typing import Iterator, Sequence

from pyvlm.runner.penalty_state import needs_penalties
from pyvlm.scheduling.types import CrossImage, ForwardBatch, SequenceChunk


class IdsCount(Sequence[int]):
    """Stands in for a list of token ids whose values were not sent: its
    length is theirs; reading a value raises (a rank that needed them
    would otherwise compute with wrong ones)."""

    __slots__ = ("count",)

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        raise LookupError("these token ids were not sent to this tensor-parallel rank "
                          "(lean_batches: only penalized requests send them)")

    def __iter__(self) -> Iterator[int]:
        return self.__getitem__(0)

    def __reduce__(self):
        return IdsCount, (self.count,)

    def __repr__(self) -> str:
        return f"IdsCount({self.count})"


def lean_batch(batch: ForwardBatch) -> ForwardBatch:
    """batch as the other ranks need it (module docstring)."""
    return dataclasses.replace(batch, chunks=[lean_chunk(chunk) for chunk in batch.chunks])


def lean_chunk(chunk: SequenceChunk) -> SequenceChunk:
    changes = {}
    if not needs_penalties(chunk):
        changes["prompt_ids"] = IdsCount(len(chunk.prompt_ids))
        changes["output_ids"] = IdsCount(len(chunk.output_ids))
    if chunk.cross_images and chunk.is_generated_token:
        changes["cross_images"] = tuple(without_pixels(image) for image in chunk.cross_images)
    return dataclasses.replace(chunk, **changes) if changes else chunk


def without_pixels(image: CrossImage) -> CrossImage:
    """image without its tower input, unless this step writes its K/V."""
    if image.needs_write or image.item.prepared is None:
        return image
    return dataclasses.replace(image, item=dataclasses.replace(image.item, prepared=None))
