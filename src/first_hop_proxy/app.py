"""The application factory: routes, health pages and lifecycle, from one config."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from . import __version__
from .config import LoadedConfig
from .config_file import shown
from .dashboard import add_dashboard_routes
from .demo import add_demo_routes
from .errors import json_response
from .forwarding import chat_completions
from .logs.views import add_log_routes, logging_status
from .middleware import add_response_headers, front_door
from .model_list import list_models
from .redact import masked_url
from .shutdown import DRAIN, Drain
from .state import STATE, State, breaker_status, upstream_status, wall_clock
from .usage import add_usage_routes

# SillyTavern uses the base URL as typed, so a trailing slash doubles the one before
# the endpoint; these are served directly (no redirect: a redirected POST loses its body).
PREFIXES = ("", "/", "/v1", "/v1/")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=lambda o: orjson.dumps(o).decode())


async def health_detailed(request: web.Request) -> web.Response:
    state = request.app[STATE]
    config = state.config
    eh = config.error_handling
    status, reason = state.health()
    settings = state.settings
    first = settings.upstreams[0]
    body: dict[str, Any] = {
        "status": status,
        "reason": state.redactor.text(reason),
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - state.started, 3),
        "demo_mode": state.loaded.demo,
        "config": {
            "file": shown(settings.loaded.path) if settings.loaded.path else None,
            "loaded_at": wall_clock(settings.loaded_at),
            "warnings": [state.redactor.text(w) for w in settings.loaded.warnings],
        },
        "target_url": masked_url(first.url),
        "retry": {
            "max_retries": eh.max_retries,
            "base_delay": eh.base_delay,
            "max_delay": eh.max_delay,
            "retry_codes": sorted(eh.retry_codes),
            "fail_codes": sorted(eh.fail_codes),
            "conditional_retry_codes": sorted(eh.conditional_retry_codes),
            "conditional_retry_enabled": eh.conditional_retry_enabled,
            "max_total_seconds": eh.max_total_seconds,
        },
        "counters": state.counters.snapshot(),
        "circuit_breaker": breaker_status(first),
        "upstreams": [upstream_status(u, state.redactor) for u in settings.upstreams],
        "routing": config.routing.model_dump(mode="json"),
        "logging": logging_status(state.writer, state.request_log, state.error_log),
        "usage": state.usage.status(),
    }
    return json_response(body)


async def metrics(request: web.Request) -> web.StreamResponse:
    """``GET /metrics``: :mod:`metrics` (and ``prometheus_client``) loads on the first scrape."""
    from .metrics import metrics as page

    return await page(request)


def add_routes(app: web.Application) -> None:
    for prefix in PREFIXES:
        app.router.add_post(prefix + "/chat/completions", chat_completions)
        app.router.add_get(prefix + "/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/health/detailed", health_detailed)


def create_app(loaded: LoadedConfig, host: str | None = None) -> web.Application:
    """Build the application for one config, to listen on ``host`` (default ``server.host``).

    In demo mode the server points the one upstream at the built-in demo
    upstream once it knows its own port.
    """
    config = loaded.config
    app = web.Application(
        client_max_size=int(config.server.max_body_mb * 1024 * 1024),
        middlewares=[front_door()],
        handler_args={"max_field_size": 65536},
    )
    state = State.build(loaded, host)
    app[STATE] = state
    app[DRAIN] = drain = Drain(config.server.shutdown_grace_seconds)
    app.on_shutdown.append(drain.on_shutdown)
    app.on_response_prepare.append(add_response_headers)
    add_routes(app)
    add_log_routes(app, lambda: (state.request_log, state.error_log))
    add_usage_routes(app, state.usage)
    app.router.add_get("/metrics", metrics)
    add_dashboard_routes(app)
    if loaded.demo:
        add_demo_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await state.start()
        yield
        await state.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


__all__ = ["create_app"]
