"""Which images each token of a Llama-3.2-Vision prompt attends to (no torch).

Images enter mllama through cross-attention, not as tokens: image i is
attended from its <|image|> token up to the next image token, and the last
image (with any run of consecutive image tokens just before it) up to the
end, as transformers' get_cross_attention_token_mask decides. Text before
the first image token attends to no image: its cross-attention rows are
zeroed (the model's full_text_row_masked_out_mask). Tokens generated after
the prompt attend to what the prompt's last token attends to (transformers
repeats the last mask row while generating), so spans that reach the end of
the prompt stay open.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence


@dataclass(frozen=True)
class ImageSpan:
    """Tokens start .. end - 1 attend to the image; end None: to the end of
    the sequence, generated tokens included."""

    start: int
    end: Optional[int]

    def covers(self, position: int) -> bool:
        return self.start <= position and (self.end is None or position < self.end)


def image_spans(prompt_ids: Sequence[int], image_token_id: int) -> List[ImageSpan]:
    """One span per image token of the prompt, in order."""
    return spans_from_offsets([i for i, token in enumerate(prompt_ids) if token == image_token_id])


def spans_from_offsets(starts: Sequence[int]) -> List[ImageSpan]:
    """One span per image token, given their positions in increasing order."""
    starts = list(starts)
    ends: List[Optional[int]] = starts[1:] + [None]
    # A run of consecutive image tokens attends together to what follows the run.
    for i in range(len(starts) - 2, -1, -1):
        if ends[i] == starts[i] + 1:
            ends[i] = ends[i + 1]
    return [ImageSpan(start, end) for start, end in zip(starts, ends)]


def images_attended(spans: Sequence[ImageSpan], position: int) -> List[int]:
    """Indices of the images the token at position attends to (empty: the
    token's cross-attention rows are masked out)."""
    return [index for index, span in enumerate(spans) if span.covers(position)]
