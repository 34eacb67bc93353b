"""One log file per error event (failed attempt, retry, circuit trip, bad request...).

Independent of request logging: error logs are what a user reads first when
something went wrong, so they are small, self-contained and capped in number
and size. Formatting and writing run on the log writer thread.
"""

from __future__ import annotations

import http
import os
import re
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from ..config import ErrorLogging
from ..redact import Headers, Redactor, header_secrets
from .request_log import BANNER, RULE
from .writer import LogWriter, remove_files, write_new_file

BYTES_PER_MB = 1024 * 1024
FILE_RE = re.compile(r"^(?P<code>[A-Za-z0-9_-]+?)_(?P<ts>\d{8}_\d{6}_\d{3})(?:_(?P<n>\d+))?\.log$")
_UNSAFE_CODE = re.compile(r"[^A-Za-z0-9-]+")
_SHRINK_TRIES = 4
_MARKER_ROOM = 64


@dataclass
class ErrorEvent:
    """One error, with whatever is known about it; only the first three fields are required.

    ``error_code`` is the HTTP status, or a name for non-HTTP errors:
    ``connection_error``, ``timeout``, ``circuit_open``, ``hard_stop``,
    ``empty_response``, ``invalid_json``, ``config_error``, ``rule_timeout``,
    ``recategorized``, ``bad_request``, ``log_write_error``, ``endpoint_error``.
    """

    error_code: str | int
    error_type: str
    error_message: str
    status_code: int | None = None
    status_text: str | None = None
    url: str | None = None
    headers: Headers | None = None
    response_text: str | bytes | None = None
    context: dict[str, Any] = field(default_factory=dict)
    retry_attempt: int | None = None
    retry_delay: float | None = None
    request_id: str | None = None
    exception: BaseException | None = None
    traceback: str | None = None
    method: str | None = None
    path: str | None = None
    model: str | None = None
    stream: bool | None = None
    client: str | None = None
    elapsed: float | None = None
    timestamp: float = field(default_factory=time.time)
    secrets: list[str] = field(default_factory=list)

    @classmethod
    def from_exception(cls, error_code: str | int, exc: BaseException, **fields: Any) -> ErrorEvent:
        """An event for a caught exception; its traceback is kept for the log."""
        fields.setdefault("error_type", type(exc).__name__)
        fields.setdefault("error_message", str(exc) or type(exc).__name__)
        return cls(error_code=error_code, exception=exc, **fields)


@dataclass(frozen=True)
class ErrorFile:
    """An error log file on disk, as listed by ``GET /logs/errors``."""

    name: str
    size: int
    mtime: float
    code: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "time": datetime.fromtimestamp(self.mtime).astimezone().isoformat(),
            "code": self.code,
        }


def error_file_name(event: ErrorEvent) -> str:
    """``{error_code}_{YYYYMMDD_HHMMSS_mmm}.log`` in local time."""
    when = datetime.fromtimestamp(event.timestamp)
    code = _UNSAFE_CODE.sub("_", str(event.error_code)).strip("_") or "error"
    return f"{code[:60]}_{when:%Y%m%d_%H%M%S}_{when.microsecond // 1000:03d}.log"


def format_error_log(
    event: ErrorEvent, cfg: ErrorLogging, file_name: str, redactor: Redactor | None = None
) -> str:
    """The error log text, redacted and at most ``cfg.max_file_size_mb`` (UTF-8)."""
    redactor = (redactor or Redactor()).with_secrets(
        [*header_secrets(event.headers or {}), *event.secrets]
    )
    limit = max(1, int(cfg.max_file_size_mb * BYTES_PER_MB))
    response_text = _response_text(event.response_text, redactor)
    original = len(response_text.encode("utf-8")) if response_text is not None else 0
    text = _render(event, cfg, file_name, redactor, response_text)
    for _ in range(_SHRINK_TRIES):
        excess = len(text.encode("utf-8")) - limit
        if excess <= 0 or not response_text:
            break
        raw = response_text.encode("utf-8")
        # JSON escaping makes each raw byte cost ``ratio`` bytes in the file.
        ratio = max(1.0, len(orjson.dumps(response_text)) / max(1, len(raw)))
        keep = max(0, len(raw) - int((excess + _MARKER_ROOM) / ratio) - 1)
        response_text = raw[:keep].decode("utf-8", errors="ignore")
        response_text += f"[... truncated {original - keep} bytes ...]"
        text = _render(event, cfg, file_name, redactor, response_text)
    data = text.encode("utf-8")
    if len(data) > limit:
        marker = f"\n[... truncated {len(data) - limit} bytes ...]\n".encode()
        data = data[: max(0, limit - len(marker))] + marker
        text = data[:limit].decode("utf-8", errors="ignore")
    return text


def _response_text(value: str | bytes | None, redactor: Redactor) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return redactor.text(value)


