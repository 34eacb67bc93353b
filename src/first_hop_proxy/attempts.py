"""The attempt loop: attempt, ask the decision core, and do what it says.

This is the I/O shell around :func:`decisions.decide` and :mod:`routing`: the
upstreams' circuit breakers are asked and told, and every attempt is recorded
in the request log (and in the error log when it went wrong).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable

from .breaker import RETRY, Permit
from .decisions import (
    Action,
    Decision,
    History,
    Outcome,
    circuit_open,
    decide,
    failure_summary,
    no_key,
)
from .exchange import Exchange
from .keys import Key, Step
from .logs.request_log import AttemptRecord
from .redact import clip
from .routing import Route, failover_cause
from .upstream import Reply
from .upstreams import Upstream

log = logging.getLogger("first_hop_proxy")

DEBUG_TEXT = 300  # characters of upstream text in a debug line

Attempt = Callable[[Upstream, Key | None], Awaitable[Reply]]


def outcome_of(reply: Reply, stream: bool) -> Outcome:
    """What the decision core needs to know about one attempt."""
    is_stream = (stream and reply.splitter is not None) or bool(reply.events)
    error_event = reply.error_event.decode("utf-8", "replace") if reply.error_event else None
    return Outcome(
        status=reply.status,
        headers=reply.headers,  # case-blind: the decision core asks by lowercase names
        body=reply.payloads() if is_stream else reply.body.decode("utf-8", "replace"),
        stream=is_stream,
        first_content=reply.first_content,
        finish_reason=reply.finish_reason,
        stream_error_event=error_event,
        transport_error=reply.error,  # type: ignore[arg-type]
        transport_message=reply.message,
    )


async def judge(ex: Exchange, outcome: Outcome, history: History) -> Decision:
    """The decision core's verdict on ``outcome``, this request's secrets masked in it.

    Patterns that cannot run away keep it on the event loop; otherwise it runs
    in a worker thread (the ``regex`` module lets go of the GIL while it
    matches), so a pattern at its time limit never stalls other requests.
    A rule that ran out of time is logged.
    """
    policy = ex.settings.policy
    jitter, now, mask = random.random(), time.time(), ex.mask
    if policy.may_run_away(outcome):
        judging = functools.partial(decide, jitter=jitter, now=now, mask=mask)
        decision = await asyncio.to_thread(judging, outcome, history, policy)
    else:
        decision = decide(outcome, history, policy, jitter=jitter, now=now, mask=mask)
    if decision.timeouts:
        ex.rule_timeouts(list(decision.timeouts))
    return decision


async def attempt_until_decided(ex: Exchange, attempt: Attempt) -> tuple[Decision, Reply | None]:
    """Attempt, ask the decision core, and retry (or move on) while it says so.

    Returns the final decision (DELIVER, FAIL or HARD_STOP) and the reply it is
    about. The request goes round the upstreams that serve its model
    (:mod:`routing`): it moves on when retrying where it is cannot help soon
    (``routing.failover_on``), starting a new round, after the backoff delay,
    once every one was tried. Each upstream's circuit breaker admits the
    request (or refuses it at once) and is told the result of every attempt;
    the request's own retries are never refused by it (:data:`breaker.RETRY`):
    the breaker protects the next requests.
    """
    state, settings = ex.state, ex.settings
    routing = settings.config.routing
    model = ex.chat.model if ex.chat is not None else ""
    rotation = state.next_rotation() if routing.strategy == "round_robin" else 0
    route = Route(settings.candidates(model, rotation))
    admitted: set[str] = set()
    failures: dict[str, int] = {}  # retryable failures per upstream
    while True:
        upstream = ex.upstream = route.current
        route.mark_tried()
        breaker = upstream.breaker
        permit = RETRY
        if upstream.name not in admitted:
            permit = breaker.acquire(time.monotonic())
            state.breaker_moved(upstream, permit.transition)
            if not permit:
                decision = circuit_open(
                    breaker.retry_in(time.monotonic()),
                    breaker.consecutive_failures,
                    breaker.last_failure,
                )
                summary = f"circuit open; the last error: {breaker.last_failure}"
                if moved_on(ex, route, decision, summary, "circuit_open", "CircuitOpen"):
                    continue
                return decision, None
            admitted.add(upstream.name)
        pool, key = upstream.keys, None
        if pool is not None:
            key = pool.pick(time.time())
            if key is None:
                blocked = pool.blocked(time.time())
                if blocked.kind == "cooling" and fits(ex, blocked.wait):
                    await asyncio.sleep(blocked.wait)  # the soonest key; no other is ready
                    continue
                decision = no_key(blocked.kind, blocked.wait, blocked.message)
                if moved_on(ex, route, decision, blocked.message, "no_key", "NoKeyReady"):
                    continue
                return decision, None
            ex.key_label = key.label
        began = time.monotonic()
        ex.calls += 1
        reply: Reply | None = None
        try:
            reply = await attempt(upstream, key)
            duration = time.monotonic() - began
            outcome = outcome_of(reply, ex.chat.stream if ex.chat else False)
            decision = await judge(ex, outcome, ex.history.at(ex.spent()))
        except BaseException:
            breaker.release(time.monotonic(), permit)
            if reply is not None:
                reply.close()
            raise
        note_outcome(ex, upstream, permit, decision, duration)
        note_attempt(ex, reply, decision, duration)
        count_attempt(ex, upstream, decision, duration)
        step = pool.record(key, decision, time.time()) if pool and key else Step.STAY
        if decision.action is Action.DELIVER:
            return decision, reply
        if pool is not None and step is Step.NEXT_KEY:
            if pool.has_ready(time.time()):  # the same request at once, with another key
                reply.close()
                state.counters.retries += decision.action is Action.RETRY
                ex.history = ex.history.after(decision)
                continue
            if decision.action is not Action.RETRY:  # that was the last ready key
                blocked = pool.blocked(time.time())
                decision = no_key(blocked.kind, blocked.wait, blocked.message)
                ex.tried[upstream.name] = blocked.message
        if switch_json_mode(ex, upstream, reply, decision):
            reply.close()
            ex.history = ex.history.moved_on()
            continue
        here = failures[upstream.name] = failures.get(upstream.name, 0) + (
            decision.action is Action.RETRY
        )
        cause = failover_cause(decision, here, routing.retries_per_upstream)
        moving = cause is not None and cause in routing.failover_on and route.alternatives
        if decision.action is not Action.RETRY:
            if moving and route.next_untried():
                reply.close()
                ex.history = ex.history.moved_on()
                continue
            return decision, reply
        reply.close()
        state.counters.retries += 1
        ex.history = ex.history.after(decision)
        if moving and not route.next_round():
            continue  # another upstream, at once: the wait is for the same one
        await asyncio.sleep(decision.delay)
        # Logged once taken: a wait cut short by the client leaving was not a delay.
        ex.record.attempts[-1].delay_before_next = decision.delay


def moved_on(
    ex: Exchange, route: Route[Upstream], refusal: Decision, summary: str, code: str, kind: str
) -> bool:
    """An upstream refused the request before any attempt (its breaker is open, no key is
    ready): move on to one not tried yet when routing allows; else log the refusal."""
    assert ex.upstream is not None
    ex.tried[ex.upstream.name] = summary
    cause = failover_cause(refusal, 0, 1)
    if cause in ex.settings.config.routing.failover_on and route.next_untried():
        return True
    ex.error_event(code, kind, summary, status_code=503)
    return False


def fits(ex: Exchange, wait: float) -> bool:
    """Whether waiting ``wait`` seconds stays within max_delay and the time budget."""
    policy = ex.settings.policy
    limit = policy.max_total_seconds
    return wait <= policy.max_delay and (limit is None or ex.spent() + wait <= limit)


def is_cdn_timeout(reply: Reply) -> bool:
    """A CDN (or proxy) in front of the upstream gave up waiting for a slow reply:
    Cloudflare's 524 page, or a 504 HTML page."""
    if reply.status == 524:
        return True
    kind = reply.headers.get("Content-Type", "")
    return reply.status == 504 and "html" in kind.lower()


