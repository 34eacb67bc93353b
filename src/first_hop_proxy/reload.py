"""Config changes without a restart: the file is watched (and SIGHUP heard), all or nothing.

People tune rewrite rules and retry settings while they chat. When the config
file changes, it is loaded again; a config that fails validation is refused as
a whole (the old one keeps serving, and each problem is one console line and
goes to the error log). Requests in flight keep the settings they started with
(:class:`state.Settings`); breakers and records carry over for upstreams whose
URL did not change. The watching is done by ``watchfiles`` (inotify, FSEvents,
ReadDirectoryChangesW): no polling loop of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
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

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload whenever the file changes, until ``stop`` is set."""
        from watchfiles import awatch  # imported here: only a running server needs it

        folder = self.path.parent
        name = self.path.name

        def ours(_change: object, path: str) -> bool:
            return Path(path).name == name

        try:
            async for _ in awatch(
                folder,
                watch_filter=ours,
                debounce=DEBOUNCE_MS,
                stop_event=stop,
                recursive=False,
            ):
                if self.changed():
                    self.reload()
        except (OSError, RuntimeError) as exc:  # e.g. the folder is gone, no watch handles
            log.warning(
                "config: watching %s for changes stopped (%s); SIGHUP still reloads it",
                folder,
                exc,
            )


def _digest(path: Path) -> bytes | None:
    with contextlib.suppress(OSError):
        return hashlib.sha256(path.read_bytes()).digest()
    return None
