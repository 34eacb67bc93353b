"""One log file per proxied request: what came in, every upstream try, what went out.

The forwarding code fills a :class:`RequestRecord` as the request goes and hands
it to :meth:`RequestLog.write` when done. Formatting (JSON pretty-printing,
redaction of possibly large bodies) and writing both happen on the log writer
thread, so the event loop only pays for building the record.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from stat import S_ISREG
from typing import Any

import orjson

from ..config import Logging
from ..redact import Headers, Redactor, header_secrets
from ..sse import parse_event
from .writer import LogWriter, remove_files

BANNER = "=" * 80
RULE = "-" * 40
FILE_RE = re.compile(r"^(?P<ts>\d{8}_\d{6}_\d{3})_(?P<id>[A-Za-z0-9-]+)(?:_\d+)?\.log$")
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9-]")
_SUMMARY_RE = re.compile(
    r"^Final Status: (?P<status>\S+)\s+Attempts: (?P<attempts>\d+)"
    r"(?:\s+Duration: (?P<duration>[0-9.]+) s)?",
    re.M,
)
_ID_RE = re.compile(r"^Request ID: (?P<id>.*)$", re.M)
SUMMARY_READ_BYTES = 4096
#: How much of an attempt's reply the log shows, after masking.
REPLY_LOG_CHARS = 16_384
SECONDS_PER_DAY = 86400.0


@dataclass(slots=True)  # one or more per request in flight
class AttemptRecord:
    """One try against the upstream, and what the resilience layer decided about it."""

    number: int
    upstream: str = ""
    key: str = ""  # a pool key, by its last four characters
    status: int | None = None
    duration: float | None = None
    action: str = ""
    reason: str = ""
    delay_before_next: float | None = None
    error: str = ""
    recategorization: str = ""
    #: What the upstream sent for an attempt that was not delivered (its error body,
    #: or a stream's events before the failure): the story of why it was retried.
    reply: bytes = b""
    note: str = ""
    code: str = ""  # a failed attempt's status or failure kind (``timeout``, ``empty_response``)


@dataclass(slots=True)  # one or more per request in flight
class ResumeRecord:
    """One try at finishing a stream that broke after its content had started."""

    number: int
    #: What ended the stream before it, and how much the client had by then.
    broke: str = ""
    chars: int = 0
    events: int = 0
    #: The number of its first upstream attempt (it may take several).
    first_attempt: int = 0
    #: The continuation request's last messages (the prefill), as JSON; the rest is
    #: the request's own.
    messages: bytes = b""
    #: The restated passage cut from the continuation's start.
    cut: str = ""
    outcome: str = ""


@dataclass(slots=True)  # one or more per request in flight
class RequestRecord:
    """Everything about one request, filled in by the server as it happens.

    Once passed to :meth:`RequestLog.write` the record belongs to the log
    writer thread and must not be changed.
    """

    request_id: str
    endpoint: str
    method: str = "POST"
    started_wall: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    client: str | None = None
    headers: Headers = field(default_factory=dict)
    body: bytes = b""
    original_body: bytes | None = None
    model: str | None = None
    stream: bool = False
    attempts: list[AttemptRecord] = field(default_factory=list)
    resumes: list[ResumeRecord] = field(default_factory=list)
    final_status: int | None = None
    #: The HTTP status the client was sent, when it differs from ``final_status``
    #: (a stream that had started with 200 and then failed).
    client_status: int | None = None
    outcome: str = ""
    response_headers: Headers | None = None
    response_body: bytes | None = None
    stream_text: dict[int, list[str]] = field(default_factory=dict)
    finish_reasons: dict[int, str | None] = field(default_factory=dict)
    stream_events: int = 0
    first_content: float | None = None
    # The data payloads of a relayed stream, kept as bytes: they are parsed into
    # stream_text and finish_reasons by the writer thread, not on the event loop,
    # as they come (:meth:`RequestLog.follow`): appended on the loop, taken from
    # the left on the writer thread (a deque does both safely at once). Made with the
    # first event: an empty deque is 600 bytes, for every request in flight.
    stream_data: deque[bytes] | None = None
    stream_bytes: int = 0  # of stream_data, all told (counted on the loop)
    error: str = ""
    ended_wall: float | None = None
    ended_mono: float | None = None
    secrets: list[str] = field(default_factory=list)
    #: Error log events this request sent (a rule timeout, a failed attempt...).
    error_events: int = 0

    def add_attempt(self, **fields: Any) -> AttemptRecord:
        """Append the next attempt (numbered from 1) and return it for filling in."""
        attempt = AttemptRecord(number=len(self.attempts) + 1, **fields)
        self.attempts.append(attempt)
        return attempt

    def add_resume(self, **fields: Any) -> ResumeRecord:
        """Append the next stream resume (numbered from 1) and return it for filling in."""
        resume = ResumeRecord(number=len(self.resumes) + 1, **fields)
        self.resumes.append(resume)
        return resume

    def add_stream_text(self, index: int, text: str) -> None:
        """Add a streamed content delta for choice ``index``; first content is timed."""
        if text and self.first_content is None:
            self.first_content = time.monotonic() - self.started_mono
        self.stream_text.setdefault(index, []).append(text)

    def add_chunk(self, payload: dict[str, Any]) -> None:
        """Keep the text and finish reasons of one parsed stream chunk."""
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            index = index if isinstance(index, int) else 0
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str) and content:
                    self.add_stream_text(index, content)
            if choice.get("finish_reason"):
                self.finish_reasons[index] = choice["finish_reason"]

    def keep_stream_data(self, data: bytes) -> None:
        """Keep a relayed event's data for the log (on the event loop)."""
        if self.stream_data is None:
            self.stream_data = deque()
        self.stream_data.append(data)
        self.stream_bytes += len(data)

    def assemble_stream(self) -> None:
        """Parse the stream payloads kept so far into text per choice (writer thread).

        Runs while the stream flows and once more at the end: each choice's text is
        joined into one string as it goes, a few bytes per event instead of the
        event's whole JSON.
        """
        data = self.stream_data
        if not data:
            return
        while data:
            chunk = parse_event(data.popleft())
            if chunk is not None:
                self.add_chunk(chunk)  # first_content was timed when it was relayed
        for parts in self.stream_text.values():
            if len(parts) > 1:
                parts[:] = ["".join(parts)]

    def finish(self, status: int | None) -> None:
        """Record the final status and the end time."""
        self.final_status = status
        self.ended_wall = time.time()
        self.ended_mono = time.monotonic()

    @property
    def duration(self) -> float | None:
        if self.ended_mono is None:
            return None
        return self.ended_mono - self.started_mono

    @property
    def plain_success(self) -> bool:
        """2xx on the first try and nothing went wrong: the only log that may be dropped.

        Anything else (an error, a hard stop, a retry, a recategorization, an
        error log event of any kind) is a failure whose log is always kept.
        """
        status = self.final_status
        return (
            status is not None
            and 200 <= status < 300
            and not self.error
            and not self.error_events
            and len(self.attempts) <= 1
            and all(a.action == "deliver" and not a.recategorization for a in self.attempts)
        )


