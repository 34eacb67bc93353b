"""``POST /chat/completions``: check the request, forward it until a reply can be delivered.

The body is checked and rewritten here; the attempts go through
:mod:`attempts` (the decision core's I/O shell); a JSON reply is relayed here
and a stream by :mod:`streaming`. The request's log file and console line are
written when it ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

import orjson
from aiohttp import web

from . import console
from .attempts import attempt_until_decided
from .decisions import Action
from .errors import error_response
from .exchange import ChatRequest, Exchange, failure_response
from .headers import client_headers, forwardable
from .keys import Key
from .logs.request_log import RequestRecord
from .shutdown import DRAIN, end_reply
from .state import REQUEST_ID, STATE
from .streaming import relay_stream
from .upstream import MB, Reply, fetch, fetch_assembled
from .upstreams import Upstream
from .usage import ask_for_usage, count_request

log = logging.getLogger("first_hop_proxy")

#: Characters of the client's model name shown on the console.
MODEL_LIMIT = 100


@dataclass(frozen=True, slots=True)
class BadRequest:
    message: str
    code: str


def parse_chat_request(body: bytes, ex: Exchange) -> ChatRequest | BadRequest:
    """Parse and check the body; a bad one gets a 400 that says what is wrong."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return BadRequest(
            f"The request body is not valid JSON ({exc}). Send an OpenAI chat completions "
            "request: a JSON object with a 'messages' list.",
            "invalid_json",
        )
    if not isinstance(payload, dict):
        return BadRequest(
            f"The request body is JSON but not an object (got {type(payload).__name__}). "
            "Send a JSON object with a 'messages' list.",
            "invalid_body",
        )
    messages = payload.get("messages")
    if messages is None:
        return BadRequest(
            "The request has no 'messages' field: a chat completion needs a list of messages.",
            "missing_messages",
        )
    if not isinstance(messages, list):
        return BadRequest(
            f"'messages' must be a list of message objects (got {type(messages).__name__}).",
            "invalid_messages",
        )
    model = payload.get("model")
    return ChatRequest(
        body=body,
        parsed=payload,
        headers=forwardable(ex.request.headers, ex.settings.access.consumed_headers),
        stream=payload.get("stream") is True,
        model=model if isinstance(model, str) else "",
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.writer.behind:  # failure logs are never dropped: wait until they are written
        await state.writer.wait_for_room()
    record = RequestRecord(
        request.get(REQUEST_ID) or "-",
        request.path,
        client=request.remote,
        headers=request.headers,
    )
    ex = Exchange(state, state.settings, request, record)
    drain = request.app[DRAIN]
    status, size = 500, 0
    drain.enter(ex)
    try:
        response = await (end_reply(ex) if drain.stopping else handle(ex))
        status, size = response.status, reply_size(response)
        return response
    except web.HTTPException as exc:  # e.g. 413 from reading a body over max_body_mb
        status = exc.status
        raise
    except asyncio.CancelledError:
        if not drain.ended(ex):
            status = 499
            ex.outcome_note = "client went away"
            raise
        # Ended by the shutdown, not by the client: it gets its last words.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        response = await end_reply(ex)
        status = response.status
        return response
    finally:
        drain.leave(ex)
        finish(ex, status, size)


def reply_size(response: web.StreamResponse) -> int:
    """Bytes of the reply: a JSON body, or what a finished stream wrote."""
    if isinstance(response, web.Response):
        body = response.body
        return len(body) if isinstance(body, (bytes, bytearray)) else 0  # a tuple: see headers
    return response.body_length


async def handle(ex: Exchange) -> web.StreamResponse:
    body = await read_body(ex)
    if body is None:
        return too_slow(ex)
    ex.record.body = body
    chat = parse_chat_request(body, ex)
    if isinstance(chat, BadRequest):
        return bad_request(ex, chat)
    ex.chat = chat
    ex.record.model, ex.record.stream = chat.model, chat.stream
    ex.state.hub.started(ex.record, ex.redactor)
    upstreams = ex.settings.upstreams
    if not any(u.serves(chat.model) for u in upstreams):
        message = (
            f"No upstream serves the model {chat.model!r}. The upstreams serve: "
            + "; ".join(f"{u.name}: {', '.join(u.patterns or ['any'])}" for u in upstreams)
            + " (upstreams[].models in config.yaml)."
        )
        ex.outcome_note = "no upstream serves the model"
        ex.error_event("model_not_served", "ModelNotServed", message, status_code=404)
        return error_response(404, message, "invalid_request_error", "model_not_served")
    problem = await rewrite_request(ex, chat)
    if problem is not None:
        return bad_request(ex, problem)
    if ex.settings.config.server.debug:
        redactor = ex.redactor()
        log.debug(
            "%s -> POST %s, %d bytes, headers %s",
            ex.request_id,
            ", ".join(redactor.url(u.url) for u in upstreams if u.serves(chat.model)),
            len(chat.body),
            redactor.headers(chat.headers),
        )
    if chat.stream:
        ex.usage_added = ask_for_usage(ex.settings.config.usage, chat)
        return await relay_stream(ex, chat)
    return await relay_json(ex, chat)


async def read_body(ex: Exchange) -> bytes | None:
    """The request body, or None when it takes longer than ``server.client_timeout``."""
    request = ex.request
    if request.content.is_eof():  # all of it has arrived: nothing to time
        return await request.read()
    try:
        async with asyncio.timeout(ex.state.config.server.client_timeout):
            return await request.read()
    except TimeoutError:
        return None


def too_slow(ex: Exchange) -> web.Response:
    """A 408 for a body that did not arrive in time; the connection is closed."""
    seconds = ex.state.config.server.client_timeout
    message = (
        f"The request body did not arrive within server.client_timeout ({seconds:g} s). "
        "The connection is closed."
    )
    ex.outcome_note = "request body too slow"
    ex.error_event("request_timeout", "RequestTimeout", message, status_code=408)
    response = error_response(408, message, "invalid_request_error", "request_timeout")
    response.force_close()
    return response


def bad_request(ex: Exchange, problem: BadRequest) -> web.Response:
    ex.outcome_note = "bad request"
    ex.error_event("bad_request", "BadRequest", problem.message, status_code=400)
    return error_response(400, problem.message, "invalid_request_error", problem.code)


async def rewrite_request(ex: Exchange, chat: ChatRequest) -> BadRequest | None:
    rewriter = ex.settings.rewriter
    if not rewriter.has_request_rules:
        return None
    result = await rewriter.rewrite_messages_async(chat.payload, len(chat.body))
    ex.rule_timeouts(result.timeouts)
    if result.changed:
        try:
            body = orjson.dumps(chat.payload)
        except orjson.JSONEncodeError:  # orjson encodes at most 255 levels
            return BadRequest(
                "The request body nests more than 255 levels deep, so the proxy cannot "
                "encode it again after its regex_replacement rules changed a message. "
                "Send a flatter body.",
                "body_too_deep",
            )
        ex.record.original_body = chat.body
        chat.body = ex.record.body = body
    return None


def finish(ex: Exchange, status: int, size: int = 0) -> None:
    """The request is over: its figures, the live feed, its log file, one console line."""
    record = ex.record
    if ex.ended_status is not None and ex.ended_status != status:
        record.client_status = status
        status = ex.ended_status
    record.finish(status)
    record.outcome = ex.outcome_note
    if ex.outcome_note:
        record.error = record.error or ex.outcome_note
    upstream = ex.upstream.name if ex.upstream is not None else ""
    ex.state.stats.request(upstream, status, record.ended_wall or 0.0, record.first_content)
    ex.state.hub.finished(record, upstream, size, ex.redactor)
    ex.settings.request_log.write(record)
    count_request(ex, status)
    chat = ex.chat
    note = f" ({ex.outcome_note})" if ex.outcome_note else ""
    via = f" via {ex.upstream.name}" if ex.upstream is not None and ex.settings.several else ""
    console.info(
        log,
        "%s %s %s -> %s%s, %d attempt%s, %.2f s%s",
        ex.request_id,
        console.ClientText(chat.model, MODEL_LIMIT, ex.request.headers, ex.settings.redactor)
        if chat
        else "-",
        "stream" if chat and chat.stream else "json",
        status,
        via,
        ex.calls,
        "" if ex.calls == 1 else "s",
        record.duration or 0.0,
        note,
    )


async def relay_json(ex: Exchange, chat: ChatRequest) -> web.StreamResponse:
    session, rewriter = ex.state.session, ex.settings.rewriter
    max_bytes = int(ex.settings.config.target_proxy.max_reply_mb * MB)

    def attempt(upstream: Upstream, key: Key | None) -> Awaitable[Reply]:
        if upstream.streams_json(chat.model):  # stream_upstream: assembled into one reply
            body, headers = chat.for_upstream(upstream, key, as_stream=True)
            return fetch_assembled(session, upstream, body, headers, max_bytes)
        body, headers = chat.for_upstream(upstream, key)
        return fetch(session, upstream, body, headers, max_bytes)

    decision, reply = await attempt_until_decided(ex, attempt)
    if decision.action is not Action.DELIVER or reply is None or reply.status is None:
        return failure_response(ex, decision)
    body = reply.body
    ex.usage = decision.usage  # parsed once, by the decision core
    if rewriter.has_response_rules:
        result = await rewriter.rewrite_response_async(body)
        ex.rule_timeouts(result.timeouts)
        body = result.body
    ex.record.response_body = body
    ex.record.response_headers = reply.headers
    return web.Response(
        status=reply.status, body=body, headers=client_headers(reply.headers.items())
    )
