"""The live feed: requests starting, trying and ending, for whoever is watching.

Forwarding tells the :class:`EventHub` when a request starts, after each
upstream attempt and when it ends; the dashboard's event stream subscribes.
It costs the request path little when nobody watches (a small summary dict
of each finished request kept for the next page that opens, nothing
serialized; a running request is only its record), and a page that reads
slowly never blocks a request or grows memory: each subscriber has a bounded
queue, and one that falls behind is told to start over from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .logs.request_log import AttemptRecord, RequestRecord
from .redact import Redactor

#: Finished requests kept for a page that opens later.
RECENT = 200
#: Events queued for one subscriber before it counts as fallen behind.
QUEUE_SIZE = 500
#: Pages watching at once; one more is refused (each holds a connection and a queue).
MAX_SUBSCRIBERS = 32
#: Characters of an error message or decision reason in an event.
TEXT_LIMIT = 300

Summary = dict[str, Any]


class Subscriber:
    """One watching page: a bounded queue of encoded events."""

    __slots__ = ("behind", "closed", "queue", "ready")

    def __init__(self) -> None:
        self.queue: deque[bytes] = deque()
        self.ready = asyncio.Event()
        self.behind = False  # events were dropped: the page needs a new snapshot
        self.closed = False  # the proxy is shutting down

    def put(self, data: bytes) -> None:
        if self.behind:
            return
        if len(self.queue) >= QUEUE_SIZE:
            self.behind = True
            self.queue.clear()
        else:
            self.queue.append(data)
        self.ready.set()

    def take(self) -> list[bytes]:
        items = list(self.queue)
        self.queue.clear()
        self.ready.clear()
        return items


def clip(text: str, limit: int = TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LazyRedact:
    """``factory().text``, the redactor made on first use: most requests need none."""

    __slots__ = ("_factory", "_redactor")

    def __init__(self, factory: Callable[[], Redactor]) -> None:
        self._factory = factory
        self._redactor: Redactor | None = None

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self._redactor is None:
            self._redactor = self._factory()
        return clip(self._redactor.text(text))


def attempt_summary(attempt: AttemptRecord, redact: Callable[[str], str]) -> Summary:
    """An attempt for the feed. A delivered attempt's reason is the proxy's own words;
    any other may quote the upstream, so it is masked."""
    delivered = attempt.action == "deliver"
    return {
        "n": attempt.number,
        "upstream": attempt.upstream,
        "status": attempt.status,
        "action": attempt.action,
        "code": attempt.code,
        "reason": attempt.reason if delivered else redact(attempt.reason),
        "error": redact(attempt.error),
        "duration": attempt.duration,
        "delay": attempt.delay_before_next,
    }


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to make, once a request
class _Running:
    """A request in flight: its record (which the request holds anyway) and how to mask it.

    Nothing is built from it unless a page watches or opens.
    """

    record: RequestRecord
    redactor: Callable[[], Redactor]

    def summary(self) -> Summary:
        record, redact = self.record, LazyRedact(self.redactor)
        return {
            "id": record.request_id,
            "time": record.started_wall,
            "path": record.endpoint,
            "model": record.model,
            "stream": record.stream,
            "upstream": record.attempts[-1].upstream if record.attempts else "",
            "state": "running",
            "attempts": [attempt_summary(a, redact) for a in record.attempts],
        }


class EventHub:
    """Requests in flight, the last finished ones, and the pages watching them."""

    def __init__(self, recent: int = RECENT) -> None:
        self.running: dict[str, _Running] = {}
        self.recent: deque[Summary] = deque(maxlen=recent)
        self.subscribers: set[Subscriber] = set()
        self.finished_count = 0  # tells a watcher that the health figures moved
        #: Masks the model name a client sent (it could be anything) as it leaves: the
        #: proxy's current redactor, set by the state.
        self.mask: Callable[[str], str] = str

    def subscribe(self) -> Subscriber | None:
        """A new subscriber, or None when :data:`MAX_SUBSCRIBERS` already watch."""
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            return None
        subscriber = Subscriber()
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def close(self) -> None:
        """The proxy is shutting down: every watcher's stream ends now, not after the grace."""
        for subscriber in self.subscribers:
            subscriber.closed = True
            subscriber.ready.set()

    def knows(self, request_id: str) -> bool:
        """Whether ``request_id`` is running or recently finished."""
        return request_id in self.running or any(s["id"] == request_id for s in self.recent)

    def snapshot(self) -> Summary:
        """What a page shows when it opens: running requests and the recent ones."""
        running = [self._shown(r.summary()) for r in self.running.values()]
        return {"running": running, "recent": [self._shown(s) for s in self.recent]}

    def _shown(self, summary: Summary) -> Summary:
        model = summary.get("model")
        return {**summary, "model": self.mask(model)} if model else summary

    def _publish(self, kind: str, summary: Summary) -> None:
        shown = self._shown(summary)
        data = b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(shown) + b"\n\n"
        for subscriber in self.subscribers:
            subscriber.put(data)

    def started(self, record: RequestRecord, redactor: Callable[[], Redactor]) -> None:
        """A checked request is about to go upstream; ``redactor`` makes the redactor
        that masks its texts (only called when one of them needs it)."""
        running = self.running[record.request_id] = _Running(record, redactor)
        if self.subscribers:
            self._publish("request", running.summary())

    def attempted(self, record: RequestRecord) -> None:
        """An upstream attempt of a running request has been decided."""
        if not self.subscribers:
            return  # finished() sums the attempts up from the record
        running = self.running.get(record.request_id)
        if running is not None:
            self._publish("request", running.summary())

    def finished(
        self,
        record: RequestRecord,
        upstream: str,
        size: int,
        redactor: Callable[[], Redactor],
    ) -> None:
        """The request is over (call before the record goes to the log writer)."""
        self.running.pop(record.request_id, None)
        redact = LazyRedact(redactor)
        summary = {
            "id": record.request_id,
            "time": record.started_wall,
            "path": record.endpoint,
            "model": record.model,
            "stream": record.stream,
            "upstream": upstream,
            "state": "done",
            "status": record.final_status,
            "attempts": [attempt_summary(a, redact) for a in record.attempts],
            "duration": record.duration,
            "first_token": record.first_content,
            "size": size,
            "error": redact(record.error) if record.error else "",
        }
        self.recent.append(summary)
        self.finished_count += 1
        if self.subscribers:
            self._publish("request", summary)
