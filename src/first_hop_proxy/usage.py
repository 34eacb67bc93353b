"""Usage totals: requests and tokens per day, upstream, key and model, kept in SQLite.

SillyTavern records no usage, so people cannot tell what they spent. Every
reply's ``usage`` (a JSON reply's, or a stream's last chunk that carries one)
is added up here, with the requests that failed.

The request path only adds to a dict in memory (:meth:`UsageTotals.add`: a few
dict operations on the event loop's thread, nothing shared with another
thread). Every few seconds the deltas gathered so far go, as one batch of
UPSERTs, to a thread of their own. A database that is broken, locked or
unwritable never costs a request: the batch goes back into memory and is
tried again with the next one, and the failure is counted, shown in
``/health/detailed`` and reported at most once a minute. Not on the log
writer's thread: a locked database waits out its busy timeout, which would
hold up the log files queued behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from .errors import error_response, json_response
from .logs.writer import lower_priority
from .sse import event_data, parse_event

if TYPE_CHECKING:
    from .config import Usage
    from .exchange import ChatRequest, Exchange

log = logging.getLogger("first_hop_proxy")

#: How often the gathered deltas are written.
FLUSH_SECONDS = 5.0
#: How long a write waits for a database another program holds locked.
BUSY_SECONDS = 1.0
#: How long ``/usage`` waits for the database before answering from memory alone.
READ_SECONDS = 3.0
#: How long shutting down waits for the last batch to be written.
CLOSE_SECONDS = 5.0
WARN_SECONDS = 60.0
#: Distinct rows held in memory at most (a database that stays broken, model names a
#: client makes up); past it, new models are counted under ``OTHER``.
MAX_ROWS = 10_000
OTHER = "(other)"
MAX_NAME = 200
#: Tokens one reply may add: a bogus figure must not overflow the database's integers.
MAX_TOKENS = 10**12

#: (day, upstream, key, model)
Slot = tuple[str, str, str, str]
#: [requests, failed, prompt_tokens, completion_tokens, total_tokens]
Counts = list[int]
Batch = dict[Slot, Counts]
FIELDS = ("requests", "failed", "prompt_tokens", "completion_tokens", "total_tokens")

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_totals (
    day TEXT NOT NULL,
    upstream TEXT NOT NULL,
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL,
    PRIMARY KEY (day, upstream, key, model)
) WITHOUT ROWID
"""
UPSERT = """
INSERT INTO usage_totals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, upstream, key, model) DO UPDATE SET
    requests = requests + excluded.requests,
    failed = failed + excluded.failed,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    total_tokens = total_tokens + excluded.total_tokens
"""
SELECT = f"SELECT day, upstream, key, model, {', '.join(FIELDS)} FROM usage_totals WHERE day >= ?"


def token_count(value: Any) -> int:
    """A token figure as a whole number in 0..MAX_TOKENS; anything else counts 0."""
    if type(value) is int:  # the usual case first: this runs on the request path
        return value if 0 <= value <= MAX_TOKENS else (MAX_TOKENS if value > 0 else 0)
    if type(value) is float and math.isfinite(value) and value > 0:
        return min(int(value), MAX_TOKENS)
    return 0


def tokens(usage: Mapping[str, Any]) -> tuple[int, int, int]:
    """(prompt, completion, total) of a ``usage`` object; Anthropic's names count too."""
    prompt = usage.get("prompt_tokens")
    if prompt is None:
        prompt = usage.get("input_tokens")
    completion = usage.get("completion_tokens")
    if completion is None:
        completion = usage.get("output_tokens")
    p, c = token_count(prompt), token_count(completion)
    return p, c, token_count(usage.get("total_tokens")) or p + c


def merge(into: Batch, batch: Batch) -> None:
    for slot, counts in batch.items():
        row = into.get(slot)
        if row is None:
            into[slot] = list(counts)
        else:
            for i, n in enumerate(counts):
                row[i] += n


def requests_in(batches: Iterable[Batch]) -> int:
    return sum(counts[0] for batch in batches for counts in batch.values())


