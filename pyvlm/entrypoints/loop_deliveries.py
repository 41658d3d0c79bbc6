"""Outputs handed from the engine's thread (or the engine process's reader
thread) to an event loop, with one wake-up for many.

Each call_soon_threadsafe wakes the loop (a write to its self-pipe) and
schedules a callback; a step of 64 streams made 64 of each. Here the first
output of a burst schedules one drain, and every output that arrives before
the loop runs it rides along, in arrival order."""

import asyncio
import collections
import threading
import weakref
from typing import Any, Callable

_by_loop: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_by_loop_lock = threading.Lock()


class LoopDeliveries:
    """Calls deliver(item) on the loop's thread for every put(deliver, item)
    from any thread, in the order put; one wake-up per drain."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._items: collections.deque = collections.deque()
        self._wake_pending = False

    def put(self, deliver: Callable[[Any], None], item: Any) -> None:
        """Any thread; RuntimeError if the loop is closed (nothing will run it)."""
        if self._loop.is_closed():
            raise RuntimeError("the caller's event loop is closed")
        self._items.append((deliver, item))
        if self._wake_pending:  # the drain not run yet takes this item too
            return
        self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # closed meanwhile
            self._wake_pending = False
            raise

    def _drain(self) -> None:
        # Cleared before popping: an item put after this line either is
        # popped below or schedules a drain of its own.
        self._wake_pending = False
        items = self._items
        while items:
            deliver, item = items.popleft()
            deliver(item)


def deliveries_for(loop: asyncio.AbstractEventLoop) -> LoopDeliveries:
    """The loop's LoopDeliveries (one per loop, gone with the loop)."""
    with _by_loop_lock:
        deliveries = _by_loop.get(loop)
        if deliveries is None:
            deliveries = _by_loop[loop] = LoopDeliveries(loop)
        return deliveries
