"""One HTTP/1.1 connection as an asyncio.Protocol over the sans-IO parser.

Requests are parsed as bytes arrive and queued; each is handled in its own
task, one at a time, so pipelined responses go out in order. Reading
pauses while too many requests wait. The task of the request in progress
is cancelled when the connection is lost, so the application's `finally`
blocks run at once (e.g. the engine request is aborted). Streaming bodies
await the transport's writability between chunks (WriteFlow).

Timers: a deadline for a request head once its first byte has arrived, a
limit on silence while a body arrives (both answered with 408), and an
idle keep-alive timeout that closes a connection with nothing in flight.
"""

import asyncio
import logging
from collections import deque
from typing import Deque, List, NamedTuple, Optional, Set
from urllib.parse import unquote

from pyvlm.http.coalesced_writes import CoalescedWrites
from pyvlm.http.errors import ProtocolError
from pyvlm.http.events import NEED_DATA, BodyData, ConnectionClosed, EndOfRequest, RequestHead
from pyvlm.http.flow import ConnectionGone, WriteFlow
from pyvlm.http.limits import HttpLimits
from pyvlm.http.parser import RequestParser, split_target
from pyvlm.http.response import CONTINUE, LAST_CHUNK, encode_chunk, encode_head, error_response
from pyvlm.http.types import Handler, Request, Response, StreamingResponse

logger = logging.getLogger(__name__)


class _Pending(NamedTuple):
    """A request waiting for its turn, or a refusal to answer before closing."""

    request: Optional[Request]
    keep_alive: bool
    refusal: Optional[ProtocolError] = None


