"""Vision-tower work a step ahead of the prefill that needs it.

A request's images go through the tower in the step that admits it, a
mixed step whose prefill already keeps the tensor cores busy (a 7B model
on an H100: 19.7 ms for one image prompt and 64 decodes, against 6.9 ms
for the decodes alone; the tower is ~6 ms of it). Decode steps, bound by
weight reads, leave the tensor cores idle. So each step may carry the
images of a request still waiting (ForwardBatch.encode_ahead): the runner
encodes them into its encoder cache, on the tower's side stream when it
has one (beside the step), and the step that admits the request finds
them there and runs its prefill alone. The tower's work is charged to the
step that encodes ahead, in what its budget leaves after its own chunks
(encoder_budget's measure: an image's placeholder tokens), and no longer
to the request's chunks: every step's work stays within the budget, as
without encoding ahead. (Images that enter through cross-attention are
not charged ahead: their admission pays for their K/V rows.)

Beside the steps (a runner whose tower runs on a side stream that its
steps outrank: the scheduler's images_ready hook) the tower is not a
step's work at all: it is not charged, and while other requests run a
request with images to encode waits until they are encoded ahead and
done (a look at the runner's events each step), then is admitted. With
nothing else running the request is admitted at once and its own step
encodes it. The aim was a tower longer than a step (a 4-tile image, ~50
ms on an H100 against ~13 ms decode steps) that no longer holds every
stream for its length; measured, the steps beside a tower slow down
instead (a 7B model's decode step 29-31 ms against 6.9 alone: a priority
stream orders blocks waiting to start, but the tower's running blocks keep
their SMs; benchmarks/RESULTS.md), so neither form is on by default.

One request's images a step, for at most MAX_REQUESTS_AHEAD waiting
requests at a time: enough to keep ahead of admissions (one a step at the
mixed-step cap), little tower work wasted when a waiting request is aborted,
and a bounded share of the encoder cache. Images its cached prefix covers
are not encoded (the prefix cache holds what they would give).
"""

from typing import Callable, Iterable, List

from pyvlm.scheduling.encoder_budget import tower_work
from pyvlm.scheduling.request import Request
from pyvlm.scheduling.types import MultimodalItem

MAX_REQUESTS_AHEAD = 2


def pick_encode_ahead(waiting: Iterable[Request],
                      images_to_encode: Callable[[Request], List[MultimodalItem]],
                      num_tokens_left: int) -> List[MultimodalItem]:
    """The images to encode this step: those of the first request with images
    among the first MAX_REQUESTS_AHEAD of the waiting queue (in admission
    order) that was not encoded ahead yet, when their charge fits in
    num_tokens_left (the step's budget after its chunks); the request is
    then marked. images_to_encode(request): its images a prefill would
    still encode."""
    num_ahead = 0
    for request in waiting:
        if not request.mm_items:
            continue
        if num_ahead == MAX_REQUESTS_AHEAD:
            break
        num_ahead += 1
        if not request.encoded_ahead:
            images = images_to_encode(request)
            if tower_work(images) > num_tokens_left:
                return []
            request.encoded_ahead = True
            return images
    return []


def charged_images(request: Request) -> List[MultimodalItem]:
    """The images whose tower work a chunk of request is charged
    (encoder_budget): none once they were encoded ahead."""
    return [] if request.encoded_ahead else request.mm_items
