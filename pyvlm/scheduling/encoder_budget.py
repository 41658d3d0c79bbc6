"""What a prefill chunk costs when it reaches an image (vLLM's encoder
budget, in the prefill budget's tokens).

The step that reaches an image's first placeholder token runs the vision
tower on the whole image, however few of its tokens the chunk holds: a
chunk of 50 tokens that starts a 391-token image costs the tower work of
all 391. Counting only the chunk's tokens let a mixed step of 512 prompt
tokens start two or three images (the tail of one prompt, the starts of
the next), a step of three to four decode steps' time: the streams'
inter-token p99. So the tokens of an image past the chunk's end are
charged too, and a chunk that cannot pay for an image it would start ends
before that image instead (its text still runs; the image waits for the
next step). A step's first chunk always runs, charged alike, so every
prompt progresses. Images that enter through cross-attention are charged
by their K/V rows instead (the scheduler's admission).
"""

from typing import Iterable, List, Sequence, Tuple

from pyvlm.scheduling.types import MultimodalItem


def images_started(items: Iterable[MultimodalItem], start: int, end: int) -> List[MultimodalItem]:
    """Embedded images (no cross-attention rows) whose first placeholder
    token is in [start, end), by position."""
    return sorted((item for item in items
                   if not item.num_cross_rows and start <= item.offset < end),
                  key=lambda item: item.offset)


def tokens_past_chunk(items: Iterable[MultimodalItem], start: int, end: int) -> int:
    """Placeholder tokens past `end` of the images the chunk [start, end) starts."""
    return sum(max(0, item.offset + item.length - end)
               for item in images_started(items, start, end))


def fit_chunk(items: Sequence[MultimodalItem], start: int, num_tokens: int, budget_left: int,
              can_cut: bool) -> Tuple[int, int]:
    """(tokens, extra): the chunk of up to num_tokens from position start
    that pays for the images it starts within budget_left (its tokens plus
    extra, the started images' tokens past its end), cut before the first
    image it cannot pay for; (0, 0) when not even the text before it fits.
    can_cut False (a chunk that must run as it is: the step's first, or
    chunking off): the whole chunk and its extra, whatever the budget."""
    end = start + num_tokens
    extra = tokens_past_chunk(items, start, end)
    if not can_cut or num_tokens + extra <= budget_left:
        return num_tokens, extra
    for image in reversed(images_started(items, start, end)):
        end = image.offset  # the chunk stops before this image
        extra = tokens_past_chunk(items, start, end)
        if end - start + extra <= budget_left:
            return end - start, extra
    return 0, 0