class Database:
    """The SQLite file, used only from the usage thread; reopened after any error."""

    def __init__(self) -> None:
        self._conn: sqlite3.Connection | None = None
        self._path = ""

    def connect(self, path: str) -> sqlite3.Connection:
        if self._conn is not None and self._path == path:
            return self._conn
        self.close()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None)
        try:
            conn.execute(SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn, self._path = conn, path
        return conn

    def write(self, path: str, batch: Batch) -> None:
        """Add ``batch`` to the totals in ``path``, all of it or (on an error) none."""
        try:
            conn = self.connect(path)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(UPSERT, [(*slot, *counts) for slot, counts in batch.items()])
            conn.execute("COMMIT")
        except BaseException:
            self.close()  # rolls back what was begun
            raise

    def read(self, path: str, since: str) -> list[tuple[Any, ...]]:
        try:
            return self.connect(path).execute(SELECT, (since,)).fetchall()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


Done = Callable[[bool, Any], None]


class Worker:
    """One daemon thread running jobs in order; each job's ``done(ok, result)`` is then
    called on the event loop, in the same order. A daemon: a hung disk must not keep
    the process from exiting."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Done, Any] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def submit(self, job: Callable[[], Any], done: Done) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((job, done, asyncio.get_running_loop()))

    def stop(self) -> None:
        """End the thread once the jobs already submitted have run."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _work(self) -> None:
        lower_priority()
        while (item := self._jobs.get()) is not None:
            job, done, loop = item
            try:
                ok, result = True, job()
            except Exception as exc:
                ok, result = False, exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(done, ok, result)


class UsageTotals:
    """The running proxy's totals: in memory first, then in the database.

    Every method runs on the event loop's thread; only the :class:`Database`
    calls run on the usage thread. A batch handed to the thread stays in
    ``_inflight`` until its result is back, so nothing is counted twice or lost
    from view: ``/usage`` adds what memory holds to what the database says.
    """

    def __init__(
        self, config: Callable[[], Usage], on_failure: Callable[[str], None] | None = None
    ) -> None:
        self.config = config  # the current settings' ``usage`` section (reloads apply)
        self.on_failure = on_failure
        self._pending: Batch = {}
        self._inflight: dict[int, Batch] = {}
        self._batches = 0
        self._db = Database()
        self._worker = Worker("fhp-usage")
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_flush: float | None = None
        self._last_warning = -math.inf
        self._failing = False
        self._day = ""
        self._day_ends = -math.inf

    # -- the request path ---------------------------------------------------

    def add(
        self, upstream: str, key: str, model: str, failed: bool, usage: Mapping[str, Any] | None
    ) -> None:
        """Count one request that ended (and the tokens its reply reported)."""
        pending = self._pending
        day = self._day if time.time() < self._day_ends else self.new_day()
        slot = (day, upstream, key, model[:MAX_NAME])
        counts = pending.get(slot)
        if counts is None:
            if len(pending) >= MAX_ROWS:
                slot = (slot[0], upstream, key, OTHER)
                counts = pending.get(slot)
            if counts is None:
                counts = pending[slot] = [0, 0, 0, 0, 0]
        counts[0] += 1
        if failed:
            counts[1] += 1
        if usage:
            prompt, completion, total = tokens(usage)
            counts[2] += prompt
            counts[3] += completion
            counts[4] += total

    def new_day(self) -> str:
        """Today's local date, kept until the next local midnight (asking costs 1.5 us)."""
        today = date.today()
        self._day = today.isoformat()
        midnight = datetime.combine(today + timedelta(days=1), datetime.min.time())
        self._day_ends = midnight.timestamp()
        return self._day

    # -- writing ------------------------------------------------------------

    def start(self) -> None:
        """Start writing every ``FLUSH_SECONDS`` (needs the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_every())

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            if not self._inflight:  # one batch at a time: a slow disk gets no queue
                self.flush()

    def flush(self) -> None:
        """Hand what has gathered to the usage thread."""
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        self._batches += 1
        number = self._batches
        self._inflight[number] = batch
        path = self.config().database

        def done(ok: bool, result: Any) -> None:
            self._inflight.pop(number, None)
            if ok:
                self.flushes += 1
                self.last_flush = time.time()
                if self._failing:
                    self._failing = False
                    log.warning("usage totals: written to %s again; nothing was lost", path)
            else:
                merge(self._pending, batch)  # tried again with the next batch
                self.failed(path, result)

        self._worker.submit(lambda: self._db.write(path, batch), done)

    def failed(self, path: str, exc: BaseException) -> None:
        """Count a database failure; warn (and error-log) at most once a minute."""
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._failing = True
        now = time.monotonic()
        if now - self._last_warning < WARN_SECONDS:
            return
        self._last_warning = now
        message = (
            f"usage totals: cannot use the database {path} ({self.last_error}); the totals "
            "are kept in memory and written once it works again (usage.database in config.yaml)"
        )
        log.warning("%s", message)
        if self.on_failure is not None:
            with contextlib.suppress(Exception):
                self.on_failure(message)

    async def close(self) -> None:
        """Write what is left, then stop the thread (waiting at most ``CLOSE_SECONDS``)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not self._worker.started and not self._pending:
            return
        self.flush()
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(ok: bool, result: Any) -> None:
            if not closed.done():  # not given up on by the timeout below
                closed.set_result(None)

        self._worker.submit(self._db.close, done)
        self._worker.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closed, CLOSE_SECONDS)
        unsaved = requests_in([self._pending, *self._inflight.values()])
        if unsaved:
            log.warning(
                "usage totals: the totals of %d request(s) could not be written to %s",
                unsaved,
                self.config().database,
            )

    # -- reading ------------------------------------------------------------

    async def totals(self, days: int | None) -> tuple[list[dict[str, Any]], str | None]:
        """The totals of the last ``days`` days (None: all), newest day first, and
        why the database's part is missing (None when it is not)."""
        since = (date.today() - timedelta(days=days - 1)).isoformat() if days else ""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[tuple[list[dict[str, Any]], str | None]] = loop.create_future()
        path = self.config().database

        def done(ok: bool, result: Any) -> None:
            # On the loop, after the results of every batch handed over before this
            # read: what is still in flight now was handed over after it.
            rows: Batch = {}
            problem = None
            if ok:
                for day, upstream, key, model, *counts in result:
                    rows[(day, upstream, key, model)] = counts
            else:
                self.failed(path, result)
                problem = self.last_error
            if not answer.done():
                answer.set_result((self.report(rows, since), problem))

        self._worker.submit(lambda: self._db.read(path, since), done)
        try:
            return await asyncio.wait_for(asyncio.shield(answer), READ_SECONDS)
        except TimeoutError:
            return self.report({}, since), f"the database did not answer in {READ_SECONDS:g} s"

    def report(self, rows: Batch, since: str) -> list[dict[str, Any]]:
        """``rows`` from the database plus what memory holds, as ``/usage`` lists them."""
        merge(rows, self._pending)
        for batch in self._inflight.values():
            merge(rows, batch)
        listed = sorted(item for item in rows.items() if item[0][0] >= since)
        listed.sort(key=lambda item: item[0][0], reverse=True)  # the newest day first
        return [
            {"day": day, "upstream": upstream, "key": key, "model": model}
            | dict(zip(FIELDS, counts, strict=True))
            for (day, upstream, key, model), counts in listed
        ]

    def status(self) -> dict[str, Any]:
        """For ``/health/detailed``."""
        config = self.config()
        return {
            "enabled": config.enabled,
            "database": config.database,
            "track_streams": config.track_streams,
            "unsaved_requests": requests_in([self._pending, *self._inflight.values()]),
            "writes": self.flushes,
            "last_write": wall_clock(self.last_flush) if self.last_flush else None,
            "failures": self.failures,
            "last_error": self.last_error,
        }


