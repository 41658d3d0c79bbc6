"""Write-side flow control: the transport calls pause_writing when its
buffer passes the high-water mark and resume_writing when it drains; writers
await `drain()` between chunks, so a slow reader stalls its producer instead
of growing the buffer (the same shape as uvicorn's FlowControl)."""

import asyncio


class ConnectionGone(Exception):
    """The peer went away while a response was being written."""


class WriteFlow:
    def __init__(self) -> None:
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.is_closed = False
        # Neither paused nor closed: drain() would return at once (writers
        # check this first; a coroutine per chunk costs more than the check).
        self.is_writable = True

    def pause(self) -> None:
        self._can_write.clear()
        self.is_writable = False

    def resume(self) -> None:
        self._can_write.set()
        self.is_writable = not self.is_closed

    def close(self) -> None:
        """The connection is gone: wake every waiter."""
        self.is_closed = True
        self.is_writable = False
        self._can_write.set()

    @property
    def is_paused(self) -> bool:
        return not self._can_write.is_set()

    async def drain(self) -> None:
        """Wait until the transport accepts more data; raise ConnectionGone
        if it closed."""
        if not self._can_write.is_set():
            await self._can_write.wait()
        if self.is_closed:
            raise ConnectionGone()