class HttpProtocol(asyncio.Protocol):
    def __init__(self, handler: Handler, limits: HttpLimits, connections: Optional[Set["HttpProtocol"]] = None):
        self.handler = handler
        self.limits = limits
        self.connections = connections if connections is not None else set()
        self.parser = RequestParser(limits.parser_limits())
        self.flow = WriteFlow()
        self.transport: Optional[asyncio.Transport] = None
        self.client = None
        self._loop = asyncio.get_running_loop()
        self._pending: Deque[_Pending] = deque()
        self._cycle: Optional[asyncio.Task] = None
        self._head: Optional[RequestHead] = None
        self._body_parts: List[bytes] = []
        self._is_continue_owed = False
        self._is_reading_paused = False
        self._is_discarding_input = False  # after a refusal or while closing
        self._is_shutting_down = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_kind = ""

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client = _peer(transport)
        transport.set_write_buffer_limits(self.limits.write_buffer_high_bytes, self.limits.write_buffer_low_bytes)
        self.connections.add(self)
        self._update_timer()

    def data_received(self, data: bytes) -> None:
        if self._is_discarding_input:
            return
        self.parser.receive_data(data)
        self._process_events()
        self._update_timer(data_arrived=True)

    def eof_received(self) -> Optional[bool]:
        # A half-closed client cannot be told apart from one that is gone,
        # and a gone client's request must be aborted now: close (as uvicorn).
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.flow.close()
        self._cancel_timer()
        self._pending.clear()
        if self._cycle is not None:
            self._cycle.cancel()
        self.connections.discard(self)

    def pause_writing(self) -> None:
        self.flow.pause()

    def resume_writing(self) -> None:
        self.flow.resume()

    # -- shutdown ----------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Stop taking requests: close now if nothing is in flight, else
        after the current response (sent with Connection: close)."""
        self._is_shutting_down = True
        self._pending = deque(item for item in self._pending if item.refusal is not None)
        if self._cycle is None and self.parser.phase != "body":
            self._close()

    def abort(self) -> None:
        """Drop the connection now (cancels the handler in progress)."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def is_idle(self) -> bool:
        return self._cycle is None and not self._pending and self.parser.phase == "idle"

    # -- parsing -----------------------------------------------------------
    def _process_events(self) -> None:
        while not self._is_discarding_input:
            try:
                event = self.parser.next_event()
            except ProtocolError as error:
                self._refuse(error)
                return
            if event is NEED_DATA:
                break
            self._on_event(event)
        self._update_reading()

    def _on_event(self, event) -> None:
        if isinstance(event, RequestHead):
            self._begin_request(event)
        elif isinstance(event, BodyData):
            self._body_parts.append(event.data)
            self._is_continue_owed = False  # the client did not wait for it
        elif isinstance(event, EndOfRequest):
            self._end_request()
        elif isinstance(event, ConnectionClosed):
            self._close()

    def _begin_request(self, head: RequestHead) -> None:
        self._head, self._body_parts = head, []
        has_body = head.is_chunked or bool(head.content_length)
        if head.expects_continue and has_body:
            # The size check already passed (the parser raises 413 first).
            # A 100 must not land in the middle of an earlier response.
            self._is_continue_owed = True
            self._send_owed_continue()

    def _end_request(self) -> None:
        head, body = self._head, b"".join(self._body_parts)
        self._head, self._body_parts, self._is_continue_owed = None, [], False
        request = _build_request(head, body, self.client)
        self._enqueue(_Pending(request, head.keep_alive))

    def _refuse(self, error: ProtocolError) -> None:
        self._is_discarding_input = True
        self._is_continue_owed = False
        self._pending.append(_Pending(None, False, error))
        self._start_next_cycle_if_idle()

    def _send_owed_continue(self) -> None:
        if self._is_continue_owed and self._cycle is None and not self._pending:
            self._is_continue_owed = False
            self.transport.write(CONTINUE)

    def _update_reading(self) -> None:
        should_pause = len(self._pending) >= self.limits.max_pipelined_requests
        if should_pause != self._is_reading_paused and not self.transport.is_closing():
            self._is_reading_paused = should_pause
            (self.transport.pause_reading if should_pause else self.transport.resume_reading)()

    # -- request cycles ----------------------------------------------------
    def _enqueue(self, pending: _Pending) -> None:
        self._pending.append(pending)
        self._start_next_cycle_if_idle()

    def _start_next_cycle_if_idle(self) -> None:
        if self._cycle is not None or not self._pending or self.flow.is_closed:
            return
        self._cycle = self._loop.create_task(self._run_cycle(self._pending.popleft()))
        self._cycle.add_done_callback(self._on_cycle_done)

    async def _run_cycle(self, pending: _Pending) -> bool:
        """Answer one request; True if the connection stays open."""
        if pending.refusal is not None:
            await self._write_response(error_response(pending.refusal.status, pending.refusal.message), None, False)
            return False
        response = await self._call_handler(pending.request)
        keep_alive = pending.keep_alive and not self._is_shutting_down
        try:
            return await self._write_response(response, pending.request, keep_alive)
        except ConnectionGone:
            return False

    async def _call_handler(self, request: Request):
        try:
            return await self.handler(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The traceback goes to the server log, never to the client.
            logger.exception("handler failed for %s %s", request.method, request.path)
            return error_response(500, "internal server error")

    def _on_cycle_done(self, task: asyncio.Task) -> None:
        self._cycle = None
        if task.cancelled() or self.flow.is_closed:
            return
        if task.exception() is not None or not task.result() or self._is_shutting_down:
            if task.exception() is not None:
                logger.error("response writing failed", exc_info=task.exception())
            self._close()
            return
        self._send_owed_continue()
        self._start_next_cycle_if_idle()
        self._update_reading()
        self._update_timer()

    # -- writing -----------------------------------------------------------
    async def _write_response(self, response, request: Optional[Request], keep_alive: bool) -> bool:
        if not isinstance(response, (Response, StreamingResponse)):
            logger.error("handler returned %r, not a Response", type(response).__name__)
            response = error_response(500, "internal server error")
        try:
            head = self._encode_head(response, keep_alive, request)
        except ValueError:
            logger.exception("invalid response headers")
            await _close_iterator(getattr(response, "body", None))
            response, keep_alive = error_response(500, "internal server error"), False
            head = self._encode_head(response, keep_alive, request)
        if isinstance(response, StreamingResponse):
            return await self._write_stream(head, response, request, keep_alive)
        is_head_request = request is not None and request.method == "HEAD"
        self.transport.write(head if is_head_request else head + response.body)
        return keep_alive

    def _encode_head(self, response, keep_alive: bool, request: Optional[Request]) -> bytes:
        version = request.http_version if request is not None else "1.1"
        if isinstance(response, StreamingResponse):
            content_length, keep_alive = None, keep_alive and version == "1.1"
        else:
            content_length = len(response.body)
        return encode_head(
            response.status, response.headers, response.content_type,
            content_length=content_length, keep_alive=keep_alive, http_version=version,
        )  # fmt: skip

    async def _write_stream(self, head: bytes, response: StreamingResponse, request: Request, keep_alive: bool) -> bool:
        is_chunked = request.http_version == "1.1"  # HTTP/1.0: the body ends when the connection closes
        keep_alive = keep_alive and is_chunked
        if request.method == "HEAD":
            self.transport.write(head)
            await _close_iterator(response.body)
            return keep_alive
        flow, writes = self.flow, CoalescedWrites(self.transport, self._loop)
        writes.write(head)
        try:
            async for chunk in response.body:
                if not flow.is_writable:
                    writes.flush()
                    await flow.drain()
                if chunk:
                    writes.write(encode_chunk(chunk) if is_chunked else chunk)
        except (asyncio.CancelledError, ConnectionGone):
            raise
        except Exception:
            # The status line is out: all we can do is end the connection
            # without the last chunk, so the client sees a truncated body.
            logger.exception("streaming body failed for %s %s", request.method, request.path)
            writes.flush()
            return False
        finally:
            await _close_iterator(response.body)
        if is_chunked:
            writes.write(LAST_CHUNK)
        writes.flush()
        return keep_alive

    # -- closing and timers ------------------------------------------------
    def _close(self) -> None:
        """Flush, send FIN, drain what the peer still sends for a moment,
        then close; closing with unread input would make the kernel send a
        RST that can destroy the response before the client reads it."""
        if self.transport is None or self.transport.is_closing():
            return
        self._is_discarding_input = True
        self._cancel_timer()
        if self._is_reading_paused:
            self.transport.resume_reading()
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._timer = self._loop.call_later(self.limits.linger_s, self.transport.close)
        self._timer_kind = "linger"

    def _update_timer(self, data_arrived: bool = False) -> None:
        if self._is_discarding_input or self.transport is None:
            return
        kind = self._wanted_timer()
        if kind == self._timer_kind and not (kind == "body" and data_arrived):
            return  # a head deadline is not extended by trickled bytes
        self._cancel_timer()
        if kind:
            self._timer = self._loop.call_later(self._timeout_for(kind), self._on_timeout, kind)
            self._timer_kind = kind

    def _wanted_timer(self) -> str:
        phase = self.parser.phase
        if self._is_reading_paused or self._is_continue_owed:
            return ""
        if phase == "head":
            return "head"
        if phase == "body":
            return "body"
        return "keep-alive" if self._cycle is None and not self._pending and phase == "idle" else ""

    def _timeout_for(self, kind: str) -> float:
        limits = self.limits
        return {"head": limits.header_timeout_s, "body": limits.body_timeout_s}.get(kind, limits.keep_alive_timeout_s)

    def _on_timeout(self, kind: str) -> None:
        self._timer, self._timer_kind = None, ""
        if kind == "keep-alive":
            self._close()
        else:
            part = "headers" if kind == "head" else "body"
            self._refuse(ProtocolError(408, f"timed out waiting for the request {part}"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_kind = None, ""


def _peer(transport):
    peer = transport.get_extra_info("peername")
    return tuple(peer[:2]) if isinstance(peer, (tuple, list)) and len(peer) >= 2 else None


def _build_request(head: RequestHead, body: bytes, client) -> Request:
    path, query = split_target(head.target)
    return Request(
        method=head.method,
        target=head.target,
        path=unquote(path),
        query=query,
        headers=head.headers,
        body=body,
        http_version=head.http_version,
        client=client,
    )


async def _close_iterator(iterator) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()
