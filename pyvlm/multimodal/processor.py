"""The contract of a model family's torch-free image processor.

A family's processor (pyvlm/multimodal/<family>.py) turns image sizes into
plans before any pixel is touched: how many placeholder tokens each image
takes, which processing variant it gets (part of the image's cache key),
how large its buffers and tower inputs are, and, for families whose
positions are more than 1-D, every prompt token's positions. The request
builder only talks to this contract; the model file turns plans into
pixels (prepare_images) and pixels into token rows (encode_prepared).
"""

from typing import Any, Mapping, Optional, Protocol, Sequence, Tuple

from pyvlm.scheduling.positions import MropePositions

Size = Tuple[int, int]  # (height, width)


class ImagePlan(Protocol):
    """What the engine reads of one image's plan."""

    image_size: Size
    num_tokens: int  # placeholder tokens the image expands into

    @property
    def variant(self) -> str:
        """Names the processing (path, resize): combined with the pixel
        hash it keys the radix and encoder caches."""
        ...

    @property
    def num_pixel_values(self) -> int:
        """Values of the tower input the image becomes."""
        ...

    @property
    def num_buffer_pixels(self) -> int:
        """Pixels of the largest intermediate image preprocessing holds."""
        ...

    def buffer_description(self) -> str:
        """That buffer in words, for the refusal naming it."""
        ...


class ImageProcessor(Protocol):
    """A family's planner, built from the checkpoint's configs (plain data)."""

    def placeholder_text(self, image_token: str) -> str:
        """What a prompt writes for one image, given the image token's text."""
        ...

    def with_overrides(self, mm_processor_kwargs: Optional[Mapping[str, Any]]) -> "ImageProcessor":
        """This processor with a request's (or the launch's) processor
        keyword arguments applied; ValueError names an unknown or bad one."""
        ...

    def plan_prompt(self, image_sizes: Sequence[Size],
                    max_buffer_pixels: Optional[int] = None) -> list:
        """The plans of one prompt's images, in order; ImageBudgetError
        for an image whose buffers would exceed max_buffer_pixels."""
        ...

    def prompt_positions(self, prompt_ids: Sequence[int], spans: Sequence[Tuple[int, int]],
                         plans: Sequence[Any]) -> Optional[MropePositions]:
        """The expanded prompt's positions (None: token i at position i).
        spans[i] = (offset, length) of image i's placeholder run."""
        ...


class ImageProcessorBase:
    """The contract's parts most families share: each image planned alone
    (the family's plan(image_size)), the image token as the placeholder,
    no per-request settings (FAMILY names the family in the refusal), and
    1-D positions. A family overrides what it does differently."""

    FAMILY = "this model's"

    def plan_prompt(self, image_sizes: Sequence[Size],
                    max_buffer_pixels: Optional[int] = None) -> list:
        """Plans of all the images of one prompt, in order; with
        max_buffer_pixels, ImageBudgetError for an image whose preprocessing
        would hold a larger buffer."""
        plans = [self.plan(size) for size in image_sizes]
        if max_buffer_pixels is not None:
            check_buffers(plans, max_buffer_pixels)
        return plans

    def placeholder_text(self, image_token: str) -> str:
        """A prompt writes one image token per image (expanded later)."""
        return image_token

    def with_overrides(self, mm_processor_kwargs: Optional[Mapping[str, Any]]):
        """No per-request settings: ValueError for any."""
        refuse_overrides(self.FAMILY, mm_processor_kwargs)
        return self

    def prompt_positions(self, prompt_ids, spans, plans) -> None:
        """1-D positions: token i at position i."""
        return None


class ResizedCopyBuffer:
    """For plans whose largest buffer is one resized copy of the image
    (a `resized_size` (height, width) field)."""

    resized_size: Size

    @property
    def num_buffer_pixels(self) -> int:
        height, width = self.resized_size
        return height * width

    def buffer_description(self) -> str:
        height, width = self.resized_size
        return f"a {width}x{height} resized copy"


class ImageBudgetError(ValueError):
    """An image whose preprocessing would need more memory than allowed; the
    message names the image, what it would need and the limit."""


def check_buffers(plans: Sequence[ImagePlan], max_buffer_pixels: int) -> None:
    """Refuses plans whose buffers exceed max_buffer_pixels (before any is made)."""
    for index, plan in enumerate(plans, start=1):
        if plan.num_buffer_pixels > max_buffer_pixels:
            height, width = plan.image_size
            raise ImageBudgetError(
                f"image {index} of the prompt ({width}x{height} pixels) would need "
                f"{plan.buffer_description()} of {plan.num_buffer_pixels:,} pixels to "
                f"preprocess, more than the limit of {max_buffer_pixels:,} pixels "
                f"(--max-image-pixels)")


def refuse_overrides(family: str, mm_processor_kwargs: Optional[Mapping[str, Any]],
                     known: Sequence[str] = ()) -> None:
    """ValueError naming processor keyword arguments a family does not take."""
    unknown = sorted(set(mm_processor_kwargs or {}) - set(known))
    if unknown:
        takes = f"it takes {', '.join(known)}" if known else "it takes none"
        raise ValueError(f"mm_processor_kwargs {unknown} are not supported by the {family} "
                         f"image processor ({takes})")


def expand_image_tokens(prompt_ids: Sequence[int], image_token_id: int, images: Sequence,
                        counts: Sequence[int]) -> Tuple[list, list]:
    """Each image_token_id in prompt_ids becomes counts[i] copies (i-th image).

    Returns (expanded ids, spans) where spans[i] = (offset, length) of image
    i's placeholder run in the expanded ids. The number of placeholders must
    equal len(images) == len(counts).
    """
    num_placeholders = sum(1 for token in prompt_ids if token == image_token_id)
    if not num_placeholders == len(images) == len(counts):
        raise ValueError(f"prompt has {num_placeholders} image placeholders but "
                         f"{len(images)} images and {len(counts)} counts were given")
    expanded, spans = [], []
    for token in prompt_ids:
        if token != image_token_id:
            expanded.append(token)
            continue
        count = counts[len(spans)]
        spans.append((len(expanded), count))
        expanded.extend([image_token_id] * count)
    return expanded, spans