def _render(
    event: ErrorEvent,
    cfg: ErrorLogging,
    file_name: str,
    redactor: Redactor,
    response_text: str | None,
) -> str:
    when = datetime.fromtimestamp(event.timestamp).isoformat()
    lines = [
        BANNER,
        f"ERROR LOG - {when}",
        BANNER,
        f"Error Code: {redactor.text(str(event.error_code))}",
        f"File: {file_name}",
    ]
    if event.retry_attempt is not None:
        lines += ["", RULE, f"RETRY ATTEMPT #{event.retry_attempt}"]
        if event.retry_delay is not None:
            lines.append(f"Retry Delay: {event.retry_delay:.2f} seconds")
        lines.append(RULE)
    details = {
        "timestamp": when,
        "error_type": event.error_type,
        "error_message": event.error_message,
        "status_code": event.status_code,
        "status_text": event.status_text or _status_text(event.status_code),
        "url": event.url,
        "headers": redactor.headers(event.headers) if event.headers is not None else None,
        "response_text": None,  # already redacted; filled in below
        "context": event.context,
        "retry_attempt": event.retry_attempt,
        "retry_delay": event.retry_delay,
        "request_id": event.request_id,
    }
    redacted = redactor.obj(details)
    redacted["response_text"] = response_text
    lines += ["", "ERROR DETAILS:", RULE, _json(redacted)]
    if cfg.include_stack_traces:
        stack = _stack_text(event)
        if stack:
            lines += ["", RULE, "STACK TRACE:", RULE, redactor.text(stack.rstrip())]
    if cfg.include_request_context:
        request = {
            "method": event.method,
            "path": event.path,
            "model": event.model,
            "stream": event.stream,
            "client": event.client,
            "request_id": event.request_id,
        }
        if any(v is not None for v in request.values()):
            lines += ["", RULE, "REQUEST CONTEXT:", RULE, _json(redactor.obj(request))]
    if cfg.include_timing:
        timing = [f"Event Time: {when}", f"Unix Time: {event.timestamp:.6f}"]
        if event.elapsed is not None:
            timing.append(f"Elapsed Since Request Start: {event.elapsed:.3f} seconds")
        if event.retry_delay is not None:
            timing.append(f"Retry Delay: {event.retry_delay:.2f} seconds")
        lines += ["", RULE, "TIMING INFORMATION:", RULE, *timing]
    lines.append("")
    return "\n".join(lines)


def _status_text(status: int | None) -> str | None:
    if status is None:
        return None
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return None


def _stack_text(event: ErrorEvent) -> str | None:
    if event.traceback:
        return event.traceback
    exc = event.exception
    if exc is None:
        return None
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode("utf-8")


def scan_error_files(folder: str | os.PathLike[str]) -> list[ErrorFile]:
    """Error log files in ``folder``, oldest first (blocking: run off the event loop)."""
    found: list[tuple[tuple[str, int], ErrorFile]] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        match = FILE_RE.match(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            stat = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        key = (match["ts"], int(match["n"] or 1))
        found.append((key, ErrorFile(entry.name, stat.st_size, stat.st_mtime, match["code"])))
    found.sort(key=lambda item: item[0])
    return [item for _, item in found]


class ErrorLog:
    """Writes error logs (rotated to ``max_files``) and counts every event in memory."""

    def __init__(
        self, cfg: ErrorLogging, writer: LogWriter, redactor: Redactor | None = None
    ) -> None:
        self.cfg = cfg
        self.folder = Path(cfg.folder)
        self._writer = writer
        self.redactor = redactor or Redactor()  # replaced when a reloaded config has new keys
        self._lock = threading.Lock()
        self._files: deque[Path] = deque()  # oldest first; changed on the writer thread only
        self.total = 0
        self.by_code: Counter[str] = Counter()
        self.by_type: Counter[str] = Counter()
        self.removed = 0
        if cfg.enabled:
            writer.submit_call(self.scan)

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def log(self, event: ErrorEvent) -> None:
        """Count ``event`` and queue its file; returns at once and never raises.

        Safe to call from any thread (the writer reports its own failures here).
        An error log records a failure: the writer never drops it for load.
        """
        with self._lock:
            self.total += 1
            self.by_code[str(event.error_code)] += 1
            self.by_type[event.error_type] += 1
        if self.cfg.enabled:
            size = len(event.response_text or "") + len(event.traceback or "")
            self._writer.submit_call(lambda: self._write(event), size)

    def status(self) -> dict[str, Any]:
        """Counters for ``/health/detailed`` and ``/logs/errors``."""
        with self._lock:
            return {
                "enabled": self.cfg.enabled,
                "total": self.total,
                "by_code": dict(self.by_code),
                "by_type": dict(self.by_type),
                "removed": self.removed,
            }

    def scan(self) -> None:
        """Learn the files already on disk and rotate down to ``max_files`` (writer thread)."""
        files = [self.folder / f.name for f in scan_error_files(self.folder)]
        with self._lock:
            self._files = deque(files)
        self._rotate()

    def _write(self, event: ErrorEvent) -> None:
        doomed = self._due(incoming=1)
        try:
            path = self._writer.write_file(
                self.folder / error_file_name(event),
                lambda name: format_error_log(event, self.cfg, name, self.redactor),
                doomed[0] if doomed else None,
            )
        finally:  # forgotten by _due: removed even when this log could not be written
            self.removed += remove_files(doomed)
        with self._lock:
            self._files.append(path)

    def _rotate(self) -> None:
        self.removed += remove_files(self._due())

    def _due(self, incoming: int = 0) -> list[Path]:
        """Forget the oldest files past ``max_files``, counting ``incoming`` new ones."""
        with self._lock:
            doomed = []
            while self._files and len(self._files) + incoming > self.cfg.max_files:
                doomed.append(self._files.popleft())
        return doomed


def log_config_error(
    folder: str | os.PathLike[str], problems: list[str], *, source: str = "config"
) -> Path | None:
    """Write a ``config_error`` log synchronously, before the server runs. Never raises."""
    try:
        event = ErrorEvent(
            error_code="config_error",
            error_type="ConfigError",
            error_message=f"{source}: {len(problems)} problem(s) in the configuration",
            context={"source": source, "problems": problems},
        )
        cfg = ErrorLogging(folder=str(folder))
        return write_new_file(
            Path(folder) / error_file_name(event),
            lambda name: format_error_log(event, cfg, name),
        )
    except Exception:
        return None
