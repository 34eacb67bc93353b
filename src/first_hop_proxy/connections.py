"""The server's connections: a client too slow to send its request is cut off, and no
more than ``server.max_connections`` are open at once.

aiohttp waits for a request's headers for as long as the client likes, so a
page could hold thousands of connections with half a request line each. Each
connection here gets ``server.client_timeout`` seconds from its first byte (or
from being opened) to finish its request's headers, else a 408 and the close;
the body has the same time, counted by the chat handler. A connection beyond
the cap is answered 503 whatever it asks, and closed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import StreamReader, web
from aiohttp.web_protocol import RequestHandler

from .errors import error_body, error_response

log = logging.getLogger("first_hop_proxy")

#: File descriptors kept free of connections: log files, the listening socket, the runtime.
RESERVED_FILES = 64


def connection_cap(configured: int, open_files: int | None) -> int:
    """``server.max_connections``, lowered to what the open-file limit allows.

    Each client connection may need a second one to the upstream; at the limit
    the proxy could accept nothing, not even SillyTavern, so it stops sooner.
    """
    if open_files is None:
        return configured
    return max(1, min(configured, (open_files - RESERVED_FILES) // 2))


def open_files_limit() -> int | None:
    """The soft limit on open files (``ulimit -n``), or None where unknown or unlimited."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


@dataclass(eq=False)
class ConnectionLimits:
    """The limits of one server, and how many of its connections are open."""

    client_timeout: float
    max_connections: int
    open: int = 0
    refused: int = 0
    timed_out: int = 0

    def timeout_response(self) -> bytes:
        """A whole HTTP 408 response, written raw: no request was parsed to answer."""
        body = error_body(
            "The request did not arrive in time: its headers must arrive within "
            f"server.client_timeout ({self.client_timeout:g} s). The connection is closed.",
            "invalid_request_error",
            "request_timeout",
        )
        head = (
            "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + body

    async def busy(self, request: web.BaseRequest) -> web.StreamResponse:
        """The answer to any request on a connection beyond the cap."""
        response = error_response(
            503,
            f"The proxy already has {self.max_connections} connections open "
            "(server.max_connections), so it closed this one. Try again in a moment; if "
            "this keeps happening, something is opening connections without closing them.",
            "server_busy",
            "too_many_connections",
            headers={"Retry-After": "1"},
        )
        response.force_close()
        return response


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler, with a deadline for each request's headers."""

    __slots__ = ("_body", "_counted", "_deadline", "_limits")

    def __init__(self, manager: web.Server, limits: ConnectionLimits, **kwargs: object) -> None:
        super().__init__(manager, **kwargs)  # type: ignore[arg-type]
        self._limits = limits
        self._deadline: asyncio.TimerHandle | None = None
        self._counted = False
        self._body: StreamReader | None = None  # the body of the last request received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        limits = self._limits
        limits.open += 1
        self._counted = True
        if limits.open > limits.max_connections:
            limits.refused += 1
            self._request_handler = limits.busy
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages:
            self._body = self._messages[-1][1]
        if self._messages or self._request_in_progress:
            self._disarm()  # the headers are in: the handler times the body
        elif data and self._deadline is None and (self._body is None or self._body.is_eof()):
            self._arm()  # the next request on a kept-alive connection has begun

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            self._limits.open -= 1
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self._loop.call_later(self._limits.client_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        transport = self.transport
        if self._messages or self._request_in_progress or transport is None:
            return
        self._limits.timed_out += 1
        transport.write(self._limits.timeout_response())
        self.force_close()


class GuardedServer(web.Server):
    """aiohttp's low-level server, making :class:`GuardedRequestHandler` connections."""

    def __init__(self, server: web.Server, limits: ConnectionLimits) -> None:
        # The unread body of a request answered early is drained for at most as
        # long as a client may take to send one, not aiohttp's 10 s.
        lingering = min(float(server._kwargs.get("lingering_time", 10.0)), limits.client_timeout)
        super().__init__(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **{**server._kwargs, "lingering_time": lingering},
        )
        self.limits = limits

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, self.limits, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server guards its connections."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: object) -> None:
        super().__init__(app, **kwargs)  # type: ignore[arg-type]
        self.limits = limits

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self.limits)
