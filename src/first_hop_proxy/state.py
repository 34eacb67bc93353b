"""The proxy's state: what one running proxy holds, and what its current config implies.

No module-level globals: the server keeps one :class:`State` on its
``web.Application`` and every handler reaches it from the request. What a
config implies (compiled rules, upstreams, logs) is one :class:`Settings`; a
config reload swaps it, and each request keeps the one it started with.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web

from .access import Access
from .breaker import Transition
from .config import Config, LoadedConfig
from .config import Upstream as UpstreamConfig
from .decisions import Policy
from .events import EventHub
from .guard import Guard
from .headers import ACCEPT_ENCODING
from .logs.error_log import ErrorEvent, ErrorLog
from .logs.request_log import RequestLog
from .logs.writer import LogWriter
from .redact import Redactor, header_secrets, masked_url, url_secrets
from .rewrite import Rewriter
from .routing import start_order
from .stats import Stats
from .upstreams import Upstream, build_upstreams
from .usage import UsageTotals

log = logging.getLogger("first_hop_proxy")


def configured_secrets(config: Config) -> list[str]:
    """The keys in the config: key pools, credential headers, key-like values in the URLs,
    the admin token and the client keys."""
    target = config.target_proxy
    places = [(u.keys, u.headers, u.url) for u in config.upstreams]
    places.append((target.keys, target.headers, target.url))
    server = config.server
    return [
        secret
        for keys, headers, url in places
        for secret in (*keys, *header_secrets(headers), *url_secrets(url))
    ] + [s for s in (server.admin_token, *server.api_keys) if s]


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
class Settings:
    """Everything one config implies, compiled once before the first request uses it."""

    loaded: LoadedConfig
    policy: Policy
    rewriter: Rewriter
    redactor: Redactor
    guard: Guard
    access: Access
    upstreams: tuple[Upstream, ...]
    request_log: RequestLog
    error_log: ErrorLog
    loaded_at: float = field(default_factory=time.time)
    #: ``loaded.config`` and whether there is more than one upstream, kept as plain
    #: attributes: the request path reads them several times per request.
    config: Config = field(init=False)
    several: bool = field(init=False)

    def __post_init__(self) -> None:
        self.config = self.loaded.config
        self.several = len(self.upstreams) > 1

    @classmethod
    def build(
        cls,
        loaded: LoadedConfig,
        writer: LogWriter,
        previous: Settings | None = None,
        host: str | None = None,
    ) -> Settings:
        """Compile ``loaded``; with ``previous`` (a reload), breakers and logs carry over.

        ``host``: where the proxy listens (default: where it listened before, else
        ``server.host``); beyond loopback the admin routes need a token.
        """
        config = loaded.config
        before = previous.access if previous is not None else None
        host = host or (before.host if before is not None else config.server.host)
        access = Access.from_config(config.server, host, before)
        upstreams = config.upstreams
        if loaded.demo:  # the built-in demo upstream; the server sets its URL when it listens
            demo_url = previous.upstreams[0].url if previous and previous.loaded.demo else ""
            upstreams = [UpstreamConfig(name="demo", url=demo_url or "http://127.0.0.1:1/")]
        redactor = Redactor([*configured_secrets(config), *access.secrets])
        old = previous.upstreams if previous is not None else ()
        request_log = error_log = None
        if previous is not None:
            if previous.config.logging == config.logging:
                request_log = previous.request_log
                request_log.redactor = redactor
            if previous.config.error_logging == config.error_logging:
                error_log = previous.error_log
                error_log.redactor = redactor
        return cls(
            loaded=loaded,
            policy=Policy.from_config(config),
            rewriter=Rewriter.from_config(config),
            redactor=redactor,
            guard=Guard.from_config(config.server),
            access=access,
            upstreams=build_upstreams(upstreams, config.circuit_breaker, old),
            request_log=request_log or RequestLog(config.logging, writer, redactor),
            error_log=error_log or ErrorLog(config.error_logging, writer, redactor),
        )

    def candidates(self, model: str, rotation: int) -> list[Upstream]:
        """The upstreams that serve ``model``, in the order this request tries them."""
        serving = [u for u in self.upstreams if u.serves(model)]
        if self.config.routing.strategy != "round_robin" or len(serving) < 2:
            return serving
        # Round robin among the healthy ones: start at the next whose breaker is closed.
        order = start_order(serving, rotation)
        healthy = [u for u in order if u.available()]
        return healthy + [u for u in order if not u.available()]


@dataclass(eq=False)
class State:
    """One running proxy: its settings, log writer, counters and client session."""

    settings: Settings
    writer: LogWriter
    started: float = field(default_factory=time.monotonic)
    counters: Counters = field(default_factory=Counters)
    stats: Stats = field(default_factory=Stats)  # the dashboard's and /metrics' figures
    hub: EventHub = field(default_factory=EventHub)  # the dashboard's live feed
    rotation: int = 0  # round robin: where the next request starts
    usage: UsageTotals = field(init=False)
    _session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self.usage = UsageTotals(lambda: self.config.usage, self.usage_write_failure)

    @classmethod
    def build(cls, loaded: LoadedConfig, host: str | None = None) -> State:
        """Compile everything a config implies, once, before the first request.

        ``host``: where the proxy listens (default ``server.host``).
        """
        writer = LogWriter()
        state = cls(settings=Settings.build(loaded, writer, host=host), writer=writer)
        writer.on_failure = state.log_write_failure
        state.hub.mask = lambda text: state.redactor.text(text)  # the current one, reloads too
        return state

    # The current settings' parts, for code that does not serve one request.
    @property
    def loaded(self) -> LoadedConfig:
        return self.settings.loaded

    @property
    def config(self) -> Config:
        return self.settings.config

    @property
    def policy(self) -> Policy:
        return self.settings.policy

    @property
    def redactor(self) -> Redactor:
        return self.settings.redactor

    @property
    def guard(self) -> Guard:
        return self.settings.guard

    @property
    def access(self) -> Access:
        return self.settings.access

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return self.settings.upstreams

    @property
    def request_log(self) -> RequestLog:
        return self.settings.request_log

    @property
    def error_log(self) -> ErrorLog:
        return self.settings.error_log

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream session is opened when the server starts")
        return self._session

    def next_rotation(self) -> int:
        """Round robin: the start position of the next request."""
        self.rotation += 1
        return self.rotation - 1

    async def start(self) -> None:
        """Open the one shared client session: a pool sized for hundreds of streams.

        ``total=None``: a stream may run for as long as it keeps sending. Each
        upstream's own ``connect`` and ``sock_read`` times are set per request.
        Every request asks only for the encodings the session decodes.
        """
        await self.writer.start()
        self.usage.start()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent",),
            headers={"Accept-Encoding": ACCEPT_ENCODING},
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.usage.close()
        await self.writer.close()

    def breaker_moved(self, upstream: Upstream, transition: Transition | None) -> None:
        """Every state change of a circuit breaker goes to the console and the error log."""
        if transition is None:
            return
        log.warning("upstream %s: %s", upstream.name, transition)
        self.error_log.log(
            ErrorEvent(
                "circuit_open" if transition.new == "open" else "circuit_breaker",
                "CircuitBreaker",
                f"upstream {upstream.name}: {transition}",
                url=self.redactor.url(upstream.url),
                context={"upstream": upstream.name, **breaker_status(upstream)},
            )
        )

    def health(self) -> tuple[str, str]:
        """``ok``, ``degraded`` or ``unknown`` for the proxy as a whole, and why.

        ``ok`` once an upstream answered and none is failing; with several, one
        failing upstream makes the whole ``degraded``, naming it.
        """
        verdicts = [(u, *u.health()) for u in self.upstreams]
        bad = [(u, why) for u, status, why in verdicts if status == "degraded"]
        if bad:
            return "degraded", "; ".join(f"{u.name}: {why}" for u, why in bad)
        if verdicts and all(status == "ok" for _, status, _ in verdicts):
            return "ok", "every upstream answered its last attempt"
        if any(status == "ok" for _, status, _ in verdicts):
            return "ok", "; ".join(f"{u.name}: {why}" for u, _, why in verdicts)
        return "unknown", "no request has reached an upstream yet"

    def log_write_failure(self, message: str) -> None:
        self.error_log.log(ErrorEvent("log_write_error", "OSError", message))

    def usage_write_failure(self, message: str) -> None:
        self.error_log.log(ErrorEvent("usage_db_error", "UsageDatabaseError", message))

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


def breaker_status(upstream: Upstream) -> dict[str, Any]:
    """A breaker's snapshot, its times as wall-clock ISO timestamps a person can read."""
    now_mono, now_wall = time.monotonic(), time.time()
    snapshot = upstream.breaker.snapshot(now_mono)
    for key in ("opened_at", "next_probe_at"):
        if snapshot.get(key) is not None:
            snapshot[key] = wall_clock(snapshot[key] - now_mono + now_wall)
    return snapshot


