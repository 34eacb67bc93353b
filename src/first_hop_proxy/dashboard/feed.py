"""``GET /dashboard/api/events``: the live feed as server-sent events.

On connecting a page gets a ``snapshot`` (requests running and recently
finished) and the ``health`` figures; then a ``request`` event each time a
request starts, tries or ends, and fresh ``health`` figures at most once a
second after requests end (and every few seconds regardless, which also keeps
the connection alive). A page that falls behind gets a new snapshot instead of
the events it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from aiohttp import web

from ..errors import error_response
from ..state import STATE, State
from .health import health

HEALTH_AFTER_REQUESTS = 1.0  # seconds: fresh figures this soon after requests ended
HEALTH_EVERY = 5.0  # seconds: fresh figures (and a keep-alive) at least this often
HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
}


def event(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def snapshot_events(state: State) -> bytes:
    return event("snapshot", state.hub.snapshot()) + event("health", health(state))


async def events(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    hub = state.hub
    subscriber = hub.subscribe()
    if subscriber is None:
        return error_response(
            503,
            "Too many dashboard pages are open on this proxy; close one and reload.",
            "server_error",
            "too_many_watchers",
        )
    loop = asyncio.get_running_loop()
    out = web.StreamResponse(headers=HEADERS)
    try:
        await out.prepare(request)
        await out.write(snapshot_events(state))
        last_health, seen = loop.time(), hub.finished_count
        while not subscriber.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(subscriber.ready.wait(), HEALTH_AFTER_REQUESTS)
            if subscriber.closed:
                break
            if subscriber.behind:
                subscriber.behind = False
                subscriber.take()
                await out.write(snapshot_events(state))
                last_health, seen = loop.time(), hub.finished_count
                continue
            data = b"".join(subscriber.take())
            now = loop.time()
            moved = hub.finished_count != seen and now - last_health >= HEALTH_AFTER_REQUESTS
            if moved or now - last_health >= HEALTH_EVERY:
                data += event("health", health(state))
                last_health, seen = now, hub.finished_count
            if data:
                await out.write(data)
    except ConnectionError:
        pass  # the page went away
    finally:
        hub.unsubscribe(subscriber)
    return out
