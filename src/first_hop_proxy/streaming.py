"""Relaying a stream: held back until its first content, then passed on event by event.

Until the first content arrives nothing is committed, so failures are retried
unseen. A failure after content is told to the client as an error event
followed by ``data: [DONE]``, unless ``error_handling.stream_resume`` finishes
the reply: a continuation is then fetched like any attempt and joined to what
the client already has (:mod:`resume`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web

from .attempts import Attempt, attempt_until_decided, judge
from .backoff import most_attempts
from .decisions import Action, Outcome, failure_summary
from .dialects import disguised_error
from .exchange import ChatRequest, Exchange, failure_body, failure_response, note_failure
from .headers import client_headers
from .keys import Key
from .redact import clip
from .resume import Seam, Transcript, add_usage, continuation_payload
from .sse import DONE, comment, event_data, frame, parse_event
from .upstream import MB, TRANSPORT_ERRORS, Reply, failure, open_stream
from .upstreams import Upstream
from .usage import StreamUsage

T = TypeVar("T")

#: Characters of the last error quoted in a keep-alive comment.
COMMENT_PROBLEM = 60

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
    commit can only be reported as an error event; one after content may be
    resumed (:func:`resume_or_tell`).
    """
    settings = ex.settings
    policy = settings.policy
    most = most_attempts(
        policy.max_retries, policy.base_delay, policy.max_delay, policy.max_total_seconds
    )
    found, out = await keep_alive(
        ex, None, attempt_until_decided(ex, stream_attempt(ex, chat)), lambda: progress(ex, most)
    )
    decision, reply = found
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
        ex.usage = decision.usage
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
        out = await commit(ex)
    ex.record.first_content = time.monotonic() - ex.record.started_mono
    relay = Relay(ex, out)
    ended = await relay.pump(reply)
    if isinstance(ended, Break):
        await resume_or_tell(ex, chat, relay, ended, most)
    else:
        await relay.finish()
    await out.write_eof()
    return out


def stream_attempt(ex: Exchange, chat: ChatRequest) -> Attempt:
    """One streaming attempt at an upstream, read up to its first content."""
    session, title = ex.state.session, ex.settings.policy.disguise_title
    max_bytes = int(ex.settings.config.target_proxy.max_reply_mb * MB)

    def attempt(upstream: Upstream, key: Key | None) -> Awaitable[Reply]:
        body, headers = chat.for_upstream(upstream, key)
        return open_stream(session, upstream, body, headers, max_bytes, title)

    return attempt


async def commit(ex: Exchange) -> web.StreamResponse:
    """Start the client's stream: from here on, only events can tell it anything."""
    out = ex.response = web.StreamResponse(status=200, headers=STREAM_HEADERS)
    await out.prepare(ex.request)
    return out


async def keep_alive(
    ex: Exchange, out: web.StreamResponse | None, job: Awaitable[T], say: Callable[[], str]
) -> tuple[T, web.StreamResponse | None]:
    """Await ``job``, sending the client a comment every ``stream_keepalive_seconds``.

    The first comment commits the response when ``out`` is None. The job is
    cancelled (and its upstream request closed) when the client leaves.

    The handler awaits the job itself and a timer writes the comments, so a reply
    that starts within the interval (nearly all) costs no task of its own: with
    1,000 streams in flight a task and its waits per stream were 1.5 MB.
    """
    pulse = _Pulse(ex, out, say, ex.settings.config.error_handling.stream_keepalive_seconds)
    try:
        result = await job
    except asyncio.CancelledError:
        if await pulse.settle(abandon=True) and pulse.failed is not None:
            raise pulse.failed from None  # the cancel was the pulse's own: say why instead
        raise
    except BaseException:
        await pulse.settle()
        raise
    await pulse.settle()
    if pulse.failed is not None:
        raise pulse.failed
    return result, pulse.out