@dataclass(frozen=True)
class RequestEntry:
    """A request log as listed by ``GET /logs/requests``."""

    request_id: str
    file: str
    time: str
    status: int | None
    attempts: int | None
    duration: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "time": self.time,
            "status": self.status,
            "attempts": self.attempts,
            "duration": self.duration,
            "file": self.file,
        }


def log_file_name(record: RequestRecord) -> str:
    """``YYYYMMDD_HHMMSS_mmm_<request id>.log`` from the request's start (local time)."""
    start = datetime.fromtimestamp(record.started_wall)
    safe_id = _UNSAFE_ID.sub("-", record.request_id)[:80] or "request"
    return f"{start:%Y%m%d_%H%M%S}_{start.microsecond // 1000:03d}_{safe_id}.log"


def format_request_log(
    record: RequestRecord, cfg: Logging, redactor: Redactor | None = None
) -> str:
    """The request log text, every header, body and error redacted."""
    redactor = (redactor or Redactor()).with_secrets(
        [*header_secrets(record.headers), *record.secrets]
    )
    started = datetime.fromtimestamp(record.started_wall).isoformat()
    ended_wall = record.ended_wall if record.ended_wall is not None else time.time()
    duration = record.duration
    lines: list[str] = [
        BANNER,
        f"UNIFIED REQUEST LOG - {started}",
        BANNER,
        f"Request ID: {redactor.text(record.request_id)}",
        f"Endpoint: {redactor.url(record.endpoint)}",
        f"Method: {record.method}",
    ]
    if record.client:
        lines.append(f"Client: {record.client}")
    if record.model is not None:
        lines.append(f"Model: {redactor.text(record.model)}")
    lines += [
        f"Stream: {'true' if record.stream else 'false'}",
        f"Timestamp: {started}",
        f"Start Time: {record.started_wall:.6f}",
        _summary_line(record),
    ]
    if record.client_status is not None:
        lines.append(
            f"HTTP Status Sent: {record.client_status} (the reply had started before it failed)"
        )
    if record.outcome:
        lines.append(f"Outcome: {redactor.text(record.outcome)}")
    if cfg.include_headers:
        lines += _section("REQUEST HEADERS:", _header_lines(record.headers, redactor))
    if cfg.include_request_data:
        lines += _section("REQUEST DATA:", [_body_text(record.body, redactor)])
        if record.original_body is not None and record.original_body != record.body:
            lines += _section(
                "ORIGINAL REQUEST DATA (before rewrite rules):",
                [_body_text(record.original_body, redactor)],
            )
    for attempt in record.attempts:
        lines += _section(f"UPSTREAM ATTEMPT #{attempt.number}:", _attempt_lines(attempt, redactor))
    for resume in record.resumes:
        lines += _section(
            f"STREAM RESUME #{resume.number}:",
            _resume_lines(resume, redactor, cfg),
        )
    if record.error:
        lines += _section("ERROR:", [redactor.text(record.error)])
    if cfg.include_headers and record.response_headers is not None:
        lines += _section("RESPONSE HEADERS:", _header_lines(record.response_headers, redactor))
    if cfg.include_response_data:
        lines += _section("FINAL RESPONSE DATA:", _response_lines(record, redactor))
    if cfg.include_timing:
        timing = [f"End Time: {ended_wall:.6f}"]
        if duration is not None:
            timing.append(f"Total Duration: {duration:.3f} seconds")
        if record.first_content is not None:
            timing.append(f"Time To First Content: {record.first_content:.3f} seconds")
        lines += _section("TIMING INFORMATION:", timing)
    lines += [
        "",
        BANNER,
        f"LOG COMPLETE - {datetime.fromtimestamp(ended_wall).isoformat()}",
        BANNER,
        "",
    ]
    return "\n".join(lines)


