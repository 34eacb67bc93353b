"""``POST /chat/completions``: check the request, forward it until a reply can be delivered.

This is the I/O shell around :func:`decisions.decide`: it makes each attempt
(:mod:`upstream`), asks the decision core what to do with the result, and does
exactly that: relay, sleep and retry, or answer with an error a person can act
on. A stream is held back until its first content so that everything before it
can be retried without the client seeing a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .decisions import Action, Decision, History, Outcome, circuit_open, decide, error_body
from .error_log import ErrorEvent
from .errors import error_response
from .headers import client_headers, upstream_headers
from .redact import header_secrets
from .request_log import AttemptRecord, RequestRecord
from .rewrite import RuleTimeout
from .sse import DONE, comment, event_data, frame
from .state import REQUEST_ID, STATE, State
from .upstream import TRANSPORT_ERRORS, Reply, describe_failure, fetch, open_stream

log = logging.getLogger("first_hop_proxy")

STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
TRANSPORT_STATUS = {"timeout": 504}
DEBUG_TEXT = 300  # characters of upstream text in a debug line


@dataclass(slots=True, eq=False)
class ChatRequest:
    """A checked chat request, ready to forward."""

    body: bytes
    payload: dict[str, Any]
    headers: CIMultiDict[str]
    stream: bool
    model: str


@dataclass(slots=True, eq=False)
class Exchange:
    """One client request on its way through the proxy, and what happened to it."""

    state: State
    request: web.Request
    record: RequestRecord
    chat: ChatRequest | None = None
    history: History = field(default_factory=History)
    started: float = field(default_factory=time.monotonic)
    last_problem: str = ""
    last_code: str = ""  # the last failed attempt's status or failure kind, for keep-alives
    calls: int = 0  # upstream attempts made (a retry the breaker refused is not one)
    outcome_note: str = ""

    @property
    def request_id(self) -> str:
        return self.record.request_id

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def error_event(self, code: str | int, error_type: str, message: str, **fields: Any) -> None:
        """Send one event to the error log, with this request's context filled in."""
        chat = self.chat
        self.state.error_log.log(
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
                url=self.state.redactor.url(self.state.target_url),
                secrets=[*self.record.secrets, *header_secrets(self.request.headers)],
                **fields,
            )
        )


# -- the request --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BadRequest:
    message: str
    code: str


def bad_request(message: str, code: str) -> BadRequest:
    return BadRequest(message, code)


