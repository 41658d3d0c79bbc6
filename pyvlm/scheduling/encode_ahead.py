"""Vision-tower work a step ahead of the prefill that needs it.

A request's images go through the tower in the step that admits it, a
mixed step whose prefill already keeps the tensor cores busy (Qwen2-VL-7B
on an H100: 19.7 ms for one image prompt and 64 decodes, against 6.9 ms
for the decodes alone; the tower is ~6 ms of it). Decode steps, bound by
weight reads, leave the tensor cores idle. So each step may carry the
images of a request still waiting (ForwardBatch.encode_ahead): the runner
encodes them into its encoder cache, on the tower's side stream when it
has one (beside the step), and the step that admits the request finds
them there and runs its prefill alone. Such a request is not charged the
tower's work in its mixed step's budget (encoder_budget) any more.

One request's images a step, for at most MAX_REQUESTS_AHEAD waiting
requests at a time: enough to keep ahead of admissions (one a step at the
mixed-step cap), little tower work wasted when a waiting request is aborted,
and a bounded share of the encoder cache. Images its cached prefix covers
are not encoded (the prefix cache holds what they would give).
"""

from typing import Callable, Iterable, List

from pyvlm.scheduling.request import Request
from pyvlm.scheduling.types import MultimodalItem

MAX_REQUESTS_AHEAD = 2


def pick_encode_ahead(waiting: Iterable[Request],
                      images_to_encode: Callable[[Request], List[MultimodalItem]]
                      ) -> List[MultimodalItem]:
    """The images to encode this step: those of the first request with images
    among the first MAX_REQUESTS_AHEAD of the waiting queue (in admission
    order) that was not encoded ahead yet; the request is marked.
    images_to_encode(request): its images a prefill would still encode."""
    num_ahead = 0
    for request in waiting:
        if not request.mm_items:
            continue
        if num_ahead == MAX_REQUESTS_AHEAD:
            break
        num_ahead += 1
        if not request.encoded_ahead:
            request.encoded_ahead = True
            return images_to_encode(request)
    return []


def charged_images(request: Request) -> List[MultimodalItem]:
    """The images whose tower work a chunk of request is charged
    (encoder_budget): none once they were encoded ahead."""
    return [] if request.encoded_ahead else request.mm_items
