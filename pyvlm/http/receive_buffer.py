"""A receive buffer that remembers how far it has searched, so input that
trickles in byte by byte is scanned once in total, not once per byte
(the same trick as h11's ReceiveBuffer)."""

import re
from typing import Optional

BLANK_LINE = re.compile(rb"\n\r?\n")  # the end of a header section
LINE_END = re.compile(rb"\n")


class ReceiveBuffer:
    """Bytes received and not yet parsed."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._searched = 0  # offset before which no match can start

    def __len__(self) -> int:
        return len(self._data)

    def startswith(self, prefix: bytes) -> bool:
        return self._data.startswith(prefix)

    def append(self, data: bytes) -> None:
        self._data += data

    def extract(self, max_bytes: int) -> bytes:
        """Remove and return up to `max_bytes` from the front."""
        out = bytes(self._data[:max_bytes])
        del self._data[:max_bytes]  # O(1) amortised: bytearray trims its front lazily
        self._searched = 0
        return out

    def find_end(self, pattern: "re.Pattern[bytes]", max_match_bytes: int) -> Optional[int]:
        """Offset just past the first match of `pattern`, or None. The next
        search resumes `max_match_bytes - 1` bytes before the end."""
        match = pattern.search(self._data, self._searched)
        if match is None:
            self._searched = max(0, len(self._data) - (max_match_bytes - 1))
            return None
        return match.end()

    def clear(self) -> None:
        self._data.clear()
        self._searched = 0
