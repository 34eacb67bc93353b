"""Console output that never costs the event loop a wait or a thread wake-up.

One line per request is part of the product, but writing it from the event
loop means a blocking write to the terminal, and handing each line to a
thread through a queue wakes that thread per request (measured: a fifth of
the proxy's time under load). Here records only go into a deque; a thread
writes whatever has gathered every ``interval`` seconds. The line every request
writes skips even the logging module's record when the console is the only place it
can go (:func:`info`), and the model name in it is masked on that thread
(:class:`ClientText`).

Lines carry what clients and upstreams sent (a model name, an error text), so
each is made safe for a terminal: control characters are escaped (a newline
in a value cannot forge a line, an escape sequence cannot drive the terminal)
and secrets are masked.
"""

from __future__ import annotations

import collections
import logging
import re
import sys
import threading
import time
from typing import Any, TextIO

from .redact import Headers, Redactor, clip

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"
# C0 and C1 controls, DEL, and the Unicode line breaks and direction overrides
# that make a terminal show something other than the text.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# A finished line keeps its own line breaks (a traceback, a multi-line banner).
_CONTROL_BUT_NEWLINE = re.compile(
    r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}")


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``)."""
    return (_CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL).sub(_escape, text)


def _safe_arg(value: Any) -> Any:
    """A logging argument with no line break or control character left in it."""
    if type(value) in _PLAIN or isinstance(value, (int, float)):  # numbers need no check
        return value
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():  # no control, line break or direction override: most values
        return text
    return escape_controls(text) if _CONTROL.search(text) else text


class ClientText:
    """A text a client sent (its model name) for a console line: masked, with the key
    that client sent as well, and clipped to ``limit`` characters when the line is
    written, on the console's thread.

    Masking it on the event loop meant working out the client's key from its headers
    for every request, code run once per request and cold: 7 us of a 330 us request
    (measured in place), against well under 1 us each in the thread's batches.
    """

    __slots__ = ("headers", "limit", "redactor", "text")

    def __init__(self, text: str, limit: int, headers: Headers, redactor: Redactor) -> None:
        self.text, self.limit, self.headers, self.redactor = text, limit, headers, redactor

    def __str__(self) -> str:
        mask = self.redactor.with_header_secrets(self.headers).text
        return clip(self.text, self.limit, mask) or "-"


_PLAIN = frozenset({int, float, bool, type(None)})
_IMMUTABLE = _PLAIN | {str, ClientText}


def _unchangeable(args: object) -> bool:
    """Arguments that are all strings and numbers: rendered later, they still read the same."""
    return isinstance(args, tuple) and _IMMUTABLE.issuperset(map(type, args))


def _render(record: logging.LogRecord, unchangeable: bool = False) -> None:
    """Put the record's arguments into its message, each made safe for one line.

    ``unchangeable``: they are all strings and numbers (:func:`_unchangeable`); when
    every string is printable too (so holds no line break: most lines), there is
    nothing to make safe, which one pass over the strings joined tells.
    """
    args = record.args
    if isinstance(args, tuple):
        if unchangeable and ClientText in map(type, args):
            args = record.args = tuple([str(a) if type(a) is ClientText else a for a in args])
        safe = unchangeable and "".join([a for a in args if type(a) is str]).isprintable()
        if not safe:
            record.args = tuple(_safe_arg(a) for a in args)
    elif isinstance(args, dict):
        record.args = {k: _safe_arg(v) for k, v in args.items()}
    record.message = record.getMessage()
    record.msg, record.args = record.message, None


class ConsoleFormatter(logging.Formatter):
    """:data:`FORMAT`, the time worked out once per second rather than once per line,
    and a line without a traceback put together directly (the logging module's general
    formatting costs more than the rest of writing the line)."""

    def __init__(self) -> None:
        super().__init__(FORMAT, DATE_FORMAT)
        self._second = -1
        self._time = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        return f"{self.formatTime(record)} {record.levelname} {record.getMessage()}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._time = super().formatTime(record, DATE_FORMAT)
            self._second = second
        return self._time


class _Line:
    """An INFO line queued by :func:`info` without a :class:`logging.LogRecord`: the
    fields the console's formatter and thread read, and no others."""

    __slots__ = ("args", "created", "message", "msg")
    levelname = "INFO"
    exc_info = exc_text = stack_info = None

    def __init__(self, msg: str, args: tuple[object, ...]) -> None:
        self.created = time.time()
        self.msg, self.args = msg, args

    def getMessage(self) -> str:  # the name the formatter calls
        return self.msg % self.args if self.args else self.msg


