"""The caller -> engine process direction of their connection: messages
whose CPU tensors' shared memory travels as file descriptors passed beside
their bytes (SCM_RIGHTS, on the connection's Unix socket).

torch's reductions (multiprocessing's ForkingPickler) hand each storage's
descriptor to multiprocessing's resource sharer: the receiver connects
back to a thread of the sender's process, and the two run an HMAC
handshake, per storage. That thread needs the sender's GIL, which the
server's event loop and request builders keep busy: with 64 streams
running, the engine process took 22 ms (1.8 ms of it CPU) to receive one
request with an image (2-core VM, bench_host_overhead), and it receives
them one at a time, so that bounded the request rate. Here a request's
descriptors go with it in one sendmsg: nothing waits for the sender.

A message is one Connection frame (a 4-byte little-endian count of its
descriptors, then its pickle), then its descriptors, at most
MAX_FDS_PER_SEND to a sendmsg, each batch with one byte. The storages
are rebuilt as torch rebuilds them (rebuild_storage_fd: same cache, the
descriptor closed once mapped). The connection must be a duplex
multiprocessing Pipe (a socketpair); the caller serializes its sends.
"""

import io
import os
import pickle
import socket
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import List

import torch
import torch.multiprocessing  # noqa: F401  (registers torch's reductions on ForkingPickler)
from torch.multiprocessing import get_sharing_strategy
from torch.multiprocessing.reductions import rebuild_storage_fd

NUM_HEADER_BYTES = 4
MAX_FDS_PER_SEND = 250  # the kernel takes at most SCM_MAX_FD (253) per message


@dataclass(frozen=True)
class Packet:
    """A message ready to send: its frame and the descriptors that follow it."""

    frame: bytes
    fds: List[int]


def pack(message) -> Packet:
    """The message's frame (tensors as ForkingPickler reduces them, but each
    storage's shared memory as a descriptor to pass, not a resource-sharer
    handle)."""
    buffer = io.BytesIO()
    buffer.write(bytes(NUM_HEADER_BYTES))
    pickler = _FdPassingPickler(buffer)
    pickler.dump(message)
    buffer.seek(0)
    buffer.write(len(pickler.fds).to_bytes(NUM_HEADER_BYTES, "little"))
    return Packet(buffer.getvalue(), pickler.fds)


def send(conn, packet: Packet) -> None:
    """Sends a packed message (OSError when the peer is gone)."""
    conn.send_bytes(packet.frame)
    if packet.fds:
        with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            for start in range(0, len(packet.fds), MAX_FDS_PER_SEND):
                socket.send_fds(sock, [b"\0"], packet.fds[start:start + MAX_FDS_PER_SEND])


def receive(conn):
    """The next message (EOFError or OSError once the peer is gone)."""
    frame = conn.recv_bytes()
    num_fds = int.from_bytes(frame[:NUM_HEADER_BYTES], "little")
    passed = _PassedFds(_receive_fds(conn, num_fds))
    file = io.BytesIO(frame)
    file.seek(NUM_HEADER_BYTES)
    try:
        return _FdReceivingUnpickler(file, passed).load()
    finally:
        passed.close_unused()


def _receive_fds(conn, num_fds: int) -> List[int]:
    fds: List[int] = []
    if not num_fds:
        return fds
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        while len(fds) < num_fds:
            data, batch, _, _ = socket.recv_fds(sock, 1, num_fds - len(fds))
            if not data:
                _close_all(fds + list(batch))
                raise EOFError("the connection closed while descriptors were due")
            fds.extend(batch)
    return fds


def passed_storage(cls, index: int, size: int):
    """Stands in, in a packed message, for a storage whose descriptor is
    passed beside it: only receive() can rebuild it (it holds the message's
    descriptors)."""
    raise pickle.UnpicklingError("a storage passed as a file descriptor is only rebuilt "
                                 "by pyvlm.entrypoints.core_channel.receive")


class _FdPassingPickler(ForkingPickler):
    """ForkingPickler (torch's reductions for tensors) but CPU storages
    shared by file descriptor: their descriptors are collected in fds."""

    def __init__(self, file):
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.fds: List[int] = []

    def reducer_override(self, obj):
        # Called for objects pickle has no fast path for; before the
        # dispatch table, where torch's reduce_storage would take them.
        if (not isinstance(obj, torch.UntypedStorage) or obj.device.type != "cpu"
                or obj.nbytes() == 0 or get_sharing_strategy() != "file_descriptor"):
            return NotImplemented  # torch's own reduction (empty, file_system, ...)
        fd, size = obj._share_fd_cpu_()  # the storage's descriptor: sendmsg takes a reference
        self.fds.append(fd)
        return passed_storage, (type(obj), len(self.fds) - 1, size)


class _FdReceivingUnpickler(pickle.Unpickler):
    """Rebuilds passed storages from the message's descriptors."""

    def __init__(self, file, passed: "_PassedFds"):
        super().__init__(file)
        self._passed = passed

    def find_class(self, module: str, name: str):
        if module == __name__ and name == passed_storage.__name__:
            # Not a method of this unpickler: its memo keeps what this
            # returns, and a cycle through the memo would keep every
            # rebuilt tensor (and its descriptor) until a full collection.
            return self._passed.rebuild_storage
        return super().find_class(module, name)


class _PassedFds:
    """The descriptors passed with one message, each used at most once
    (rebuild_storage_fd closes the one it is given)."""

    def __init__(self, fds: List[int]):
        self._fds = fds
        self._unused = set(range(len(fds)))

    def rebuild_storage(self, cls, index: int, size: int):
        self._unused.remove(index)  # KeyError: a descriptor named twice (a corrupt message)
        return rebuild_storage_fd(cls, _OwnedFd(self._fds[index]), size)

    def close_unused(self) -> None:
        """Closes what a failed (or odd) message left unused."""
        _close_all(self._fds[index] for index in self._unused)
        self._unused.clear()


class _OwnedFd:
    """What rebuild_storage_fd reads a descriptor from (torch passes a
    multiprocessing DupFd): it takes ownership with detach()."""

    def __init__(self, fd: int):
        self._fd = fd

    def detach(self) -> int:
        return self._fd


def _close_all(fds) -> None:
    for fd in fds:
        os.close(fd)
