"""A single background thread that does all log file I/O.

Disk writes, directory scans and log formatting can take milliseconds to
seconds (slow disks, large bodies); none of it may run on the event loop. The
server only enqueues work; a broken log folder never turns into a failed request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..redact import redact_text

logger = logging.getLogger("first_hop_proxy")

WARN_INTERVAL_SECONDS = 60.0
#: How often the writer thread looks for queued jobs. Waking it per job costs
#: the event loop more than the job (measured: a thread wake-up and a GIL
#: hand-over per request, a fifth of the proxy's CPU under load); logs reach
#: the disk at most this much later.
BATCH_INTERVAL_SECONDS = 0.05
#: The writer thread's nice value (Linux): when the two share a CPU, the OS
#: runs the event loop's thread first. Logs can wait; replies cannot.
WRITER_NICE = 10
MAX_NAME_SUFFIX = 10_000

Job = Callable[[], object]


# Exclusive create, no inheritance by child processes, no newline translation on Windows.
CREATE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)


def _create(path: Path) -> int:
    try:
        return os.open(path, CREATE_FLAGS, 0o644)
    except FileNotFoundError:
        # The folder is made on first need (or again, if someone removed it),
        # not checked before every write.
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, CREATE_FLAGS, 0o644)


OVERWRITE_FLAGS = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _reuse(old: Path, new: Path) -> int | None:
    """Move ``old`` (a file due for removal) to the free name ``new`` and open it for writing.

    Creating a file allocates an inode; on ext4, after many deletions (a log
    folder at ``max_files`` deletes one file per file it writes), that search
    costs 150-870 us of CPU per file, against about 20 us for this. Returns None
    when ``old`` cannot be reused (gone, no hard links on this file system);
    raises FileExistsError, like an exclusive create, when ``new`` is taken.
    """
    try:
        os.link(old, new)
    except FileExistsError:
        raise
    except OSError:
        return None
    try:
        os.unlink(old)
        return os.open(new, OVERWRITE_FLAGS)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(new)
        return None


def write_new_file(
    path: str | os.PathLike[str],
    text: str | Callable[[str], str],
    reuse: Path | None = None,
) -> Path:
    """Create ``path`` (or ``name_2.ext``, ``name_3.ext``…) and write ``text`` in one go.

    Exclusive create means two events never overwrite each other's file; the
    path actually used is returned. ``text`` may be a function of the chosen
    file name, for files that mention their own name. Plain ``os`` calls: a
    buffered file object adds system calls that one write does not need.
    ``reuse`` names a file the caller is about to delete (the oldest log): when
    it can, its inode is given the new name and overwritten instead, so it no
    longer exists under its old name afterwards.
    """
    target = Path(path)
    for n in range(1, MAX_NAME_SUFFIX):
        candidate = target if n == 1 else target.with_name(f"{target.stem}_{n}{target.suffix}")
        try:
            fd = _reuse(reuse, candidate) if reuse is not None else None
            if fd is None:
                reuse = None
                fd = _create(candidate)
        except FileExistsError:
            continue
        try:
            content = text(candidate.name) if callable(text) else text
            data = memoryview(content.encode("utf-8", errors="replace"))
            size = len(data)
            while data:
                data = data[os.write(fd, data) :]
            if reuse is not None:
                os.ftruncate(fd, size)  # cheaper than O_TRUNC, which frees every block first
        except BaseException:
            os.close(fd)
            candidate.unlink(missing_ok=True)  # no half-written or empty logs
            raise
        os.close(fd)
        return candidate
    raise FileExistsError(f"no free file name near {target}")


def remove_files(paths: list[Path]) -> int:
    """Delete ``paths``, skipping any that fail; returns how many are gone now.

    A file already missing counts as removed: the first file of a prune may
    have been reused for the newest log (see ``write_new_file``).
    """
    removed = 0
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            continue
        removed += 1
    return removed


#: How far the writer may fall behind before new droppable jobs (request logs of
#: plain successes) are dropped and counted: memory must not grow with load. Jobs
#: that are not droppable (every log of a failure) are never dropped for load; past
#: the same bound new requests wait for the writer instead (``wait_for_room``). At a
#: chat front-end's pace neither is ever reached.
MAX_QUEUED_JOBS = 2_000
MAX_QUEUED_BYTES = 256 * 1024 * 1024
#: A writer that has finished no job for this long while jobs wait is stuck (a hung
#: disk): requests stop waiting for it, so that a disk never stops the proxy serving.
STALL_SECONDS = 5.0


class LogWriter:
    """Runs log jobs one at a time, in order, on a dedicated daemon thread.

    Jobs are collected without waking the thread; it runs whatever has gathered
    every ``interval`` seconds (at once for ``drain`` and ``close``).
    ``submit``/``submit_call`` never block and never raise. Failures are counted
    and reported (at most one warning per ``warn_interval`` seconds) instead.

    When the thread falls behind, only jobs submitted as ``droppable`` (request
    logs of plain successes) are dropped and counted: past ``max_queued_jobs``
    jobs or ``max_queued_bytes`` of their data waiting. Every other job is kept;
    once those alone reach the bound, ``behind`` turns true and the server waits
    in ``wait_for_room`` before taking more work, which bounds memory without
    losing a failure's log. Only a stuck thread (a hung disk: no job finished
    for ``stall_seconds``) ends that wait; while it is stuck and behind, new
    jobs are refused and counted in ``lost``, since none reaches the disk anyway.
    """

    def __init__(
        self,
        *,
        warn_interval: float = WARN_INTERVAL_SECONDS,
        on_failure: Callable[[str], None] | None = None,
        max_queued_jobs: int = MAX_QUEUED_JOBS,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        interval: float = BATCH_INTERVAL_SECONDS,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self._jobs: collections.deque[Job] = collections.deque()  # appends wake nobody
        self._wake = threading.Event()
        self.interval = interval
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._warn_interval = warn_interval
        # Called with the redacted message, at most once per warn_interval, on the
        # worker thread: lets the server record a ``log_write_error`` event.
        self.on_failure = on_failure
        self._last_warning = -float("inf")
        self._last_drop_warning = -float("inf")
        self.max_queued_jobs = max_queued_jobs
        self.max_queued_bytes = max_queued_bytes
        self.stall_seconds = stall_seconds
        self._queued_bytes = 0
        self._kept_jobs = 0  # queued jobs that are not droppable, and their bytes
        self._kept_bytes = 0
        self._progress = time.monotonic()  # when the thread last finished a job
        #: True while the kept jobs waiting alone fill the bound (read on the event loop).
        self.behind = False
        self.dropped = 0
        self.lost = 0
        self.waits = 0
        self.submitted = 0
        self.completed = 0
        self.written = 0
        self.failures = 0
        self.suppressed_warnings = 0
        self.last_error: str | None = None
        #: Work run on every batch while registered (:meth:`tend`).
        self._tended: dict[int, Job] = {}

    async def start(self) -> None:
        """Start the worker thread (also started on the first submit)."""
        self._ensure_thread()

    async def close(self) -> None:
        """Finish every queued job, then stop the worker thread."""
        thread = self._thread
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if thread is None:
            return
        self._wake.set()
        await asyncio.to_thread(thread.join)

    async def drain(self) -> None:
        """Wait until every job submitted so far has run."""
        if self._closed or self._thread is None:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not done.done():
                done.set_result(None)

        def signal() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(resolve)

        self._put(signal, count=False)
        self._wake.set()
        await done

    def submit(self, path: str | os.PathLike[str], text: str) -> None:
        """Queue writing ``text`` to a new file at ``path``."""
        self.submit_call(lambda: self.write_file(path, text))

    def write_file(
        self,
        path: str | os.PathLike[str],
        text: str | Callable[[str], str],
        reuse: Path | None = None,
    ) -> Path:
        """Write a new file now (call on the worker thread); counted in ``written``."""
        written = write_new_file(path, text, reuse)
        self.written += 1
        return written

    def tend(self, key: int, fn: Job) -> None:
        """Run ``fn`` on the worker thread on every batch (every ``interval``) until
        :meth:`untend` (e.g. parsing a live stream's data as it comes, so that its
        raw events are not all held until it ends). ``fn`` must be safe to run at
        any moment and once more after ``untend``."""
        self._tended[key] = fn
        self._ensure_thread()

    def untend(self, key: int) -> None:
        self._tended.pop(key, None)

    def submit_call(self, fn: Job, size: int = 0, *, droppable: bool = False) -> bool:
        """Queue ``fn`` to run on the worker thread; its errors are counted, not raised.

        ``size`` is roughly how many bytes the job holds on to until it runs.
        ``droppable``: the job may be dropped when the writer is too far behind
        (only for logs of plain successes). Returns False when it was dropped.
        """
        if droppable:
            if len(self._jobs) >= self.max_queued_jobs or (
                size and self._queued_bytes + size > self.max_queued_bytes
            ):
                self.dropped += 1
                self._warn_drop("dropping new request logs of plain successes")
                return False
            if size:
                with self._lock:
                    self._queued_bytes += size
                self._put(_Sized(fn, size, self), count=True)
            else:
                self._put(fn, count=True)
            return True
        if self.behind and self.stalled():
            self.lost += 1
            self._warn_drop("its thread is stuck, so logs of failures cannot be queued")
            return False
        job = _Kept(fn, size, self)
        job.count(+1)
        if not self._put(job, count=True):
            job.count(-1)
            return False
        return True

    def _over_bound(self) -> bool:
        return (
            self._kept_jobs >= self.max_queued_jobs
            or self._kept_bytes >= self.max_queued_bytes // 2
        )

    def stalled(self) -> bool:
        """True when jobs wait but the thread has finished none for ``stall_seconds``."""
        return bool(self._jobs) and time.monotonic() - self._progress > self.stall_seconds

    async def wait_for_room(self) -> None:
        """Wait while the kept jobs alone fill the bound (``behind``) and the thread works.

        Backpressure: the logs of failures are never dropped for load, so the
        server takes new work only as fast as the writer keeps them. Returns at
        once when not ``behind``, and when the thread is stuck.
        """
        if not self.behind:
            return
        self.waits += 1
        while self.behind and not self._closed and not self.stalled():
            self._wake.set()
            await asyncio.sleep(self.interval)

    def _warn_drop(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_drop_warning >= self._warn_interval:
            self._last_drop_warning = now
            logger.warning(
                "log writer is %d jobs behind: %s until it catches up (%d dropped, %d lost so far)",
                len(self._jobs),
                what,
                self.dropped,
                self.lost,
            )

    def run(self, fn: Job) -> bool:
        """Run ``fn`` now on the calling thread with the worker's error handling.

        For code already on the worker thread, and for start-up before the loop.
        """
        try:
            fn()
        except Exception as exc:
            self._record_failure(exc)
            return False
        return True

    def status(self) -> dict[str, Any]:
        """Counters for ``/health/detailed``."""
        return {
            "running": self._thread is not None and self._thread.is_alive(),
            "queued": len(self._jobs),
            "submitted": self.submitted,
            "completed": self.completed,
            "written": self.written,
            "failures": self.failures,
            "dropped": self.dropped,
            "lost": self.lost,
            "behind": self.behind,
            "waits": self.waits,
            "last_error": self.last_error,
        }

    def _put(self, fn: Job, *, count: bool) -> bool:
        # Jobs queued by jobs (e.g. on_failure) are still run while closing.
        if self._closed and threading.current_thread() is not self._thread:
            self.failures += 1
            self.last_error = "log writer is closed"
            return False
        if count:
            self.submitted += 1
        self._ensure_thread()
        self._jobs.append(fn if count else _Uncounted(fn))
        return True

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None and not self._closed:
                thread = threading.Thread(target=self._work, name="fhp-log-writer", daemon=True)
                thread.start()
                self._thread = thread

    def _work(self) -> None:
        lower_priority()
        while True:
            closing = self._closed  # read first: jobs queued before close() still run
            self._progress = time.monotonic()
            if self._tended:
                for tended in list(self._tended.values()):  # a copy: the loop adds and removes
                    self.run(tended)
            while self._jobs:
                job = self._jobs.popleft()
                if isinstance(job, _Uncounted):
                    self.run(job.fn)
                elif self.run(job):
                    self.completed += 1
                self._progress = time.monotonic()
            if closing:
                return
            self._wake.wait(self.interval)
            self._wake.clear()

    def _record_failure(self, exc: BaseException) -> None:
        self.failures += 1
        message = redact_text(f"{type(exc).__name__}: {exc}")
        self.last_error = message
        now = time.monotonic()
        if now - self._last_warning >= self._warn_interval:
            self._last_warning = now
            extra = ""
            if self.suppressed_warnings:
                extra = f" ({self.suppressed_warnings} similar warnings suppressed)"
                self.suppressed_warnings = 0
            logger.warning("log write failed: %s%s", message, extra)
            if self.on_failure is not None:
                with contextlib.suppress(Exception):
                    self.on_failure(message)
        else:
            self.suppressed_warnings += 1


def lower_priority() -> None:
    """Give the calling thread a lower CPU priority, on Linux (a no-op elsewhere).

    Only Linux takes a thread id in ``setpriority``; on other systems the same
    call would address a process.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)


class _Sized:
    """A job that holds ``size`` bytes until it has run."""

    __slots__ = ("fn", "size", "writer")

    def __init__(self, fn: Job, size: int, writer: LogWriter) -> None:
        self.fn, self.size, self.writer = fn, size, writer

    def __call__(self) -> object:
        try:
            return self.fn()
        finally:
            with self.writer._lock:
                self.writer._queued_bytes -= self.size


class _Kept(_Sized):
    """A job that is never dropped for load: counted apart until it has run."""

    __slots__ = ()

    def count(self, sign: int) -> None:
        """Add this job to (+1) or take it from (-1) the writer's queued figures."""
        writer = self.writer
        with writer._lock:
            writer._queued_bytes += sign * self.size
            writer._kept_jobs += sign
            writer._kept_bytes += sign * self.size
            writer.behind = writer._over_bound()

    def __call__(self) -> object:
        try:
            return self.fn()
        finally:
            self.count(-1)


class _Uncounted:
    """A bookkeeping job (drain signals) left out of the written/submitted counters."""

    __slots__ = ("fn",)

    def __init__(self, fn: Job) -> None:
        self.fn = fn

    def __call__(self) -> object:
        return self.fn()