def switch_json_mode(ex: Exchange, upstream: Upstream, reply: Reply, decision: Decision) -> bool:
    """For a JSON request: whether to send it again at once, switched between JSON and a
    stream assembled into JSON (``stream_upstream``), and remember the switch."""
    chat = ex.chat
    if chat is None or chat.stream:
        return False
    model = chat.model
    if reply.assembled:
        refused = reply.status is not None and 400 <= reply.status < 500
        if refused and b"stream" in reply.body.lower():
            upstream.json_only.add(model)  # this upstream or model does not stream
            log.warning(
                "upstream %s refused a stream for %s; its JSON requests for it go as JSON",
                upstream.name,
                model or "this model",
            )
            return True
        return False
    if upstream.stream_mode != "auto" or upstream.streams_json(model):
        return False
    if is_cdn_timeout(reply) or "streaming required" in decision.upstream_message.lower():
        if model in upstream.json_only:
            return False
        upstream.streaming_json = True
        log.warning(
            "upstream %s: a JSON reply was cut by the CDN in front of it (or it asked for "
            "streaming); from now on JSON requests to it go upstream as streams and are "
            "assembled into one JSON reply",
            upstream.name,
        )
        return True
    return False


def note_outcome(
    ex: Exchange, upstream: Upstream, permit: Permit, decision: Decision, duration: float
) -> None:
    """Tell the upstream's breaker and record how the attempt went."""
    now = time.monotonic()
    failed = decision.counts_as_failure
    if failed:
        moved = upstream.breaker.record_failure(now, permit, failure_summary(decision))
    else:
        moved = upstream.breaker.record_success(now, permit)
        if decision.counts_as_success:
            upstream.last_answer = time.time()
    ex.state.breaker_moved(upstream, moved)
    if decision.action is not Action.ABANDON:
        upstream.record.add(not failed, duration)
    if decision.action is not Action.DELIVER:
        ex.tried[upstream.name] = failure_summary(decision)


