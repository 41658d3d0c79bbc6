"""The cycle collector's settings for a serving process (the server's,
the engine process): what start-up built is frozen, and collections of
the young generation are rarer.

Start-up leaves hundreds of thousands of objects (torch, transformers,
the model's modules) that live as long as the process; a full collection
walked them all, stalling the event loop or the step loop for ~0.1 s,
several times a minute (vLLM's engine core freezes them too). And every
young collection promotes whatever a step or a stream holds at that
moment (chunks, deltas) to the old generations, which soon triggers a
full collection of the running requests' data (radix-cache nodes, token
lists): ~15% of the engine process's time with 64 requests decoding
(2-core CPU, instant runner). Nearly all of those objects are freed by
reference counting: collecting the young generation every 50,000 net
allocations instead of 700 costs a few MB of uncollected cycles at most.
"""

import gc
from typing import Callable

GEN0_THRESHOLD = 50_000


def tune_for_serving() -> Callable[[], None]:
    """Collects, freezes what is alive, raises the young generation's
    threshold; returns what undoes the last two (for a caller that goes
    on after serving: tests, benchmarks)."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *thresholds[1:])

    def restore() -> None:
        gc.set_threshold(*thresholds)
        gc.unfreeze()

    return restore