MAX_DAYS = 36_600


async def usage_view(request: web.Request, totals: UsageTotals) -> web.Response:
    """``GET /usage[?days=N]``: the totals of the last N days (1: today), newest first."""
    if not totals.config().enabled:
        return error_response(
            404,
            "Usage totals are off (usage.enabled: false in config.yaml).",
            "invalid_request_error",
            "usage_disabled",
        )
    raw = request.query.get("days")
    days = None
    if raw is not None:
        days = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 7 else 0
        if not 1 <= days <= MAX_DAYS:
            return error_response(
                400,
                f"days must be a whole number from 1 to {MAX_DAYS} (1: today only; leave it "
                f"out for every day), not {raw[:40]!r}.",
                "invalid_request_error",
                "invalid_days",
            )
    rows, problem = await totals.totals(days)
    body: dict[str, Any] = {"totals": rows}
    if problem is not None:
        body["warning"] = (
            f"The usage database could not be read ({problem}); these are only the totals "
            "the proxy holds in memory, since it started or since the database last worked."
        )
    return json_response(body)


def add_usage_routes(app: web.Application, totals: UsageTotals) -> None:
    async def view(request: web.Request) -> web.Response:
        return await usage_view(request, totals)

    app.router.add_get("/usage", view)


def wall_clock(unix: float) -> str:
    return datetime.fromtimestamp(unix).astimezone().isoformat(timespec="seconds")