class _Pulse:
    """The keep-alive comments of :func:`keep_alive`: a timer, and a task only when one is due.

    A comment that cannot be written (the client left) cancels the handler's task,
    which is awaiting the job, so the job and its upstream request end at once.
    """

    __slots__ = (
        "cancelled",
        "ex",
        "failed",
        "interval",
        "loop",
        "out",
        "owner",
        "say",
        "timer",
        "writing",
    )

    def __init__(
        self,
        ex: Exchange,
        out: web.StreamResponse | None,
        say: Callable[[], str],
        interval: float,
    ) -> None:
        self.ex, self.out, self.say, self.interval = ex, out, say, interval
        self.owner = asyncio.current_task()
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(interval, self._due)
        self.writing: asyncio.Task[None] | None = None
        self.failed: BaseException | None = None
        self.cancelled = False  # whether it cancelled the owner (the handler's task)

    def _due(self) -> None:
        self.timer = None
        self.writing = self.loop.create_task(self._write())

    async def _write(self) -> None:
        try:
            if self.out is None:
                self.out = await commit(self.ex)
            await self.out.write(comment(self.say()))
        except Exception as exc:
            self.failed = exc
            if self.owner is not None:  # still awaiting the job: end it
                self.cancelled = True
                self.owner.cancel()
            return
        if self.owner is not None:  # not settled meanwhile
            self.timer = self.loop.call_later(self.interval, self._due)

    async def settle(self, *, abandon: bool = False) -> bool:
        """The job is over: no more comments, and one being written is finished first
        (two writes must never interleave) or, when the handler is being cancelled
        (``abandon``), cancelled. Returns whether the pulse cancelled the handler
        itself, a cancel that is then taken back."""
        self.owner = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        writing, self.writing = self.writing, None
        if writing is not None and not writing.done():
            if abandon:
                writing.cancel()
            try:
                await asyncio.shield(writing)
            except asyncio.CancelledError:
                if not writing.cancelled():
                    raise  # the handler's own cancel, not the comment's
        if not self.cancelled:
            return False
        self.cancelled = False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True


def progress(ex: Exchange, most: int, resuming: str = "") -> str:
    """The keep-alive comment: which attempt, and what the last one said."""
    last = ""
    if ex.last_code:
        problem = clip(ex.last_problem, COMMENT_PROBLEM, ex.mask)  # one line, masked
        last = f", last error {ex.last_code}" + (f" ({problem})" if problem else "")
        if ex.settings.several and ex.upstream is not None:
            last += f", now at {ex.upstream.name}"
    n = ex.history.attempts
    # Empty and conditional retries have budgets of their own: never "5 of 3".
    doing = "retrying" if ex.last_code else "waiting for the first token"
    about = f"{resuming}: " if resuming else ""
    return f"{about}{doing}, attempt {n} of at most {max(most, n)}{last}"


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
        reply.count(chunk)  # past target_proxy.max_reply_mb: the stream fails here
        for event in splitter.feed(chunk):
            yield event
    rest = splitter.flush()
    if rest is not None:
        yield rest


@dataclass(slots=True)
class Break:
    """A stream that ended early, after its content had started reaching the client."""

    kind: str  # connection_error, timeout, cut_short, error_event
    what: str  # what happened, for the logs
    message: str  # the start of the client's error message
    error_type: str
    #: Whether a continuation may help: the connection broke, or a retryable error came.
    resumable: bool
    #: The client's error as it must go out (a hard stop's); never resumed.
    told: bytes | None = None

    def body(self, ex: Exchange, resumed: str = "") -> bytes:
        """The client's error event; ``resumed`` says how resuming went, when it was tried."""
        if self.told is not None:
            return self.told
        message = f"{self.message}{resumed} The text above is incomplete; regenerate to retry."
        error = {"message": message, "type": self.error_type, "code": "stream_interrupted"}
        return orjson.dumps(ex.redactor().obj({"error": error}))


@dataclass(frozen=True, slots=True)
class Restart:
    """A continuation that started the reply over: dropped before any of it was sent."""

    head: str