def count_attempt(ex: Exchange, upstream: Upstream, decision: Decision, duration: float) -> None:
    """The attempt in the running figures and, for whoever watches, the live feed."""
    state = ex.state
    action = decision.action
    state.stats.attempt(
        upstream.name,
        action=action.value,
        duration=duration,
        retry_reason=ex.last_code if action is Action.RETRY else "",
        recategorized=decision.recategorized is not None,
        empty=decision.error_type == "empty_response",
    )
    if state.hub.subscribers:
        state.hub.attempted(ex.record)


def note_attempt(ex: Exchange, reply: Reply, decision: Decision, duration: float) -> None:
    """Record one attempt in the request log, and in the error log when it went wrong."""
    recat = decision.recategorized
    recat_text = f"{recat.old} -> {recat.new} (pattern {recat.pattern!r})" if recat else ""
    problem = reply.message or decision.upstream_message
    attempt = ex.record.add_attempt(
        upstream=ex.upstream.name if ex.upstream is not None else "",
        key=ex.key_label,
        status=reply.status,
        duration=duration,
        action=decision.action.value,
        reason=decision.reason,
        error=problem if decision.action is not Action.DELIVER else "",
        recategorization=recat_text,
    )
    if decision.action is not Action.DELIVER:
        attempt.reply = reply.body or reply.payloads().encode()
    if reply.comments:
        attempt.note = (
            f"{reply.comments} comment(s), {reply.comment_bytes:,} bytes, before the first "
            f"token (queue heartbeats?), the first: {reply.first_comment!r}"
        )
    if ex.settings.config.server.debug:
        debug_attempt(ex, attempt, decision.delay if decision.action is Action.RETRY else None)
    if recat is not None and ex.settings.config.response_parsing.logging.log_recategorization:
        parsing_log = ex.settings.config.response_parsing.logging
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
    ex.last_code = attempt.code = str(code)
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


def debug_attempt(ex: Exchange, attempt: AttemptRecord, delay: float | None) -> None:
    """``server.debug``: one console line per upstream attempt, secrets masked."""
    status = attempt.status if attempt.status is not None else "no response"
    error = f"; error: {clip(attempt.error, DEBUG_TEXT, ex.mask)}" if attempt.error else ""
    log.debug(
        "%s attempt #%d: %s in %.3f s -> %s (%s)%s%s",
        ex.request_id,
        attempt.number,
        status,
        attempt.duration or 0.0,
        attempt.action,
        clip(attempt.reason, DEBUG_TEXT, ex.mask),
        f", next in {delay:.2f} s" if delay is not None else "",
        error,
    )
