"""The caller -> engine channel: a message's CPU tensors arrive as views of
the sender's shared memory (their descriptors passed beside the frame, in
batches the kernel accepts), every other value as pickled, and no
descriptor is left open, even when a message fails to unpickle."""

import multiprocessing
import os

import pytest
import torch

from pyvlm.entrypoints import core_channel
from pyvlm.entrypoints.core_messages import Abort


@pytest.fixture
def pipe():
    sender, receiver = multiprocessing.get_context("spawn").Pipe()
    yield sender, receiver
    sender.close()
    receiver.close()


def num_open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def round_trip(pipe, message):
    sender, receiver = pipe
    core_channel.send(sender, core_channel.pack(message))
    return core_channel.receive(receiver)


def test_tensors_arrive_as_views_of_the_senders_shared_memory(pipe):
    pixels = torch.arange(24, dtype=torch.uint8).view(2, 4, 3).share_memory_()
    private = torch.tensor([1.5, -2.0])  # shared when packed, as torch's reductions do
    message = {"pixels": pixels, "row": pixels[1], "private": private,
               "empty": torch.empty(0), "text": "é", "ids": [1, 2, 3]}
    received = round_trip(pipe, message)
    assert received["text"] == "é" and received["ids"] == [1, 2, 3]
    assert received["empty"].numel() == 0
    for name in ("pixels", "row", "private"):
        assert torch.equal(received[name], message[name]) and received[name].is_shared()
    pixels[0, 0, 0] = 99  # one memory on both sides, not a copy
    assert received["pixels"][0, 0, 0] == 99
    assert received["row"].data_ptr() == received["pixels"][1].data_ptr()  # one storage


def test_more_descriptors_than_one_sendmsg_takes(pipe):
    tensors = [torch.full((3,), i, dtype=torch.int32).share_memory_() for i in range(600)]
    packet = core_channel.pack(tensors)
    assert len(packet.fds) == 600 > core_channel.MAX_FDS_PER_SEND
    sender, receiver = pipe
    core_channel.send(sender, packet)
    received = core_channel.receive(receiver)
    assert all(torch.equal(a, b) for a, b in zip(received, tensors)) and len(received) == 600


def test_messages_without_tensors_pass_no_descriptor(pipe):
    packet = core_channel.pack(Abort("r-1"))
    assert packet.fds == []
    assert round_trip(pipe, Abort("r-1")) == Abort("r-1")


def test_no_descriptor_stays_open(pipe):
    tensors = [torch.ones(1000).share_memory_() for _ in range(3)]
    before = num_open_fds()
    received = round_trip(pipe, tensors)
    assert sum(t.sum().item() for t in received) == 3000
    del received
    assert num_open_fds() == before


def _refuse():
    raise ValueError("cannot rebuild this")


class Unloadable:
    def __reduce__(self):
        return _refuse, ()


def test_a_message_that_fails_to_unpickle_closes_its_descriptors(pipe):
    tensor = torch.ones(10).share_memory_()
    before = num_open_fds()
    with pytest.raises(ValueError, match="cannot rebuild"):
        round_trip(pipe, [Unloadable(), tensor])  # fails before the storage is rebuilt
    assert num_open_fds() == before


def test_a_packed_storage_is_only_rebuilt_by_receive():
    import pickle

    frame = core_channel.pack([torch.ones(2).share_memory_()]).frame
    with pytest.raises(pickle.UnpicklingError, match="only rebuilt"):
        pickle.loads(frame[core_channel.NUM_HEADER_BYTES:])


def test_queued_messages_keep_their_own_descriptors(pipe):
    sender, receiver = pipe
    first, second = torch.zeros(4).share_memory_(), torch.ones(8).share_memory_()
    for message in ([first], Abort("between"), [second, second]):
        core_channel.send(sender, core_channel.pack(message))
    assert torch.equal(core_channel.receive(receiver)[0], first)
    assert core_channel.receive(receiver) == Abort("between")
    both = core_channel.receive(receiver)
    assert torch.equal(both[0], second) and both[0].data_ptr() == both[1].data_ptr()
