"""Console output that never costs the event loop a wait or a thread wake-up.

One line per request is part of the product, but writing it from the event
loop means a blocking write to the terminal, and handing each line to a
thread through a queue wakes that thread per request (measured: a fifth of
the proxy's time under load). Here records only go into a deque; a thread
writes whatever has gathered every ``interval`` seconds.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"


class BatchingHandler(logging.Handler):
    """Collects records; a daemon thread formats and writes them in batches."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.1) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._records: collections.deque[logging.LogRecord] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fhp-console", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        # The message is rendered now, while its arguments still mean what they meant.
        record.message = record.getMessage()
        record.msg, record.args = record.message, None
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
                lines.append(self.format(record))
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


def setup(debug: bool) -> BatchingHandler:
    """Route the proxy's logging to the console through a :class:`BatchingHandler`.

    Close the returned handler at exit so the last lines are written.
    """
    # Nothing printed uses them, and each costs a lookup on every record made on
    # the event loop (the caller's frame above all): the logging module's own
    # documented switches for this.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = BatchingHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    return handler
