"""One client request on its way through the proxy, and the error reply it may end with."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .decisions import Decision, History, error_body
from .headers import add_configured
from .keys import Key
from .logs.error_log import ErrorEvent
from .logs.request_log import RequestRecord
from .patterns import RuleTimeout
from .redact import Redactor, header_secrets
from .state import Settings, State
from .upstreams import Upstream

log = logging.getLogger("first_hop_proxy")


@dataclass(slots=True, eq=False)
class ChatRequest:
    """A checked chat request, ready to forward.

    ``headers`` are the client's, minus hop-by-hop ones; each upstream adds its
    configured headers, and its own model name where ``model_map`` has one.

    Once the first upstream's body is made, the parsed body is let go (``parsed``
    is None) and parsed again from ``body`` only if something needs it (another
    upstream's model name, a stream resume): a chat of 2 KB of JSON is 3 KB of
    Python objects, held for as long as the reply takes (1,000 streams: 3 MB).
    """

    body: bytes
    parsed: dict[str, Any] | None
    headers: CIMultiDict[str]
    stream: bool
    model: str
    _prepared: dict[tuple[str, str, bool], tuple[bytes, CIMultiDict[str]]] = field(
        default_factory=dict
    )

    @property
    def payload(self) -> dict[str, Any]:
        """The parsed body (parsed again from ``body`` when it was let go)."""
        parsed = self.parsed
        if parsed is None:
            parsed = self.parsed = orjson.loads(self.body)
        return parsed

    @payload.setter
    def payload(self, value: dict[str, Any]) -> None:
        self.parsed = value

    def for_upstream(
        self, upstream: Upstream, key: Key | None = None, *, as_stream: bool = False
    ) -> tuple[bytes, CIMultiDict[str]]:
        """The body and headers to send to ``upstream``: its own model name, its
        configured headers, the pool ``key`` in place of the client's, and for a
        JSON request it streams ``"stream": true`` with usage asked for (a JSON
        reply carries its usage; the assembled one should too). Worked out once each."""
        slot = (upstream.name, key.label if key is not None else "", as_stream)
        prepared = self._prepared.get(slot)
        if prepared is None:
            body = self.body
            changes: dict[str, Any] = {}
            theirs = upstream.model_for(self.model)
            if theirs != self.model:
                changes["model"] = theirs
            if as_stream:
                changes["stream"] = True
                options = self.payload.get("stream_options")
                options = dict(options) if isinstance(options, dict) else {}
                changes["stream_options"] = {"include_usage": True, **options}
            if changes:
                body = orjson.dumps({**self.payload, **changes})
            headers = add_configured(self.headers, upstream.headers)
            if key is not None and upstream.keys is not None:
                drop, name, value = upstream.keys.headers(key)
                headers = headers.copy()
                for header in drop:
                    headers.popall(header, None)
                headers[name] = value
            prepared = body, headers
            self._prepared[slot] = prepared
            self.parsed = None  # the bytes go out from here on (see the class's docstring)
        return prepared


@dataclass(slots=True, eq=False)
class Exchange:
    """One client request on its way through the proxy, and what happened to it."""

    state: State
    settings: Settings  # the config this request started with, whatever reloads come
    request: web.Request
    record: RequestRecord
    chat: ChatRequest | None = None
    upstream: Upstream | None = None  # the one being tried, or that delivered
    #: The pool key in use, by its last 4 characters (``...x7Qa``); "" without a key pool.
    key_label: str = ""
    #: What each upstream tried said last (name -> one line), for the final error.
    tried: dict[str, str] = field(default_factory=dict)
    history: History = field(default_factory=History)
    started: float = field(default_factory=time.monotonic)
    #: Seconds a stream spent flowing to the client: not failing, so not on the time budget.
    flowing: float = 0.0
    last_problem: str = ""
    last_code: str = ""  # the last failed attempt's status or failure kind, for keep-alives
    calls: int = 0  # upstream attempts made (a retry the breaker refused is not one)
    outcome_note: str = ""
    #: The status the request really ended with, when the client was already sent
    #: another (a stream committed with 200 that then ended with an error event).
    ended_status: int | None = None
    response: web.StreamResponse | None = None  # a stream's response, once committed
    _redactor: Redactor | None = None
    #: The reply's ``usage`` (JSON body, or a stream's chunk), for the usage totals.
    usage: dict[str, Any] | None = None
    #: ``usage.track_streams`` asked the upstream for usage: its usage chunk is not the client's.
    usage_added: bool = False

    @property
    def request_id(self) -> str:
        return self.record.request_id

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def spent(self) -> float:
        """Seconds spent on the time budget (``max_total_seconds``): all but the flowing."""
        return self.elapsed() - self.flowing

    def client_secrets(self) -> list[str]:
        return header_secrets(self.request.headers)

    def redactor(self) -> Redactor:
        """The proxy's redactor, also masking the key this client sent."""
        if self._redactor is None:
            self._redactor = self.settings.redactor.with_header_secrets(self.request.headers)
        return self._redactor

    def mask(self, text: str) -> str:
        """``text`` with every secret this request knows of masked."""
        return self.redactor().text(text)

    def rule_timeouts(self, timeouts: list[RuleTimeout]) -> None:
        """Rewrite rules that ran out of time: a console warning and an error log each."""
        for timeout in timeouts:
            log.warning("[%s] %s", self.request_id, timeout)
            self.error_event("rule_timeout", "RuleTimeout", str(timeout))

    def error_event(self, code: str | int, error_type: str, message: str, **fields: Any) -> None:
        """Send one event to the error log, with this request's context filled in."""
        chat = self.chat
        self.record.error_events += 1  # its request log is then kept, never dropped
        upstream = self.upstream
        context = dict(fields.get("context") or {})
        if upstream is not None and self.settings.several:
            context["upstream"] = upstream.name
        if self.key_label:
            context["key"] = self.key_label  # a pool key, by its last four characters
        if context:
            fields["context"] = context
        self.settings.error_log.log(
            ErrorEvent(
                code,
                error_type,
                message,
                request_id=self.request_id,
                method=self.request.method,
                path=self.request.path,
                model=chat.model if chat else None,
                stream=chat.stream if chat else None,
                client=self.request.remote,
                elapsed=self.elapsed(),
                url=self.settings.redactor.url(upstream.url) if upstream else None,
                secrets=[*self.record.secrets, *self.client_secrets()],
                **fields,
            )
        )


def failure_body(ex: Exchange, decision: Decision) -> bytes:
    """The error the client gets; an upstream text quoted in it may echo a key: masked.

    With several upstreams, it names each one tried and what each said.
    """
    tried = list(ex.tried.items()) if ex.settings.several else []
    body = error_body(decision, ex.calls, ex.elapsed(), tried)
    return orjson.dumps(ex.redactor().obj(body))


def note_failure(ex: Exchange, decision: Decision) -> None:
    """Record a FAIL or HARD_STOP for the request log and the console line."""
    ex.outcome_note = decision.error_type or "failed"
    ex.record.error = decision.reason


def failure_response(ex: Exchange, decision: Decision) -> web.Response:
    """A FAIL or HARD_STOP decision, as the JSON error the client gets."""
    headers = {}
    if decision.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(decision.retry_after)))
    note_failure(ex, decision)
    return web.Response(
        status=decision.client_status,
        body=failure_body(ex, decision),
        content_type="application/json",
        headers=headers,
    )
