"""Running the proxy: bind, serve, and stop gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .app import create_app
from .config import LoadedConfig
from .connections import ConnectionLimits, GuardedRunner, connection_cap, open_files_limit
from .demo import DEMO_PATH
from .reload import Reloader
from .shutdown import DRAIN, ENDING_SECONDS
from .state import STATE

log = logging.getLogger("first_hop_proxy")

# A burst of hundreds of SillyTavern connections must not overflow the listen queue.
BACKLOG = 4096
# Collections of the young generation every 20,000 net allocations instead of 700:
# a request allocates hundreds of objects, so the default collects several times
# per request, and the older generations then get walked often too.
GC_THRESHOLDS = (20_000, 20, 50)


def tune_gc() -> None:
    """Fewer garbage collections, none of which walks the objects made at start-up.

    ``gc.freeze`` moves everything alive now (modules, the app, the compiled
    config) out of the collector's sight; it stays alive for the whole run.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(use_uvloop: bool) -> LoopFactory | None:
    """uvloop's event loop when wanted and installed (the ``fast`` extra), else None.

    None means asyncio's own loop. uvloop does the same work for less CPU per
    request (measured in bench/); it is optional, so the proxy runs without it.
    """
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def event_loop_name() -> str:
    """``uvloop`` or ``asyncio``: the running loop's library, for the start-up line."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


@dataclass(eq=False)
class RunningServer:
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the grace time), close."""
        await self.runner.cleanup()

    def hurry(self) -> None:
        """While closing: end the requests in progress now instead of after the grace."""
        self.runner.app[DRAIN].hurry()


async def start(
    loaded: LoadedConfig, host: str | None = None, port: int | None = None
) -> RunningServer:
    """Start serving ``loaded`` on ``host:port`` (port 0: any free port)."""
    server = loaded.config.server
    host = host or server.host
    port = server.port if port is None else port
    app = create_app(loaded, host)
    cap = connection_cap(server.max_connections, open_files_limit())
    if cap < server.max_connections:
        log.warning(
            "server.max_connections: %d lowered to %d, as this system lets the proxy open "
            "only %s files (ulimit -n)",
            server.max_connections,
            cap,
            open_files_limit(),
        )
    runner = GuardedRunner(
        app,
        ConnectionLimits(server.client_timeout, cap),
        handler_cancellation=True,  # a client that leaves cancels its upstream request at once
        # The grace is spent waiting for chat requests (shutdown.Drain); what is left
        # after that (a /models call) gets this much more.
        shutdown_timeout=ENDING_SECONDS,
        access_log=None,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=BACKLOG, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    sockets = runner.addresses
    bound = sockets[0][1] if sockets else port
    if loaded.demo:
        local = "127.0.0.1" if ":" not in host else "::1"
        app[STATE].upstreams[0].url = RunningServer(runner, local, bound).url + DEMO_PATH
    return RunningServer(runner, host, bound)


async def serve_forever(
    loaded: LoadedConfig,
    host: str | None,
    port: int | None,
    on_ready: object = None,
    reload: tuple[Path, Callable[[], LoadedConfig]] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully; a second signal
    ends the requests still in progress at once.

    ``reload``: the config file to watch and how to load it; it is loaded
    again when it changes (``server.reload_on_change``) and on SIGHUP.
    """
    running = await start(loaded, host, port)
    tune_gc()
    if callable(on_ready):
        on_ready(running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            running.hurry()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):  # Windows
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(on_signal))
    watcher: asyncio.Task[None] | None = None
    if reload is not None:
        reloader = Reloader(running.runner.app[STATE], *reload)
        hangup = getattr(signal, "SIGHUP", None)
        if hangup is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(hangup, reloader.reload, "SIGHUP")
        if loaded.config.server.reload_on_change:
            watcher = asyncio.ensure_future(reloader.watch(stop))
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher
        await running.close()


def run(
    loaded: LoadedConfig,
    host: str | None,
    port: int | None,
    on_ready: object = None,
    reload: tuple[Path, Callable[[], LoadedConfig]] | None = None,
    *,
    use_uvloop: bool = True,
) -> None:
    """``serve_forever`` on uvloop when ``use_uvloop``, ``server.uvloop`` and installed."""
    factory = loop_factory(use_uvloop and loaded.config.server.uvloop)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve_forever(loaded, host, port, on_ready, reload))