def parse_chat_request(body: bytes, ex: Exchange) -> ChatRequest | BadRequest:
    """Parse and check the body; a bad one gets a 400 that says what is wrong."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return bad_request(
            f"The request body is not valid JSON ({exc}). Send an OpenAI chat completions "
            "request: a JSON object with a 'messages' list.",
            "invalid_json",
        )
    if not isinstance(payload, dict):
        return bad_request(
            f"The request body is JSON but not an object (got {type(payload).__name__}). "
            "Send a JSON object with a 'messages' list.",
            "invalid_body",
        )
    messages = payload.get("messages")
    if messages is None:
        return bad_request(
            "The request has no 'messages' field: a chat completion needs a list of messages.",
            "missing_messages",
        )
    if not isinstance(messages, list):
        return bad_request(
            f"'messages' must be a list of message objects (got {type(messages).__name__}).",
            "invalid_messages",
        )
    config = ex.state.config
    model = payload.get("model")
    return ChatRequest(
        body=body,
        payload=payload,
        headers=upstream_headers(ex.request.headers, config.target_proxy.headers),
        stream=payload.get("stream") is True,
        model=model if isinstance(model, str) else "",
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    record = RequestRecord(
        request.get(REQUEST_ID) or "-",
        request.path,
        client=request.remote,
        headers=request.headers,
    )
    ex = Exchange(state, request, record)
    status = 500
    try:
        response = await handle(ex)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499
        ex.outcome_note = "client went away"
        raise
    finally:
        finish(ex, status)


async def handle(ex: Exchange) -> web.StreamResponse:
    body = await ex.request.read()
    ex.record.body = body
    chat = parse_chat_request(body, ex)
    if isinstance(chat, BadRequest):
        ex.outcome_note = "bad request"
        ex.error_event("bad_request", "BadRequest", chat.message, status_code=400)
        return error_response(400, chat.message, "invalid_request_error", chat.code)
    ex.chat = chat
    ex.record.model, ex.record.stream = chat.model, chat.stream
    await rewrite_request(ex, chat)
    if ex.state.config.server.debug:
        redactor = ex.state.redactor.with_secrets(header_secrets(ex.request.headers))
        log.debug(
            "%s -> POST %s, %d bytes, headers %s",
            ex.request_id,
            redactor.url(ex.state.target_url),
            len(chat.body),
            redactor.headers(chat.headers),
        )
    if chat.stream:
        return await relay_stream(ex, chat)
    return await relay_json(ex, chat)


async def rewrite_request(ex: Exchange, chat: ChatRequest) -> None:
    rewriter = ex.state.rewriter
    if not rewriter.has_request_rules:
        return
    result = await rewriter.rewrite_messages_async(chat.payload)
    report_rule_timeouts(ex, result.timeouts)
    if result.changed:
        ex.record.original_body = chat.body
        chat.body = orjson.dumps(chat.payload)
        ex.record.body = chat.body


def report_rule_timeouts(ex: Exchange, timeouts: list[RuleTimeout]) -> None:
    for timeout in timeouts:
        log.warning("[%s] %s", ex.request_id, timeout)
        ex.error_event("rule_timeout", "RuleTimeout", str(timeout))


def finish(ex: Exchange, status: int) -> None:
    """The request is over: its log file, and one console line."""
    record = ex.record
    record.finish(status)
    if ex.outcome_note:
        record.error = record.error or ex.outcome_note
    ex.state.request_log.write(record)
    chat = ex.chat
    note = f" ({ex.outcome_note})" if ex.outcome_note else ""
    log.info(
        "%s %s %s -> %s, %d attempt%s, %.2f s%s",
        ex.request_id,
        (chat.model or "-") if chat else "-",
        "stream" if chat and chat.stream else "json",
        status,
        ex.calls,
        "" if ex.calls == 1 else "s",
        record.duration or 0.0,
        note,
    )


# -- the attempt loop ---------------------------------------------------------


Attempt = Callable[[], Awaitable[Reply]]


def outcome_of(reply: Reply, stream: bool) -> Outcome:
    """What the decision core needs to know about one attempt."""
    is_stream = (stream and reply.splitter is not None) or bool(reply.events)
    error_event = reply.error_event.decode("utf-8", "replace") if reply.error_event else None
    return Outcome(
        status=reply.status,
        headers={k.lower(): v for k, v in reply.headers.items()},
        body=reply.payloads() if is_stream else reply.body.decode("utf-8", "replace"),
        stream=is_stream,
        first_content=reply.first_content,
        finish_reason=reply.finish_reason,
        stream_error_event=error_event,
        transport_error=reply.error,  # type: ignore[arg-type]
        transport_message=reply.message,
    )


async def attempt_until_decided(ex: Exchange, attempt: Attempt) -> tuple[Decision, Reply | None]:
    """Attempt, ask the decision core, and retry while it says so.

    Returns the final decision (DELIVER, FAIL or HARD_STOP) and the reply it is
    about. The circuit breaker is asked before every attempt and told the
    result of each.
    """
    state = ex.state
    breaker, policy = state.breaker, state.policy
    while True:
        permit = breaker.acquire(time.monotonic())
        state.breaker_moved(permit.transition)
        if not permit:
            wait = None
            if ex.history.attempts > 1 or ex.record.attempts:
                budget = policy.max_delay
                if policy.max_total_seconds is not None:
                    budget = min(budget, policy.max_total_seconds - ex.elapsed())
                wait = breaker.wait_or_fail(time.monotonic(), budget)
            if wait is None:
                decision = circuit_open(
                    breaker.retry_in(time.monotonic()),
                    breaker.consecutive_failures,
                    ex.last_problem,
                )
                ex.error_event("circuit_open", "CircuitOpen", decision.reason, status_code=503)
                return decision, None
            await asyncio.sleep(max(wait, 0.01))
            continue
        began = time.monotonic()
        ex.calls += 1
        try:
            reply = await attempt()
        except BaseException:
            breaker.release(time.monotonic(), permit)
            raise
        duration = time.monotonic() - began
        decision = decide(
            outcome_of(reply, ex.chat.stream if ex.chat else False),
            ex.history.at(ex.elapsed()),
            policy,
            jitter=random.random(),
            now=time.time(),
        )
        now = time.monotonic()
        if decision.counts_as_failure:
            state.breaker_moved(breaker.record_failure(now, permit))
        else:
            state.breaker_moved(breaker.record_success(now, permit))
        note_attempt(ex, reply, decision, duration)
        if decision.action is not Action.RETRY:
            return decision, reply
        reply.close()
        state.counters.retries += 1
        ex.history = ex.history.after(decision)
        await asyncio.sleep(decision.delay)


def note_attempt(ex: Exchange, reply: Reply, decision: Decision, duration: float) -> None:
    """Record one attempt in the request log, and in the error log when it went wrong."""
    recat = decision.recategorized
    recat_text = f"{recat.old} -> {recat.new} (pattern {recat.pattern!r})" if recat else ""
    problem = reply.message or decision.upstream_message
    attempt = ex.record.add_attempt(
        status=reply.status,
        duration=duration,
        action=decision.action.value,
        reason=decision.reason,
        error=problem if decision.action is not Action.DELIVER else "",
        recategorization=recat_text,
    )
    if decision.action is Action.RETRY:
        attempt.delay_before_next = decision.delay
    if ex.state.config.server.debug:
        debug_attempt(ex, attempt)
    if recat is not None and ex.state.config.response_parsing.logging.log_recategorization:
        parsing_log = ex.state.config.response_parsing.logging
        if parsing_log.enabled:
            ex.error_event(
                "recategorized",
                "StatusRecategorized",
                f"status {recat.old} treated as {recat.new}",
                status_code=reply.status,
                context={
                    "original_status": recat.old if parsing_log.include_original_status else None,
                    "new_status": recat.new if parsing_log.include_new_status else None,
                    "matched_pattern": recat.pattern
                    if parsing_log.include_matched_pattern
                    else None,
                },
            )
    if decision.action is Action.DELIVER:
        return
    code: str | int = reply.error or (decision.status if reply.status is not None else "error")
    if decision.action is Action.HARD_STOP:
        code = "hard_stop"
    elif decision.error_type == "empty_response":
        code = "empty_response"
    elif reply.error is None and decision.error_type == "connection_error":
        code = "invalid_json"  # the upstream answered, but not with JSON
    ex.last_problem = problem or decision.reason
    ex.last_code = str(code)
    retrying = decision.action is Action.RETRY
    ex.error_event(
        code,
        decision.error_type or "UpstreamError",
        decision.reason + (f": {problem}" if problem else ""),
        status_code=reply.status,
        headers={str(k): v for k, v in reply.headers.items()} or None,
        response_text=reply.body or reply.payloads() or None,
        retry_attempt=ex.history.attempts if retrying else None,
        retry_delay=decision.delay if retrying else None,
        context={"decision": decision.action.value, "attempt": ex.history.attempts},
    )


def debug_attempt(ex: Exchange, attempt: AttemptRecord) -> None:
    """``server.debug``: one console line per upstream attempt, secrets masked."""
    redact = ex.state.redactor.with_secrets(header_secrets(ex.request.headers)).text
    status = attempt.status if attempt.status is not None else "no response"
    error = f"; error: {redact(attempt.error)[:DEBUG_TEXT]}" if attempt.error else ""
    delay = attempt.delay_before_next
    log.debug(
        "%s attempt #%d: %s in %.3f s -> %s (%s)%s%s",
        ex.request_id,
        attempt.number,
        status,
        attempt.duration or 0.0,
        attempt.action,
        redact(attempt.reason)[:DEBUG_TEXT],
        f", next in {delay:.2f} s" if delay is not None else "",
        error,
    )


def failure_body(ex: Exchange, decision: Decision) -> bytes:
    """The error the client gets; an upstream text quoted in it may echo a key: masked."""
    redactor = ex.state.redactor.with_secrets(header_secrets(ex.request.headers))
    return orjson.dumps(redactor.obj(error_body(decision, ex.calls, ex.elapsed())))


def failure_response(ex: Exchange, decision: Decision) -> web.Response:
    """A FAIL or HARD_STOP decision, as the JSON error the client gets."""
    headers = {}
    if decision.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(decision.retry_after)))
    ex.outcome_note = decision.error_type or "failed"
    ex.record.error = decision.reason
    return web.Response(
        status=decision.client_status,
        body=failure_body(ex, decision),
        content_type="application/json",
        headers=headers,
    )


# -- non-streaming ------------------------------------------------------------


async def relay_json(ex: Exchange, chat: ChatRequest) -> web.StreamResponse:
    state = ex.state
    timeout = state.config.target_proxy.timeout

    def attempt() -> Awaitable[Reply]:
        return fetch(state.session, state.target_url, chat.body, chat.headers, timeout)

    decision, reply = await attempt_until_decided(ex, attempt)
    if decision.action is not Action.DELIVER or reply is None or reply.status is None:
        return failure_response(ex, decision)
    body = reply.body
    if state.rewriter.has_response_rules:
        result = await state.rewriter.rewrite_response_async(body)
        report_rule_timeouts(ex, result.timeouts)
        body = result.body
    ex.record.response_body = body
    ex.record.response_headers = reply.headers
    return web.Response(
        status=reply.status, body=body, headers=client_headers(reply.headers.items())
    )


# -- streaming ----------------------------------------------------------------


async def relay_stream(ex: Exchange, chat: ChatRequest) -> web.StreamResponse:
    """Find an upstream stream worth delivering, keeping the client's line alive meanwhile.

    Until the first content arrives nothing is committed, so failures are
    retried unseen. If that takes longer than ``stream_keepalive_seconds``, the
    response is committed and an SSE comment goes out every interval: clients
    ignore comments, and nothing in between times out. A failure after that
    commit can only be reported as an error event.
    """
    state = ex.state
    timeout = state.config.target_proxy.timeout
    interval = state.config.error_handling.stream_keepalive_seconds
    max_attempts = state.policy.max_retries + 1

    def attempt() -> Awaitable[Reply]:
        return open_stream(state.session, state.target_url, chat.body, chat.headers, timeout)

    finder = asyncio.ensure_future(attempt_until_decided(ex, attempt))
    out: web.StreamResponse | None = None
    try:
        while True:
            done, _ = await asyncio.wait({finder}, timeout=interval)
            if done:
                break
            if out is None:
                out = web.StreamResponse(status=200, headers=STREAM_HEADERS)
                await out.prepare(ex.request)
            last = ""
            if ex.last_code:
                problem = " ".join(ex.last_problem.split())  # a comment is one line
                problem = problem[:60] + ("..." if len(problem) > 60 else "")
                last = f", last error {ex.last_code}" + (f" ({problem})" if problem else "")
            n = ex.history.attempts
            # Empty and conditional retries have budgets of their own: never "5 of 3".
            doing = "retrying" if ex.last_code else "waiting for the first token"
            await out.write(comment(f"{doing}, attempt {n} of {max(max_attempts, n)}{last}"))
        decision, reply = finder.result()
    finally:
        if not finder.done():
            finder.cancel()
            with contextlib.suppress(BaseException):
                await finder
    if decision.action is not Action.DELIVER or reply is None:
        if reply is not None:
            reply.close()
        if out is None:
            return failure_response(ex, decision)
        ex.outcome_note = decision.error_type or "failed"
        ex.record.error = decision.reason
        await out.write(frame(failure_body(ex, decision)) + frame(DONE))
        await out.write_eof()
        return out
    if not (reply.events or reply.response):
        # A non-stream reply to a stream request (the upstream ignored "stream"): relay as is.
        ex.record.response_body = reply.body
        if out is None:
            return web.Response(
                status=reply.status or 200,
                body=reply.body,
                headers=client_headers(reply.headers.items()),
            )
        await out.write(frame(one_line(reply.body)) + frame(DONE))
        await out.write_eof()
        return out
    if out is None:
        out = web.StreamResponse(status=200, headers=STREAM_HEADERS)
        await out.prepare(ex.request)
    await pump(ex, out, reply)
    return out


def one_line(body: bytes) -> bytes:
    """A JSON body as one SSE data line: a pretty-printed body would break the framing."""
    try:
        return orjson.dumps(orjson.loads(body))
    except orjson.JSONDecodeError:
        return b" ".join(body.split()) or b"{}"


async def upstream_events(reply: Reply) -> AsyncIterator[bytes]:
    """The events read before the first content, then the rest as they arrive."""
    for event in reply.events:
        yield event
    resp, splitter = reply.response, reply.splitter
    if resp is None or splitter is None:
        return
    async for chunk in resp.content.iter_any():
        for event in splitter.feed(chunk):
            yield event
    rest = splitter.flush()
    if rest is not None:
        yield rest


async def pump(ex: Exchange, out: web.StreamResponse, reply: Reply) -> None:
    """Relay a stream that has content, each event written as soon as it is read.

    Events are parsed only when something needs their content: response
    rewrite rules, or the request log's record of the assembled text.
    """
    state = ex.state
    rewriting = state.rewriter.stream() if state.rewriter.has_response_rules else None
    observing = state.request_log.enabled and state.config.logging.include_response_data
    record = ex.record
    interrupted: bytes | None = None
    try:
        async for event in upstream_events(reply):
            record.stream_events += 1
            if b'"error"' in event:
                interrupted = error_after_content(ex, event)
                if interrupted is not None:
                    break
            if rewriting is None and not observing:
                await out.write(event + b"\n\n")
                continue
            data = event_data(event)
            payload = parse_event(data)
            if payload is None:
                if data == DONE and rewriting is not None:
                    for chunk in rewriting.flush():
                        observe(record, chunk)
                        await out.write(frame(orjson.dumps(chunk)))
                await out.write(event + b"\n\n")
                continue
            if rewriting is None:
                observe(record, payload)
                await out.write(event + b"\n\n")
                continue
            for chunk in rewriting.feed(payload):
                observe(record, chunk)
                await out.write(frame(orjson.dumps(chunk)))
        if rewriting is not None:
            for chunk in rewriting.flush():
                observe(record, chunk)
                await out.write(frame(orjson.dumps(chunk)))
    except TRANSPORT_ERRORS as exc:
        transport = ex.request.transport
        if transport is None or transport.is_closing():
            raise  # the client left: nobody to tell
        kind, message = describe_failure(
            exc, ex.state.target_url, state.config.target_proxy.timeout
        )
        text = (
            f"The reply was cut off: {message} The text above is incomplete; regenerate to retry."
        )
        ex.outcome_note = f"stream failed after content: {kind}"
        record.error = message
        ex.error_event(kind, "StreamInterrupted", message, context={"after_content": True})
        error_type = "timeout" if kind == "timeout" else "connection_error"
        interrupted = orjson.dumps(
            {"error": {"message": text, "type": error_type, "code": "stream_interrupted"}}
        )
    finally:
        reply.close()
    if interrupted is not None:
        await out.write(frame(interrupted) + frame(DONE))
    await out.write_eof()


def error_after_content(ex: Exchange, event: bytes) -> bytes | None:
    """The client's error event for an upstream ``{"error": ...}`` event after content.

    None when ``event`` is not an error event. Nothing can be retried once text
    has reached the client: the decision core only supplies the upstream's own
    message, or the hard-stop reply when a hard-stop rule matches.
    """
    data = event_data(event)
    payload = parse_event(data)
    if payload is None or not payload.get("error") or payload.get("choices"):
        return None
    text = (data or b"").decode("utf-8", "replace")
    decision = decide(
        Outcome(status=200, body=text, stream=True, stream_error_event=text),
        ex.history,
        ex.state.policy,
        now=time.time(),
    )
    ex.outcome_note = "stream failed after content: error event"
    ex.record.error = decision.upstream_message or decision.reason
    ex.error_event(
        "stream_error_event",
        "StreamInterrupted",
        ex.record.error,
        response_text=text,
        context={"after_content": True, "decision": decision.action.value},
    )
    if decision.action is Action.HARD_STOP:
        return failure_body(ex, decision)
    said = f": {decision.upstream_message}" if decision.upstream_message else ""
    message = (
        f"The upstream reported an error after the reply had started{said}. "
        "The text above is incomplete; regenerate to retry."
    )
    error = {
        "message": message,
        "type": decision.error_type or "upstream_error",
        "code": "stream_interrupted",
    }
    redactor = ex.state.redactor.with_secrets(header_secrets(ex.request.headers))
    return orjson.dumps(redactor.obj({"error": error}))


def parse_event(data: bytes | None) -> dict[str, Any] | None:
    if not data or data == DONE:
        return None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def observe(record: RequestRecord, payload: dict[str, Any]) -> None:
    """Keep the assembled text and finish reasons of a streamed reply for the log."""
    for choice in payload.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", 0)
        index = index if isinstance(index, int) else 0
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if isinstance(content, str) and content:
                record.add_stream_text(index, content)
        if choice.get("finish_reason"):
            record.finish_reasons[index] = choice["finish_reason"]