class Relay:
    """The client's one stream, fed by the first upstream stream and any continuations.

    Events are parsed only when something needs their content: response
    rewrite rules, a continuation being joined, the usage totals (only events
    that name ``"usage"``), or (on the log writer thread) the request log's
    record of the assembled text. The response rewriter runs over the joined
    text as one text: its held-back text waits across a break for the
    continuation.
    """

    __slots__ = ("disguises", "ex", "observing", "out", "rewriting", "seam", "transcript", "usage")

    def __init__(self, ex: Exchange, out: web.StreamResponse) -> None:
        settings = ex.settings
        self.ex, self.out = ex, out
        rewriter = settings.rewriter
        self.rewriting = rewriter.stream() if rewriter.has_response_rules else None
        self.observing = (
            settings.request_log.enabled and settings.config.logging.include_response_data
        )
        if self.observing:
            settings.request_log.follow(ex.record)
        # A community proxy's error after content: a chunk whose finish_reason is its title.
        self.disguises = settings.policy.disguise_title is not None
        resuming = settings.config.error_handling.stream_resume.enabled
        self.transcript = Transcript() if resuming else None
        #: The continuation being relayed (None: the first stream).
        self.seam: Seam | None = None
        self.usage = StreamUsage(ex, ex.usage_added) if settings.config.usage.enabled else None

    async def pump(self, reply: Reply, resuming: str = "") -> Break | Restart | None:
        """Relay one upstream stream that has content, each event as soon as it is read.

        Returns how it ended: None when it ended well. A continuation's start is
        held until it is joined, with keep-alive comments (``resuming`` says
        which resume) while that takes long.
        """
        ex, out, record = self.ex, self.out, self.ex.record
        plain = self.seam is None and self.rewriting is None
        disguises = self.disguises
        keeping = self.observing or self.transcript is not None
        began = time.monotonic()
        events = upstream_events(reply)
        usage = self.usage
        if usage is not None:
            usage.begin()
        try:
            while self.seam is not None and self.seam.joined is None:
                event, _ = await keep_alive(
                    ex, out, anext(events, None), lambda: f"{resuming}: joining it to the text"
                )
                if event is None:
                    break
                record.stream_events += 1
                if usage is not None and b'"usage"' in event:
                    seen = usage.see(event)
                    if seen is None:
                        continue  # the usage chunk the proxy asked for: not the client's
                    event = seen
                ended = await self.take(event)
                if ended is not None:
                    return ended
            async for event in events:
                record.stream_events += 1
                if usage is not None and b'"usage"' in event:
                    seen = usage.see(event)
                    if seen is None:
                        continue
                    event = seen
                if plain and not (b'"error"' in event or (disguises and b"roxy " in event)):
                    if keeping:
                        data = event_data(event)
                        if data and data != DONE:
                            self.keep(data)
                    await out.write(event + b"\n\n")
                    continue
                ended = await self.take(event)
                if ended is not None:
                    return ended
            return await self.settle()
        except TRANSPORT_ERRORS as exc:
            transport = ex.request.transport
            if transport is None or transport.is_closing():
                raise  # the client left: nobody to tell
            broke = cut_off(ex, exc)
            await self.settle()
            return broke
        finally:
            reply.close()
            ex.flowing += time.monotonic() - began

    def keep(self, data: bytes) -> None:
        """An event's data relayed as it came: for the log and the reply so far."""
        if self.observing:
            self.ex.record.keep_stream_data(data)  # parsed by the log writer
        if self.transcript is not None:
            self.transcript.add_data(data)

    async def take(self, event: bytes) -> Break | Restart | None:
        """One event that needs more than passing on: checked, parsed, joined, rewritten."""
        if b'"error"' in event or (self.disguises and b"roxy " in event):
            broke = await error_after_content(self.ex, event)
            if broke is not None:
                await self.settle()
                return broke
        data = event_data(event)
        if self.seam is None and self.rewriting is None:  # it only looked like an error
            if data and data != DONE:
                self.keep(data)
            await self.out.write(event + b"\n\n")
            return None
        payload = parse_event(data)
        if payload is None:
            if data == DONE:
                restart = await self.settle()
                if restart is not None:
                    return restart
                if self.rewriting is not None:
                    await self.emit(self.rewriting.flush())
            await self.out.write(event + b"\n\n")
            return None
        if self.seam is None:
            if self.transcript is not None and data is not None:
                self.transcript.add_data(data)  # as it came, before the rules change it
            await self.send([payload])
            return None
        chunks = self.seam.take(payload)
        if chunks is None:
            return Restart(self.seam.head)
        await self.joined(chunks)
        return None

    async def settle(self) -> Restart | None:
        """Nothing more is coming: join a continuation whose start is still held."""
        seam = self.seam
        if seam is None or seam.joined is not None:
            return None
        chunks = seam.decide(final=True)
        if chunks is None:
            return Restart(seam.head)
        await self.joined(chunks)
        return None

    async def joined(self, chunks: list[dict[str, Any]]) -> None:
        """A continuation's chunks, joined: kept as the reply so far, then sent."""
        transcript = self.transcript
        assert transcript is not None  # continuations exist only when resuming
        for chunk in chunks:
            transcript.add(chunk)
            add_usage(chunk, transcript.earlier)
        await self.send(chunks)

    async def send(self, chunks: list[dict[str, Any]]) -> None:
        """Parsed chunks to the client, through the reply rules when there are some."""
        if self.rewriting is None:
            await self.emit(chunks)
            return
        for chunk in chunks:
            await self.emit(self.rewriting.feed(chunk))

    async def emit(self, chunks: list[dict[str, Any]]) -> None:
        """Write chunks out (and keep them for the log)."""
        for chunk in chunks:
            data = orjson.dumps(chunk)
            if self.observing:
                self.ex.record.keep_stream_data(data)
            await self.out.write(frame(data))

    async def finish(self) -> None:
        """The reply is over: the reply rules' held-back text goes out."""
        if self.rewriting is not None:
            await self.emit(self.rewriting.flush())
            self.ex.rule_timeouts(self.rewriting.timeouts)

    async def fail(self, broke: Break, resumed: str = "") -> None:
        """The reply is over, incomplete: the text held back, then the error and ``[DONE]``."""
        await self.finish()
        await self.out.write(frame(broke.body(self.ex, resumed)) + frame(DONE))


