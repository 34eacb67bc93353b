"""Stopping gracefully: requests in progress get ``server.shutdown_grace_seconds`` to
finish; whatever is still open then is ended with a message, never cut off.

A stream cut off mid-reply shows the person half a sentence and nothing else.
After the grace, each chat request still in progress is told to end: a stream
that has started gets an error event saying the proxy is shutting down, then
``data: [DONE]``; any other request gets a 503 saying the same. Its request log
is written as usual, and the process exits within a second or so of the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .errors import error_body, error_response
from .sse import DONE, frame

if TYPE_CHECKING:
    from .exchange import Exchange

log = logging.getLogger("first_hop_proxy")

#: Seconds the ended requests get to write their last words before the server closes.
ENDING_SECONDS = 0.5
SHUTTING_DOWN = (
    "The proxy is shutting down, so this reply was ended here{done}. "
    "Send the message again once the proxy is back."
)


class Drain:
    """The chat requests in progress, and how they end when the proxy stops."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.stopping = False
        self._active: dict[Exchange, asyncio.Task[object]] = {}
        self._ended: set[Exchange] = set()
        self._idle = asyncio.Event()  # set once nothing is in progress any more
        self._hurry = asyncio.Event()

    def enter(self, ex: Exchange) -> None:
        """``ex`` is in progress, in the current task."""
        task = asyncio.current_task()
        if task is not None:
            self._active[ex] = task

    def leave(self, ex: Exchange) -> None:
        self._active.pop(ex, None)
        self._ended.discard(ex)
        if not self._active:
            self._idle.set()

    def ended(self, ex: Exchange) -> bool:
        """Whether ``ex`` was cancelled to end it for the shutdown (not by its client leaving)."""
        return ex in self._ended

    def hurry(self) -> None:
        """End what is in progress now, without waiting for the rest of the grace."""
        self._hurry.set()

    async def on_shutdown(self, app: web.Application) -> None:
        """Wait up to the grace for requests in progress, then end the rest."""
        self.stopping = True
        if not self._active:
            return
        self._idle.clear()
        log.info(
            "stopping: waiting up to %g s for %d request(s) in progress",
            self.grace,
            len(self._active),
        )
        await _first(self._idle.wait(), self._hurry.wait(), timeout=self.grace)
        if not self._active:
            return
        log.warning("stopping: ending %d request(s) still in progress", len(self._active))
        for ex, task in list(self._active.items()):
            self._ended.add(ex)
            task.cancel()
        await _first(self._idle.wait(), timeout=ENDING_SECONDS)


async def _first(*waits: Coroutine[Any, Any, Any], timeout: float) -> None:
    """Return when the first of ``waits`` is done, or after ``timeout``."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def end_reply(ex: Exchange) -> web.StreamResponse:
    """The last words of a request ended by the shutdown, and a note for its log."""
    ex.outcome_note = "ended: the proxy is shutting down"
    ex.record.error = ex.record.error or ex.outcome_note
    out = ex.response
    if out is None:  # nothing sent yet: a plain error reply
        message = SHUTTING_DOWN.format(done=" before the upstream answered")
        return error_response(503, message, "server_error", "shutting_down")
    event = error_body(SHUTTING_DOWN.format(done=""), "server_error", "shutting_down")
    with contextlib.suppress(RuntimeError, ConnectionError):  # already ended, or client gone
        await out.write(frame(event) + frame(DONE))
        await out.write_eof()
    return out


DRAIN = web.AppKey("drain", Drain)