def _summary_line(record: RequestRecord) -> str:
    status = record.final_status if record.final_status is not None else "none"
    line = f"Final Status: {status}  Attempts: {len(record.attempts)}"
    if record.duration is not None:
        line += f"  Duration: {record.duration:.3f} s"
    return line


def _section(title: str, body: list[str]) -> list[str]:
    return ["", RULE, title, RULE, *body]


def _header_lines(headers: Headers, redactor: Redactor) -> list[str]:
    return [f"{name}: {value}" for name, value in redactor.headers(headers).items()]


def _body_text(body: bytes, redactor: Redactor) -> str:
    """The body pretty-printed and masked; as sent (masked) when it is not JSON,
    or nests too deeply to walk or to re-encode: a client cannot avoid its log."""
    if not body:
        return "(empty)"
    try:
        redacted = redactor.parsed_json(body, orjson.loads(body))
        return orjson.dumps(redacted, option=orjson.OPT_INDENT_2).decode("utf-8")
    except (orjson.JSONDecodeError, orjson.JSONEncodeError, RecursionError):
        return redactor.text(body.decode("utf-8", errors="replace"))


def _attempt_lines(attempt: AttemptRecord, redactor: Redactor) -> list[str]:
    status = attempt.status if attempt.status is not None else "no response"
    lines = []
    if attempt.upstream:
        key = f" (key {attempt.key})" if attempt.key else ""
        lines.append(f"Upstream: {attempt.upstream}{key}")
    lines.append(f"Status: {status}")
    if attempt.duration is not None:
        lines.append(f"Duration: {attempt.duration:.3f} seconds")
    if attempt.action:
        reason = f" ({redactor.text(attempt.reason)})" if attempt.reason else ""
        lines.append(f"Decision: {attempt.action}{reason}")
    if attempt.recategorization:
        lines.append(f"Recategorized: {redactor.text(attempt.recategorization)}")
    if attempt.error:
        lines.append(f"Error: {redactor.text(attempt.error)}")
    if attempt.note:
        lines.append(f"Note: {redactor.text(attempt.note)}")
    if attempt.delay_before_next is not None:
        lines.append(f"Delay Before Next Attempt: {attempt.delay_before_next:.2f} seconds")
    if attempt.reply:
        text = _body_text(attempt.reply, redactor)  # masked first, then cut
        if len(text) > REPLY_LOG_CHARS:
            text = f"{text[:REPLY_LOG_CHARS]}\n[... {len(text) - REPLY_LOG_CHARS} more characters]"
        lines += ["Upstream Reply:", text]
    return lines