async def resume_or_tell(
    ex: Exchange, chat: ChatRequest, relay: Relay, broke: Break, most: int
) -> None:
    """A stream broke after content: finish the reply with continuations when
    ``error_handling.stream_resume`` is on and they can help, else tell the client."""
    settings = ex.settings
    resume = settings.config.error_handling.stream_resume
    limit = settings.policy.max_total_seconds
    first = broke
    tried: list[str] = []  # how each resume ended
    while resume.enabled and len(tried) < resume.max_resumes:
        assert relay.transcript is not None  # kept when resuming is on
        if not broke.resumable:
            unfit = "a retry cannot fix this error"
        elif limit is not None and ex.spent() >= limit:
            unfit = "the time budget (error_handling.max_total_seconds) was spent"
        else:
            unfit = relay.transcript.problem()
        if unfit:
            ex.outcome_note += f"; not resumed: {unfit}"
            break
        ended = await resume_once(ex, chat, relay, broke, len(tried) + 1, most)
        if ended is None:
            n = len(tried) + 1
            ex.ended_status = None  # the client got the whole reply after all
            ex.outcome_note = f"stream resumed {times(n)} after it broke ({first.kind})"
            await relay.finish()
            return
        if isinstance(ended, Break):
            broke = ended
            tried.append("the last try broke too")
        elif isinstance(ended, Restart):
            tried.append("the last try started the reply over")
        else:
            tried.append(f"the last try failed: {ended}")
            break
    resumed = ""
    if tried:
        resumed = f" Resuming it was tried {times(len(tried))}; {tried[-1]}."
        ex.outcome_note += f"; resuming tried {times(len(tried))}"
    await relay.fail(broke, resumed)


def times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


