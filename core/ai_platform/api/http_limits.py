"""Limits on a request's head (request line and header fields), enforced while uvicorn reads it.

httptools, uvicorn's HTTP/1.1 parser, has no limit of its own: a client reaching the server
directly (not through nginx, whose ``large_client_header_buffers`` stop it) could send a 32 MB
header, which was buffered whole, or 100,000 headers. :class:`HeaderLimitedHttpToolsProtocol`
answers such a request ``431 Request Header Fields Too Large`` (``{"detail": ...}``, the API's
error body) as soon as the head passes :data:`MAX_HEAD_BYTES` or :data:`MAX_HEADER_COUNT`, before
the app sees anything, so what it buffers stays within the limit. ``ai-platform serve`` runs it.

Behind nginx, heads larger than its ``large_client_header_buffers`` (default 4 x 8 KB) are refused
by nginx itself; nginx has no limit on the number of fields, so the 431 for more than 100 still
applies there.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
"""Request line and header fields together, as sent (the last slice read may add up to ``_SLICE`` bytes)."""
MAX_HEADER_COUNT = 100
"""Header fields in one request (Apache's default ``LimitRequestFields``)."""

# While a head is incomplete, the parser is fed this much at a time, so that an oversized head is
# caught within one slice of the limit however large the chunk the socket delivered.
_SLICE = 1024
# After a 431, what the client still sends is read and dropped for this long (or until it closes),
# so that closing does not reset the connection before the client has read the answer.
_LINGER_SECONDS = 2.0

DETAIL = (
    f"Request header fields too large: at most {MAX_HEADER_COUNT} header fields "
    f"and {MAX_HEAD_BYTES // 1024} KiB for the request line and headers."
)


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing; uvicorn turns it into a call of ``send_400_response``."""


class HeaderLimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing oversized request heads with 431."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the bytes being read belong to a request head (or to the idle gap before one)
        self._head_bytes = 0
        self._header_count = 0
        self._too_large = False  # a limit was passed; the 431 is sent (or waits for the response in flight)
        self._discarding = False
        self._linger: asyncio.TimerHandle | None = None

    # Reading

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        view = memoryview(data)
        while view:
            if self._in_head:
                piece, view = view[:_SLICE], view[_SLICE:]
            else:  # the body and whatever follows: fed at once, as uvicorn does
                piece, view = view, view[len(view) :]
            super().data_received(piece)  # type: ignore[arg-type]  # httptools reads any buffer
            if self._discarding or self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # refused, closed by uvicorn (a 400), or upgraded to another protocol
            if self._in_head:
                self._head_bytes += len(piece)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._refuse()
                    return

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADER_COUNT:
            self._too_large = True
            raise _HeadTooLarge()  # stops the parser; uvicorn calls send_400_response, which refuses
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes, self._header_count = True, 0, 0

    # Refusing

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._refuse()
        else:
            super().send_400_response(msg)

    def _refuse(self) -> None:
        """Stop reading requests on this connection and answer 431 once the response in flight (if any) is sent."""
        self._too_large = self._discarding = True
        client = "{}:{}".format(*self.client) if self.client else "-"
        self.logger.warning("%s - request head over %d bytes or %d header fields: 431", client, MAX_HEAD_BYTES,
                            MAX_HEADER_COUNT)  # fmt: skip
        if self.cycle is None or self.cycle.response_complete:
            self._send_431()
        # else: a pipelined request before this one is still being answered; on_response_complete sends it.

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request that came before the refused one
        if self._too_large and not self.pipeline and not self.transport.is_closing() and self.cycle.response_complete:
            self._send_431()

    def _send_431(self) -> None:
        self._too_large = False  # sent once
        self._unset_keepalive_if_required()
        body = json.dumps({"detail": DETAIL}).encode()
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client sees the end of the answer at once
            self.flow.resume_reading()  # and whatever it still sends is read and dropped for a while
            self._linger = self.loop.call_later(_LINGER_SECONDS, self.transport.close)
        else:  # TLS: no half-close
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)
