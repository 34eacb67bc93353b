"""Relaying a stream: held back until its first content, then passed on event by event.

Until the first content arrives nothing is committed, so failures are retried
unseen; a failure after content can only be told to the client as an error
event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import orjson
from aiohttp import web

from .attempts import attempt_until_decided
from .backoff import most_attempts
from .decisions import Action, Outcome, decide
from .dialects import disguised_error
from .errors import error_body
from .exchange import ChatRequest, Exchange, failure_body, failure_response, note_failure
from .headers import client_headers
from .keys import Key
from .sse import DONE, comment, event_data, frame, parse_event
from .upstream import TRANSPORT_ERRORS, Reply, failure, open_stream
from .upstreams import Upstream

STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def relay_stream(ex: Exchange, chat: ChatRequest) -> web.StreamResponse:
    """Find an upstream stream worth delivering, keeping the client's line alive meanwhile.

    Until the first content arrives nothing is committed, so failures are
    retried unseen. If that takes longer than ``stream_keepalive_seconds``, the
    response is committed and an SSE comment goes out every interval: clients
    ignore comments, and nothing in between times out. A failure after that
    commit can only be reported as an error event.
    """
    settings, session = ex.settings, ex.state.session
    interval = settings.config.error_handling.stream_keepalive_seconds
    policy = settings.policy
    max_attempts = most_attempts(
        policy.max_retries, policy.base_delay, policy.max_delay, policy.max_total_seconds
    )

    def attempt(upstream: Upstream, key: Key | None) -> Awaitable[Reply]:
        body, headers = chat.for_upstream(upstream, key)
        return open_stream(session, upstream, body, headers, policy.disguise_title)

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
                if settings.several and ex.upstream is not None:
                    last += f", now at {ex.upstream.name}"
            n = ex.history.attempts
            # Empty and conditional retries have budgets of their own: never "5 of 3".
            doing = "retrying" if ex.last_code else "waiting for the first token"
            await out.write(
                comment(f"{doing}, attempt {n} of at most {max(max_attempts, n)}{last}")
            )
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
        note_failure(ex, decision)
        ex.ended_status = decision.client_status
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
    settings = ex.settings
    rewriting = settings.rewriter.stream() if settings.rewriter.has_response_rules else None
    observing = settings.request_log.enabled and settings.config.logging.include_response_data
    record = ex.record
    record.first_content = time.monotonic() - record.started_mono
    interrupted: bytes | None = None
    # A community proxy's error after content: a chunk whose finish_reason is its title.
    disguises = settings.policy.disguise_title is not None

    async def emit(chunks: list[dict[str, Any]]) -> None:
        """Send chunks the reply rules produced (and keep their text for the log)."""
        for chunk in chunks:
            if observing:
                record.add_chunk(chunk)
            await out.write(frame(orjson.dumps(chunk)))

    try:
        async for event in upstream_events(reply):
            record.stream_events += 1
            if b'"error"' in event or (disguises and b"roxy " in event):
                interrupted = error_after_content(ex, event)
                if interrupted is not None:
                    break
            if rewriting is None:
                if observing:
                    data = event_data(event)
                    if data and data != DONE:
                        record.stream_data.append(data)  # parsed later, by the log writer
                await out.write(event + b"\n\n")
                continue
            data = event_data(event)
            payload = parse_event(data)
            if payload is None:
                if data == DONE:
                    await emit(rewriting.flush())
                await out.write(event + b"\n\n")
                continue
            await emit(rewriting.feed(payload))
        if rewriting is not None:
            await emit(rewriting.flush())
            ex.rule_timeouts(rewriting.timeouts)
    except TRANSPORT_ERRORS as exc:
        transport = ex.request.transport
        if transport is None or transport.is_closing():
            raise  # the client left: nobody to tell
        assert ex.upstream is not None  # the one whose stream this is
        kind, message = failure(exc, ex.upstream)
        text = (
            f"The reply was cut off: {message} The text above is incomplete; regenerate to retry."
        )
        ex.outcome_note = f"stream failed after content: {kind}"
        ex.ended_status = 504 if kind == "timeout" else 502
        record.error = message
        ex.error_event(kind, "StreamInterrupted", message, context={"after_content": True})
        error_type = "timeout" if kind == "timeout" else "connection_error"
        interrupted = error_body(text, error_type, "stream_interrupted")
    finally:
        reply.close()
    if interrupted is not None:
        await out.write(frame(interrupted) + frame(DONE))
    await out.write_eof()


def error_after_content(ex: Exchange, event: bytes) -> bytes | None:
    """The client's error event for an upstream error event after content.

    An error event is ``{"error": ...}``, or a chunk whose ``finish_reason`` is a
    community proxy's error title (:mod:`dialects`): its text is an error, not
    more of the reply. None when ``event`` is neither. Nothing can be retried
    once text has reached the client: the decision core only supplies the
    upstream's own message and status, or the hard-stop reply when a hard-stop
    rule matches.
    """
    data = event_data(event)
    payload = parse_event(data)
    if payload is None:
        return None
    is_error = bool(payload.get("error")) and not payload.get("choices")
    title = ex.settings.policy.disguise_title
    if not is_error and (
        title is None or disguised_error(payload, title=title, anywhere=False) is None
    ):
        return None
    text = (data or b"").decode("utf-8", "replace")
    decision = decide(
        Outcome(status=200, body=text, stream=True, stream_error_event=text, json=payload),
        ex.history,
        ex.settings.policy,
        now=time.time(),
    )
    ex.outcome_note = "stream ended with an error event after content"
    ex.ended_status = decision.status
    ex.record.error = decision.upstream_message or decision.reason
    ex.error_event(
        "stream_error_event",
        "StreamInterrupted",
        ex.record.error,
        status_code=decision.status,
        response_text=text,
        context={"after_content": True, "outcome": "stream ended with an error event"},
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
    return orjson.dumps(ex.redactor().obj({"error": error}))
