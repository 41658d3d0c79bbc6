"""A streaming body's chunks, written once per event-loop iteration.

A stream whose producer ran ahead (several deltas waiting when its task
wakes) yields several chunks without suspending; written one by one, each
is a send() system call, the largest cost of a streamed token on the
server. Here the chunks of one iteration go out in one write, at the
start of the next iteration (or at once on flush()): the bytes and their
order are unchanged, a client just reads several events at a time.
"""

import asyncio
from typing import List


class CoalescedWrites:
    """write() buffers; the buffer goes to the transport in one write from
    a callback scheduled on the first write of an iteration, or on flush()."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop = transport, loop
        self._pending: List[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        """Writes what is buffered now (nothing once the transport closes)."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)
