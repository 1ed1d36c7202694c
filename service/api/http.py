"""The API's HTTP/1.1 connection handling: uvicorn's httptools protocol with deadlines for slow clients and
problem+json for the requests its parser refuses (those never reach the application's error handlers).

Deadlines (settings): the request line and headers must arrive within `header_timeout_seconds` of the
connection or of the request's first byte; a body may pause at most `body_idle_timeout_seconds` between
chunks and must be whole within `upload_timeout_seconds`. A request that misses one gets 408 when no
response has started, and its connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.problems import MEDIA_TYPE, PROBLEMS, problem_body
from service.settings import get_settings

log = logging.getLogger(__name__)


def raw_problem_response(slug: str, detail: str) -> bytes:
    """A whole HTTP/1.1 response carrying a problem, written straight to the socket (the connection closes)."""
    problem = PROBLEMS[slug]
    body = json.dumps(problem_body(slug, detail)).encode()
    head = (
        f"HTTP/1.1 {problem.status} {problem.title}\r\ncontent-type: {MEDIA_TYPE}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class Deadline:
    """One timer of a connection, re-armed or cancelled as the request goes on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, expired: Callable[[], None]) -> None:
        self.loop, self.seconds, self.expired = loop, seconds, expired
        self.handle: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        self.cancel()
        self.handle = self.loop.call_later(self.seconds, self.expired)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class GuardedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.header_deadline = Deadline(self.loop, settings.header_timeout_seconds, self._headers_too_slow)
        self.idle_deadline = Deadline(self.loop, settings.body_idle_timeout_seconds, self._body_stalled)
        self.upload_deadline = Deadline(self.loop, settings.upload_timeout_seconds, self._body_too_slow)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.header_deadline.arm()  # a connection that never sends a byte is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        for deadline in (self.header_deadline, self.idle_deadline, self.upload_deadline):
            deadline.cancel()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.header_deadline.handle is None:  # the next request on a kept-alive connection
            self.header_deadline.arm()

    def on_headers_complete(self) -> None:
        self.header_deadline.cancel()
        self.idle_deadline.arm()
        self.upload_deadline.arm()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.idle_deadline.arm()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.idle_deadline.cancel()
        self.upload_deadline.cancel()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self.transport.write(raw_problem_response("malformed-request", msg))
        self.transport.close()

    def _headers_too_slow(self) -> None:
        self._give_up(f"The request headers did not arrive within {self.header_deadline.seconds:g} s.")

    def _body_stalled(self) -> None:
        if self.flow is not None and self.flow.read_paused:  # we stopped reading, not the client
            self.idle_deadline.arm()
            return
        self._give_up(f"The request body stalled for {self.idle_deadline.seconds:g} s.")

    def _body_too_slow(self) -> None:
        self._give_up(f"The request body did not arrive within {self.upload_deadline.seconds:g} s.")

    def _give_up(self, detail: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        log.info("closing a slow connection from %s: %s", self.client, detail)
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            self.transport.write(raw_problem_response("request-timeout", detail))
        if cycle is not None:  # the application sees a disconnect and writes nothing more
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()
