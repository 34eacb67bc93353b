"""``POST /chat/completions``: check the request, forward it, relay the answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .errors import error_response
from .headers import client_headers, upstream_headers
from .sse import frame
from .state import STATE, State
from .upstream import Reply, fetch, open_stream


@dataclass(slots=True, eq=False)
class ChatRequest:
    """A checked chat request, ready to forward."""

    body: bytes
    payload: dict[str, Any]
    headers: CIMultiDict[str]
    stream: bool
    model: str


def bad_request(message: str, code: str) -> web.Response:
    return error_response(400, message, "invalid_request_error", code)


async def read_chat_request(request: web.Request, state: State) -> ChatRequest | web.Response:
    """Parse and check the body; a bad one gets a 400 that says what is wrong."""
    body = await request.read()
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
    headers = upstream_headers(request.headers, state.config.target_proxy.headers)
    model = payload.get("model")
    return ChatRequest(
        body=body,
        payload=payload,
        headers=headers,
        stream=payload.get("stream") is True,
        model=model if isinstance(model, str) else "",
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    chat = await read_chat_request(request, state)
    if isinstance(chat, web.Response):
        return chat
    if chat.stream:
        return await relay_stream(request, state, chat)
    return await relay_json(state, chat)


def failure_response(reply: Reply) -> web.Response:
    """A transport failure, as the error the client gets."""
    if reply.error == "timeout":
        return error_response(504, reply.message, "timeout", "upstream_timeout")
    return error_response(502, reply.message, "connection_error", reply.error)


async def relay_json(state: State, chat: ChatRequest) -> web.Response:
    target = state.config.target_proxy
    reply = await fetch(state.session, state.target_url, chat.body, chat.headers, target.timeout)
    if reply.error is not None:
        return failure_response(reply)
    assert reply.status is not None
    return web.Response(status=reply.status, body=reply.body, headers=client_headers(reply.headers.items()))


async def relay_stream(request: web.Request, state: State, chat: ChatRequest) -> web.StreamResponse:
    target = state.config.target_proxy
    reply = await open_stream(
        state.session, state.target_url, chat.body, chat.headers, target.timeout
    )
    if reply.error is not None and not reply.events:
        return failure_response(reply)
    if reply.status is not None and not (200 <= reply.status < 300) or not reply.events and not reply.first_content and reply.body:
        return web.Response(status=reply.status or 502, body=reply.body, headers=client_headers(reply.headers.items()))
    return await pump(request, reply)


STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def pump(request: web.Request, reply: Reply) -> web.StreamResponse:
    """Relay a stream that has content: the buffered events, then the rest as it comes."""
    out = web.StreamResponse(status=200, headers=STREAM_HEADERS)
    await out.prepare(request)
    try:
        for event in reply.events:
            await out.write(event + b"\n\n")
        resp, splitter = reply.response, reply.splitter
        if resp is not None and splitter is not None:
            async for chunk in resp.content.iter_any():
                for event in splitter.feed(chunk):
                    await out.write(event + b"\n\n")
            rest = splitter.flush()
            if rest is not None:
                await out.write(rest + b"\n\n")
    finally:
        reply.close()
    await out.write_eof()
    return out


def stream_error_event(message: str, type_: str, code: str) -> bytes:
    return frame(orjson.dumps({"error": {"message": message, "type": type_, "code": code}}))