def _resume_lines(resume: ResumeRecord, redactor: Redactor, cfg: Logging) -> list[str]:
    """A resume's story; the reply's text (in the prefill, the cut) only where the
    config lets the log show both request and reply data."""
    text = cfg.include_request_data and cfg.include_response_data
    lines = [
        f"Broke After: {resume.chars} characters of text, {resume.events} events: "
        + redactor.text(resume.broke),
        f"Upstream Attempts: from #{resume.first_attempt}",
    ]
    if text:
        lines += [
            "Request: the REQUEST DATA above, its messages ending with:",
            _body_text(resume.messages, redactor),
        ]
    if resume.cut:
        cut = f"{redactor.text(repr(resume.cut))} " if text else ""
        lines.append(f"Overlap Cut: {cut}({len(resume.cut)} characters)")
    lines.append(f"Outcome: {redactor.text(resume.outcome or 'not finished')}")
    return lines


def _response_lines(record: RequestRecord, redactor: Redactor) -> list[str]:
    if not record.stream:
        if record.response_body is None:
            return ["(no response)"]
        return [_body_text(record.response_body, redactor)]
    lines = [f"Stream Events: {record.stream_events}"]
    if record.resumes:
        lines.append(
            f"Stream Resumes: {len(record.resumes)} (see STREAM RESUME); "
            "the text below is what the client got, joined"
        )
    if record.first_content is not None:
        lines.append(f"Time To First Content: {record.first_content:.3f} seconds")
    for index in sorted(set(record.stream_text) | set(record.finish_reasons)):
        reason = record.finish_reasons.get(index)
        lines += [
            "",
            f"Choice {index} (finish reason: {reason if reason is not None else 'none'}):",
            redactor.text("".join(record.stream_text.get(index, []))),
        ]
    if record.response_body is not None:
        lines += ["", "Raw Response:", _body_text(record.response_body, redactor)]
    return lines