async def resume_once(
    ex: Exchange, chat: ChatRequest, relay: Relay, broke: Break, number: int, most: int
) -> Break | Restart | str | None:
    """One try at finishing the reply: the request again with the text so far as a
    prefill, attempted like any request (retries, failover), its stream joined on.

    Returns how it ended: None joined to the end, a Break or a Restart, or why
    no continuation came.
    """
    settings = ex.settings
    resume = settings.config.error_handling.stream_resume
    transcript = relay.transcript
    assert transcript is not None
    delivered = transcript.text()
    transcript.end_stream()
    payload = continuation_payload(chat.payload, delivered, resume.continue_instruction)
    again = ChatRequest(
        body=orjson.dumps(payload),
        parsed=payload,
        headers=chat.headers,
        stream=True,
        model=chat.model,
    )
    added = 2 if resume.continue_instruction else 1
    record = ex.record.add_resume(
        broke=broke.what,
        chars=len(delivered),
        events=ex.record.stream_events,
        first_attempt=len(ex.record.attempts) + 1,
        messages=orjson.dumps(payload["messages"][-added:]),
    )
    ex.history = ex.history.moved_on()
    ex.last_code = ex.last_problem = ""
    resuming = f"resuming the reply ({number} of at most {resume.max_resumes})"
    found, _ = await keep_alive(
        ex,
        relay.out,
        attempt_until_decided(ex, stream_attempt(ex, again)),
        lambda: progress(ex, most, resuming),
    )
    decision, reply = found
    if decision.action is not Action.DELIVER or reply is None or not reply.events:
        if reply is not None:
            reply.close()
        why = failure_summary(decision)
        if decision.action is Action.DELIVER:
            why = "the upstream answered with a whole reply, not a stream"
        record.outcome = f"failed: {why}"
        return why
    relay.seam = Seam(delivered, transcript.first)
    ended = await relay.pump(reply, resuming)
    record.cut = relay.seam.cut_text
    if ended is None:
        record.outcome = "joined"
    elif isinstance(ended, Restart):
        record.outcome = "started the reply over: dropped unseen"
        attempt = ex.record.attempts[-1]
        attempt.action, attempt.reason = "dropped", "the continuation started the reply over"
        attempt.reply = ended.head.encode()
        ex.error_event(
            "resume_restarted",
            "ResumeRestarted",
            "A stream's continuation started the reply over; it was dropped unseen",
            response_text=ended.head,
        )
    else:
        record.outcome = f"broke again: {ended.what}"
    return ended


def cut_off(ex: Exchange, exc: BaseException) -> Break:
    """The break for a transport failure after content (reset, cut short, silence)."""
    assert ex.upstream is not None  # the one whose stream this is
    kind, message = failure(exc, ex.upstream)
    ex.outcome_note = f"stream failed after content: {kind}"
    ex.ended_status = 504 if kind == "timeout" else 502
    ex.record.error = message
    ex.error_event(kind, "StreamInterrupted", message, context={"after_content": True})
    return Break(
        kind=kind,
        what=f"{kind}: {message}",
        message=f"The reply was cut off: {message}",
        error_type="timeout" if kind == "timeout" else "connection_error",
        resumable=True,
    )


async def error_after_content(ex: Exchange, event: bytes) -> Break | None:
    """The break for an upstream error event after content.

    An error event is ``{"error": ...}``, or a chunk whose ``finish_reason`` is a
    community proxy's error title (:mod:`dialects`): its text is an error, not
    more of the reply. None when ``event`` is neither. Nothing can be retried
    once text has reached the client: the decision core supplies the upstream's
    own message and status, whether a retry could help (a continuation can
    then), or the hard-stop reply when a hard-stop rule matches.
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
    decision = await judge(
        ex,
        Outcome(status=200, body=text, stream=True, stream_error_event=text, json=payload),
        ex.history,
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
    what = f"error event: {ex.record.error}"
    if decision.action is Action.HARD_STOP:
        ex.state.stats.hard_stops += 1
        told = failure_body(ex, decision)
        return Break("error_event", what, "", "hard_stop_error", resumable=False, told=told)
    said = f": {decision.upstream_message}" if decision.upstream_message else ""
    retryable = decision.action is Action.RETRY or (
        decision.action is Action.FAIL and decision.gave_up is not None
    )
    return Break(
        kind="error_event",
        what=what,
        message=f"The upstream reported an error after the reply had started{said}.",
        error_type=decision.error_type or "upstream_error",
        resumable=retryable,
    )
