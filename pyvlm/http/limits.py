"""The HTTP server's limits and timeouts: plain frozen data."""

from dataclasses import dataclass

from pyvlm.http.events import ParserLimits


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 64 * 1024  # request line + headers -> 431
    max_header_count: int = 256  # -> 431
    max_body_bytes: int = 64 * 1024 * 1024  # -> 413, checked on Content-Length before reading
    header_timeout_s: float = 30.0  # deadline for a request head once its first byte arrived -> 408
    body_timeout_s: float = 60.0  # longest silence while a body is arriving -> 408
    keep_alive_timeout_s: float = 15.0  # an idle connection is closed after this
    max_pipelined_requests: int = 16  # reading pauses while this many wait for their turn
    write_buffer_high_bytes: int = 256 * 1024  # pause_writing above, resume below low
    write_buffer_low_bytes: int = 64 * 1024
    linger_s: float = 2.0  # after a refusal, unread input is drained this long before closing
    shutdown_grace_s: float = 10.0  # in-flight handlers may finish within this on shutdown

    def parser_limits(self) -> ParserLimits:
        return ParserLimits(
            max_header_bytes=self.max_header_bytes,
            max_header_count=self.max_header_count,
            max_body_bytes=self.max_body_bytes,
        )