def info(logger: logging.Logger, msg: str, *args: object) -> None:
    """``logger.info(msg, *args)``, for the line every request writes.

    When the console is the only place such a line can go (no other handler or
    filter on the way, as the server sets it up), the line goes straight to the
    console's queue: a :class:`logging.LogRecord` and the handler chain cost as
    much as the rest of writing the line (measured). Anywhere else (a test's
    log capture, another handler), the logging module does it as usual.
    """
    handler = _console_only(logger)
    if handler is None or not _unchangeable(args):
        logger.info(msg, *args)
        return
    handler._records.append(_Line(msg, args))  # type: ignore[arg-type]


def _console_only(logger: logging.Logger) -> BatchingHandler | None:
    """The console handler, if an INFO line from ``logger`` would reach it and only it."""
    root = logging.root
    if logger.handlers or logger.filters or logger.parent is not root or not logger.propagate:
        return None
    if not logger.isEnabledFor(logging.INFO) or root.filters or len(root.handlers) != 1:
        return None
    handler = root.handlers[0]
    if type(handler) is not BatchingHandler or handler.filters or handler.level > logging.INFO:
        return None
    # Another formatter may read any record attribute; the console's reads those of _Line.
    return handler if type(handler.formatter) is ConsoleFormatter else None


class BatchingHandler(logging.Handler):
    """Collects records; a daemon thread formats and writes them in batches."""

    def __init__(
        self,
        stream: TextIO | None = None,
        interval: float = 0.1,
        redactor: Redactor | None = None,
    ) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.redactor = redactor or Redactor()
        self._records: collections.deque[logging.LogRecord] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fhp-console", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        # Arguments that cannot change (strings, numbers: the request line's) are
        # rendered by the thread; any other is rendered now, while it still means
        # what it meant. Either way a value cannot break the line it is in.
        if not _unchangeable(record.args):
            _render(record)
        self._records.append(record)  # thread-safe, wakes nobody

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write_pending()
        self._write_pending()

    def _write_pending(self) -> None:
        lines = []
        while self._records:
            record = self._records.popleft()
            try:
                if record.args:  # left by emit: strings and numbers only
                    _render(record, unchangeable=True)
                line = self.redactor.text(self.format(record))
                # A printable line holds no control character (most lines): no scan.
                if not line.isprintable():
                    line = escape_controls(line, keep_newlines=True)
                lines.append(line)
            except Exception:
                self.handleError(record)
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken terminal must never stop the proxy

    def close(self) -> None:
        """Write what is left and stop the thread."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        super().close()


def mask_with(redactor: Redactor) -> None:
    """Mask these secrets in every console line from now on (a reloaded config's keys)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BatchingHandler):
            handler.redactor = redactor


def setup(debug: bool, redactor: Redactor | None = None) -> BatchingHandler:
    """Route the proxy's logging to the console through a :class:`BatchingHandler`.

    ``redactor`` masks the configured secrets (key shapes are always masked).
    Close the returned handler at exit so the last lines are written.
    """
    # Nothing printed uses them, and each costs a lookup on every record made on
    # the event loop (the caller's frame above all): the logging module's own
    # documented switches for this.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = BatchingHandler(redactor=redactor)
    handler.setFormatter(ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    return handler