def upstream_status(upstream: Upstream, redactor: Redactor) -> dict[str, Any]:
    """One upstream in ``/health/detailed``: health, breaker, last error, recent record."""
    status, reason = upstream.health()
    return {
        "name": upstream.name,
        "url": masked_url(upstream.url),
        "status": status,
        "reason": redactor.text(reason),
        "circuit_breaker": redactor.obj(breaker_status(upstream)),
        "last_error": redactor.text(upstream.breaker.last_failure) or None,
        "last_answer": wall_clock(upstream.last_answer) if upstream.last_answer else None,
        "models": upstream.patterns,
        "attempts": upstream.record.attempts,
        "failures": upstream.record.failures,
        "last_5_minutes": upstream.record.summary(5),
        "last_60_minutes": upstream.record.summary(60),
        "keys": key_status(upstream, redactor),
        "streams_json_requests": upstream.streams_json(""),
    }


def key_status(upstream: Upstream, redactor: Redactor) -> list[dict[str, Any]] | None:
    """The upstream's keys by their last four characters, their state and until when."""
    if upstream.keys is None:
        return None
    keys = upstream.keys.snapshot(time.time())
    for key in keys:
        if key["until"] is not None:
            key["until"] = wall_clock(key["until"])
        if key["reason"]:
            key["reason"] = redactor.text(key["reason"])
    return keys


def upstream_names(upstreams: Sequence[Upstream]) -> str:
    return ", ".join(u.name for u in upstreams)


def wall_clock(unix: float) -> str:
    """A Unix time as an ISO timestamp in local time, with its UTC offset."""
    return datetime.fromtimestamp(unix).astimezone().isoformat(timespec="milliseconds")


STATE = web.AppKey("state", State)
REQUEST_ID = web.RequestKey("request_id", str)
