"""A byte budget for the preprocessed images of requests not yet finished.

Each request with images holds its tower inputs (pixel tiles) from the
moment it is built until it ends, queued or running. Without a bound, a
burst of image requests would hold them all in host memory at once; with
it, a request that does not fit waits (the offline Engine's batches) or is
refused (EngineBusyError: the server's 429 with Retry-After). A request is
always let in when nothing else holds the budget, so one larger than the
whole budget still runs (alone).
"""

import threading

from pyvlm.scheduling.errors import EngineBusyError


class ImageBudget:
    """Thread-safe counter of held bytes against max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.num_held_bytes = 0
        self._changed = threading.Condition()

    def take(self, num_bytes: int, wait: bool) -> None:
        """Holds num_bytes; when they do not fit, waits (wait=True) or
        raises EngineBusyError."""
        with self._changed:
            while not self._fits(num_bytes):
                if not wait:
                    raise EngineBusyError(
                        f"the engine holds {self.num_held_bytes:,} bytes of images of requests "
                        f"not yet finished (limit {self.max_bytes:,}, --max-pending-image-bytes)"
                        f"; retry later")
                self._changed.wait()
            self.num_held_bytes += num_bytes

    def give_back(self, num_bytes: int) -> None:
        with self._changed:
            self.num_held_bytes -= num_bytes
            self._changed.notify_all()

    def _fits(self, num_bytes: int) -> bool:
        return self.num_held_bytes == 0 or self.num_held_bytes + num_bytes <= self.max_bytes