class RequestLog:
    """Writes request logs, prunes old ones, and indexes recent ones for the HTTP views."""

    def __init__(self, cfg: Logging, writer: LogWriter, redactor: Redactor | None = None) -> None:
        self.cfg = cfg
        self.folder = Path(cfg.folder)
        self._writer = writer
        self.redactor = redactor or Redactor()  # replaced when a reloaded config has new keys
        self._lock = threading.Lock()
        # Both only changed on the writer thread; read under the lock.
        self._files: deque[tuple[float, Path]] = deque()
        self._index: OrderedDict[str, RequestEntry] = OrderedDict()
        self.pruned = 0
        if cfg.enabled:
            writer.submit_call(self.scan)

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def write(self, record: RequestRecord) -> None:
        """Queue formatting and writing of ``record``; returns at once.

        Only the log of a plain success may be dropped when the writer falls
        behind; a failure's log is always kept.
        """
        self._writer.untend(id(record))
        if not self.cfg.enabled:
            return
        size = len(record.body) + len(record.original_body or b"")
        size += len(record.response_body or b"") + record.stream_bytes
        size += sum(len(attempt.reply) for attempt in record.attempts)
        size += sum(len(resume.messages) for resume in record.resumes)
        self._writer.submit_call(lambda: self._write(record), size, droppable=record.plain_success)

    def follow(self, record: RequestRecord) -> None:
        """Parse ``record``'s stream data on the writer thread as it comes, until
        :meth:`write`: 1,000 streams of 20 events held 5 MB of raw events at their end."""
        self._writer.tend(id(record), record.assemble_stream)

    def entries(self, limit: int) -> list[RequestEntry]:
        """Newest first."""
        with self._lock:
            items = list(self._index.values())
        items.reverse()
        return items[:limit]

    def path_for(self, request_id: str) -> Path | None:
        with self._lock:
            entry = self._index.get(request_id)
        return self.folder / entry.file if entry else None

    def status(self) -> dict[str, Any]:
        with self._lock:
            files = len(self._files)
        return {"enabled": self.cfg.enabled, "files": files, "pruned": self.pruned}

    def scan(self) -> None:
        """Seed the index from the folder and prune by age and count (writer thread)."""
        if not self.folder.is_dir():
            return
        found: list[tuple[str, float, Path]] = []
        for path in self.folder.iterdir():
            if not FILE_RE.match(path.name):
                continue
            try:
                info = path.lstat()
            except OSError:
                continue
            if S_ISREG(info.st_mode):  # a regular file, not a symlink
                found.append((path.name, info.st_mtime, path))
        found.sort()
        with self._lock:
            self._files = deque((mtime, path) for _, mtime, path in found)
        self._prune()
        with self._lock:
            paths = [path for _, path in self._files]
        for path in paths:
            entry = _entry_from_file(path)
            if entry is not None:
                with self._lock:
                    self._index[entry.request_id] = entry

    def _write(self, record: RequestRecord) -> None:
        record.assemble_stream()
        text = format_request_log(record, self.cfg, self.redactor)
        doomed = self._due(incoming=1)
        path = self.folder / log_file_name(record)
        try:
            written = self._writer.write_file(path, text, doomed[0] if doomed else None)
        finally:  # forgotten by _due: removed even when this log could not be written
            self.pruned += remove_files(doomed)
        entry = RequestEntry(
            request_id=record.request_id,
            file=written.name,
            time=datetime.fromtimestamp(record.started_wall).astimezone().isoformat(),
            status=record.final_status,
            attempts=len(record.attempts),
            duration=None if record.duration is None else round(record.duration, 3),
        )
        with self._lock:
            self._files.append((time.time(), written))
            self._index.pop(entry.request_id, None)
            self._index[entry.request_id] = entry

    def _prune(self) -> None:
        self.pruned += remove_files(self._due())

    def _due(self, incoming: int = 0) -> list[Path]:
        """Forget the files past ``max_files`` (counting ``incoming`` new ones) or too old."""
        cutoff = time.time() - self.cfg.max_age_days * SECONDS_PER_DAY
        doomed: list[Path] = []
        with self._lock:
            while self._files and (
                len(self._files) + incoming > self.cfg.max_files or self._files[0][0] < cutoff
            ):
                doomed.append(self._files.popleft()[1])
            if doomed:
                # The index is in write order like self._files, so the doomed entries
                # are at its front: stop once all are found instead of scanning it all.
                names = {path.name for path in doomed}
                stale: list[str] = []
                for request_id, entry in self._index.items():
                    if entry.file in names:
                        stale.append(request_id)
                        if len(stale) == len(names):
                            break
                for request_id in stale:
                    del self._index[request_id]
        return doomed


def _entry_from_file(path: Path) -> RequestEntry | None:
    match = FILE_RE.match(path.name)
    if match is None:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(SUMMARY_READ_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return None
    id_match = _ID_RE.search(head)
    request_id = id_match.group("id").strip() if id_match else match.group("id")
    summary = _SUMMARY_RE.search(head)
    status: int | None = None
    attempts: int | None = None
    duration: float | None = None
    if summary:
        status = int(summary["status"]) if summary["status"].isdigit() else None
        attempts = int(summary["attempts"])
        duration = float(summary["duration"]) if summary["duration"] else None
    started = datetime.strptime(match.group("ts")[:15], "%Y%m%d_%H%M%S").replace(
        microsecond=int(match.group("ts")[16:]) * 1000
    )
    when = started.astimezone().isoformat()  # the name is in local time
    return RequestEntry(request_id, path.name, when, status, attempts, duration)
