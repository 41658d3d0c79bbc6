"""LoopDeliveries: every item reaches the loop, in order, with one wake-up
per burst, from any thread."""

import asyncio
import threading

import pytest

from pyvlm.entrypoints.loop_deliveries import LoopDeliveries, deliveries_for


def test_a_burst_is_one_wake_up_in_order():
    loop = asyncio.new_event_loop()
    try:
        wakes, got = [], []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda fn, *a: (wakes.append(fn), real(fn, *a))
        deliveries = LoopDeliveries(loop)
        for i in range(64):
            deliveries.put(got.append, i)
        loop.run_until_complete(asyncio.sleep(0))
        assert got == list(range(64)) and len(wakes) == 1
        deliveries.put(got.append, 64)  # after a drain: a new wake-up
        loop.run_until_complete(asyncio.sleep(0))
        assert got[-1] == 64 and len(wakes) == 2
    finally:
        loop.close()


def test_items_from_threads_all_arrive_in_each_threads_order():
    async def main():
        deliveries = deliveries_for(asyncio.get_running_loop())
        got, done = [], asyncio.Event()
        num_threads, num_items = 4, 2000

        def deliver(item):
            got.append(item)
            if len(got) == num_threads * num_items:
                done.set()

        def produce(t):
            for i in range(num_items):
                deliveries.put(deliver, (t, i))

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(num_threads)]
        for thread in threads:
            thread.start()
        await asyncio.wait_for(done.wait(), 30)
        for thread in threads:
            thread.join()
        for t in range(num_threads):
            assert [i for s, i in got if s == t] == list(range(num_items))

    asyncio.run(main())


def test_one_per_loop_and_a_closed_loop_refuses():
    loop = asyncio.new_event_loop()
    assert deliveries_for(loop) is deliveries_for(loop)
    other = asyncio.new_event_loop()
    assert deliveries_for(other) is not deliveries_for(loop)
    other.close()
    deliveries = deliveries_for(loop)
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        deliveries.put(print, 1)
