"""The proxy's state: everything one running proxy holds, built from one config.

No module-level globals: the server keeps one :class:`State` on its
``web.Application`` and every handler reaches it from the request.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web

from .breaker import CircuitBreaker, Transition
from .breaker import State as BreakerState
from .config import Config, LoadedConfig
from .decisions import Policy
from .error_log import ErrorEvent, ErrorLog
from .guard import Guard
from .headers import configured_headers
from .redact import Redactor, header_secrets
from .request_log import RequestLog
from .rewrite import Rewriter
from .writer import LogWriter

log = logging.getLogger("first_hop_proxy")


@dataclass(eq=False)
class Counters:
    """Request counters shown in ``/health/detailed``."""

    requests: int = 0
    in_flight: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    retries: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "retries": self.retries,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
        }


@dataclass(eq=False)
class State:
    """One running proxy: its config, compiled rules, breaker, logs and client session."""

    loaded: LoadedConfig
    target_url: str
    #: The configured upstream headers that carry something (``headers.configured_headers``).
    headers: dict[str, str]
    policy: Policy
    breaker: CircuitBreaker
    rewriter: Rewriter
    redactor: Redactor
    writer: LogWriter
    request_log: RequestLog
    error_log: ErrorLog
    guard: Guard
    started: float = field(default_factory=time.monotonic)
    counters: Counters = field(default_factory=Counters)
    last_models: bytes | None = None  # the upstream's last good /models answer
    last_answer: float | None = None  # wall time the upstream last answered (not failed)
    _session: aiohttp.ClientSession | None = None

    @classmethod
    def build(cls, loaded: LoadedConfig) -> State:
        """Compile everything a config implies, once, before the first request."""
        config = loaded.config
        redactor = Redactor(header_secrets(config.target_proxy.headers))
        writer = LogWriter()
        error_log = ErrorLog(config.error_logging, writer, redactor)
        state = cls(
            loaded=loaded,
            target_url=config.target_proxy.url,
            headers=configured_headers(config.target_proxy.headers),
            policy=Policy.from_config(config),
            breaker=CircuitBreaker.from_config(config.circuit_breaker),
            rewriter=Rewriter.from_config(config),
            redactor=redactor,
            writer=writer,
            request_log=RequestLog(config.logging, writer, redactor),
            error_log=error_log,
            guard=Guard.from_config(config.server),
        )
        writer.on_failure = state.log_write_failure
        return state

    @property
    def config(self) -> Config:
        return self.loaded.config

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream session is opened when the server starts")
        return self._session

    async def start(self) -> None:
        """Open the one shared client session: a pool sized for hundreds of streams.

        ``total=None``: a stream may run for as long as it keeps sending;
        ``sock_read`` bounds the wait for headers and the gap between reads.
        """
        await self.writer.start()
        target = self.config.target_proxy
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=target.connect_timeout, sock_read=target.timeout
            ),
            skip_auto_headers=("User-Agent",),
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.writer.close()

    def breaker_moved(self, transition: Transition | None) -> None:
        """Every state change of the circuit breaker goes to the console and the error log."""
        if transition is None:
            return
        log.warning("upstream %s", transition)
        self.error_log.log(
            ErrorEvent(
                "circuit_open" if transition.new == "open" else "circuit_breaker",
                "CircuitBreaker",
                str(transition),
                url=self.redactor.url(self.target_url),
                context=self.breaker_status(),
            )
        )

    def breaker_status(self) -> dict[str, Any]:
        """The breaker's snapshot, its times as wall-clock ISO timestamps a person can read."""
        now_mono, now_wall = time.monotonic(), time.time()
        snapshot = self.breaker.snapshot(now_mono)
        for key in ("opened_at", "next_probe_at"):
            if snapshot.get(key) is not None:
                snapshot[key] = wall_clock(snapshot[key] - now_mono + now_wall)
        return snapshot

    def health(self) -> tuple[str, str]:
        """``ok``, ``degraded`` or ``unknown``, and why, as ``/health/detailed`` says it.

        ``ok`` only when the upstream's last attempt got an answer; ``degraded``
        while the breaker is open (or probing) or the last attempts failed.
        """
        breaker = self.breaker
        last = breaker.last_failure or "no details"
        if breaker.state is BreakerState.OPEN:
            wait = breaker.retry_in(time.monotonic())
            return "degraded", (
                f"the circuit breaker is open after {breaker.consecutive_failures} failed "
                f"attempts in a row (the last: {last}); the upstream is tried again in "
                f"{wait:.0f} s"
            )
        if breaker.state is BreakerState.HALF_OPEN:
            return "degraded", f"probing the upstream after failures (the last: {last})"
        if breaker.consecutive_failures:
            return "degraded", (
                f"the last {breaker.consecutive_failures} attempt(s) at the upstream failed "
                f"(the last: {last})"
            )
        if self.last_answer is None:
            return "unknown", "no request has reached the upstream yet"
        return "ok", f"the upstream answered at {wall_clock(self.last_answer)}"

    def log_write_failure(self, message: str) -> None:
        self.error_log.log(ErrorEvent("log_write_error", "OSError", message))

    def endpoint_error(self, request: web.Request, exc: BaseException) -> None:
        """An unexpected exception while serving ``request``, with its stack trace."""
        self.error_log.log(
            ErrorEvent.from_exception(
                "endpoint_error",
                exc,
                status_code=500,
                request_id=request.get(REQUEST_ID),
                method=request.method,
                path=request.path,
                client=request.remote,
                headers=request.headers.copy(),
            )
        )


def wall_clock(unix: float) -> str:
    """A Unix time as an ISO timestamp in local time, with its UTC offset."""
    return datetime.fromtimestamp(unix).astimezone().isoformat(timespec="milliseconds")


STATE = web.AppKey("state", State)
REQUEST_ID = web.RequestKey("request_id", str)
