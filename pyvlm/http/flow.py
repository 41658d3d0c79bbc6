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

    def pause(self) -> None:
        self._can_write.clear()

    def resume(self) -> None:
        self._can_write.set()

    def close(self) -> None:
        """The connection is gone: wake every waiter."""
        self.is_closed = True
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
