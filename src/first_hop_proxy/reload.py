"""Config changes without a restart: the file is watched (and SIGHUP heard), all or nothing.

People tune rewrite rules and retry settings while they chat. When the config
file changes, it is loaded again; a config that fails validation is refused as
a whole (the old one keeps serving, and each problem is one console line and
goes to the error log). Requests in flight keep the settings they started with
(:class:`state.Settings`); breakers and records carry over for upstreams whose
URL did not change. The file is watched by looking at its size, times and inode
once a second: one ``stat`` call, where a file-watching library (``watchfiles``
was used before) cost a thread of its own and 2.3 MB of memory, 2 % of the proxy's
budget at 1,000 streams, to say the same thing a second sooner.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from . import console
from .config import ConfigError, LoadedConfig
from .logs.error_log import ErrorEvent
from .redact import redact_text
from .state import Settings, State

log = logging.getLogger("first_hop_proxy")

#: Editors save in steps (truncate then write, or write then rename): wait this
#: long, in milliseconds, after the last change before reading the file.
DEBOUNCE_MS = 300
#: Seconds between two looks at the file.
POLL_SECONDS = 1.0
#: Server settings that only a restart can change (the socket and the app exist).
RESTART_KEYS = (
    "host",
    "port",
    "max_body_mb",
    "shutdown_grace_seconds",
    "client_timeout",
    "max_connections",
)


class Reloader:
    """Loads the config again and swaps the proxy's settings when it is valid."""

    def __init__(self, state: State, path: Path, load: Callable[[], LoadedConfig]) -> None:
        self.state = state
        self.path = path
        self._load = load
        self._digest = _digest(path)
        self.reloads = 0
        self.refusals = 0

    def reload(self, why: str = "the config file changed") -> bool:
        """Load the file and swap the settings; False (the old ones stay) if it is invalid."""
        digest = _digest(self.path)
        try:
            loaded = self._load()
        except ConfigError as exc:
            self.refusals += 1
            log.error("config reload refused (%s); the previous config stays in use:", why)
            for problem in exc.problems:
                log.error("  %s: %s", exc.source, redact_text(problem))
            self.state.error_log.log(
                ErrorEvent(
                    "config_error",
                    "ConfigError",
                    f"{exc.source}: reload refused, {len(exc.problems)} problem(s); "
                    "the previous config stays in use",
                    context={"source": exc.source, "problems": exc.problems, "trigger": why},
                )
            )
            return False
        self._digest = digest
        previous = self.state.settings
        for key in RESTART_KEYS:
            old = getattr(previous.config.server, key)
            new = getattr(loaded.config.server, key)
            if old != new:
                log.warning(
                    "config: server.%s changed from %s to %s; that takes effect after a restart",
                    key,
                    old,
                    new,
                )
        self.state.settings = Settings.build(loaded, self.state.writer, previous)
        console.mask_with(self.state.settings.redactor)  # the new config's keys, too
        logging.getLogger().setLevel(logging.DEBUG if loaded.config.server.debug else logging.INFO)
        self.reloads += 1
        for warning in loaded.warnings:
            log.warning("config: %s", redact_text(warning))
        log.info(
            "config reloaded from %s (%s); requests already under way finish with the old one",
            self.path,
            why,
        )
        return True

    def changed(self) -> bool:
        """Whether the file's content differs from what was last loaded (saves that
        rewrite the same bytes, and the watcher's echo of them, are not changes)."""
        return _digest(self.path) != self._digest

    async def watch(self, stop: asyncio.Event, every: float = POLL_SECONDS) -> None:
        """Reload whenever the file changes, until ``stop`` is set.

        A change is a new size, modification time, change time or inode (an editor
        that saves by renaming a new file over the old one); the file is read once it
        has stayed the same for ``DEBOUNCE_MS``, and reloaded if its bytes differ.
        """
        seen = _stamp(self.path)
        while not await _stopped(stop, every):
            now = _stamp(self.path)
            if now == seen:
                continue
            while not await _stopped(stop, DEBOUNCE_MS / 1000):
                seen, now = now, _stamp(self.path)
                if now == seen:
                    break
            if not stop.is_set() and self.changed():
                self.reload()


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``; True as soon as ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def _stamp(path: Path) -> tuple[int, ...] | None:
    """What tells a changed file without reading it; None while it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _digest(path: Path) -> bytes | None:
    with contextlib.suppress(OSError):
        return hashlib.sha256(path.read_bytes()).digest()
    return None