# -- the hooks ------------------------------------------------------------


def count_request(ex: Exchange, status: int) -> None:
    """At the request's end: count it, if it reached an upstream."""
    chat, upstream = ex.chat, ex.upstream
    if not ex.calls or chat is None or upstream is None or not ex.settings.config.usage.enabled:
        return
    ex.state.usage.add(upstream.name, ex.key_label, chat.model, status >= 400, ex.usage)


USAGE_OPTION = b'"stream_options":{"include_usage":true}'


def ask_for_usage(config: Usage, chat: ChatRequest) -> bool:
    """``track_streams``: a stream whose client did not ask for usage asks for it.

    True when the request was changed: the usage-only chunk that comes back is then
    the proxy's, not the client's (:class:`StreamUsage` removes it). Without
    ``stream_options`` in the body (the usual case) the option is added to the
    bytes (one copy), not by serializing the body again (which may hold megabytes of
    images).
    """
    if not (config.enabled and config.track_streams):
        return False
    options = chat.payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    if "stream_options" in chat.payload:  # there, but not asking: merged, the body redone
        asked = {**options} if isinstance(options, dict) else {}
        asked["include_usage"] = True
        chat.payload = {**chat.payload, "stream_options": asked}
        chat.body = orjson.dumps(chat.payload)
        return True
    chat.payload = {**chat.payload, "stream_options": {"include_usage": True}}
    body = chat.body
    end = len(body) - 1  # the object's closing "}"; it is not empty (it has messages)
    while body[end] in b" \t\r\n":
        end -= 1
    chat.body = b"".join((memoryview(body)[:end], b",", USAGE_OPTION, b"}"))
    return True


#: ``"usage": null``, with the comma that separates it from its neighbour; OpenAI
#: sends it in every chunk but the last when usage was asked for.
NULL_TAIL = b',"usage":null}'
NULL_USAGE = re.compile(rb'"usage"\s*:\s*null\s*,\s*|,\s*"usage"\s*:\s*null(?=\s*\})')


class StreamUsage:
    """Watches a relayed stream's events for the usage they report.

    Called only for events holding ``"usage"`` (a bytes search in the pump);
    only those with a real usage object are parsed. With ``hide`` (the proxy
    asked for usage, not the client), what it added is taken out again: the
    usage-only chunk is dropped and the ``"usage": null`` of the other chunks
    removed, so the client's stream stays what it would have been. A reply
    finished by continuations (``stream_resume``) spent what each of its
    upstream streams reported: their last usage objects are added up.
    """

    __slots__ = ("earlier", "ex", "hide", "last")

    def __init__(self, ex: Exchange, hide: bool) -> None:
        self.ex, self.hide = ex, hide
        self.last: dict[str, Any] | None = None  # the current upstream stream's
        self.earlier: list[dict[str, Any]] = []  # the last usage of each stream before

    def begin(self) -> None:
        """Another upstream stream (a continuation) is relayed from here on."""
        if self.last is not None:
            self.earlier.append(self.last)
            self.last = None

    def see(self, event: bytes) -> bytes | None:
        """The event to send on (None: send nothing)."""
        if event.endswith(NULL_TAIL):  # OpenAI's way, on every chunk but the last
            return event[: -len(NULL_TAIL)] + b"}" if self.hide else event
        if NULL_USAGE.search(event) is not None:
            return NULL_USAGE.sub(b"", event, count=1) if self.hide else event
        payload = parse_event(event_data(event))
        if payload is None:
            return event
        usage = payload.get("usage")
        if not isinstance(usage, dict):
            return event
        self.last = usage
        self.ex.usage = usage if not self.earlier else added(*self.earlier, usage)
        return None if self.hide and not payload.get("choices") else event


def added(*usages: Mapping[str, Any]) -> dict[str, int]:
    """Several usage objects as one."""
    counts = [tokens(usage) for usage in usages]
    return dict(zip(FIELDS[2:], map(sum, zip(*counts, strict=True)), strict=True))
