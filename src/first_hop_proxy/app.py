"""The application factory: routes, middlewares and lifecycle, from one config."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from . import __version__
from .config import LoadedConfig
from .demo import DEMO_PATH, add_demo_routes
from .errors import error_response
from .forwarding import chat_completions
from .model_list import CACHE, list_models
from .state import STATE, State
from .upstream import host_of

log = logging.getLogger("first_hop_proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# SillyTavern uses the base URL as typed, so a trailing slash doubles the one before
# the endpoint; these are served directly (no redirect: a redirected POST loses its body).
PREFIXES = ("", "/", "/v1", "/v1/")


REQUEST_ID = web.RequestKey("request_id", str)


def new_request_id() -> str:
    return secrets.token_hex(6)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    response = await handler(request)
    if not response.prepared:
        response.headers["X-Request-ID"] = request_id
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error the client sees is OpenAI-style JSON, never an HTML page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_error(exc, request)


def http_error(exc: web.HTTPException, request: web.Request) -> web.Response:
    if exc.status == 404:
        message = (
            f"No such endpoint: {request.method} {request.path}. This proxy serves "
            "POST /v1/chat/completions, GET /v1/models, GET /health and GET /health/detailed."
        )
        return error_response(404, message, "invalid_request_error", "not_found")
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        message = f"{request.method} is not allowed on {request.path}; use {allowed or 'another method'}."
        return error_response(
            405, message, "invalid_request_error", "method_not_allowed", headers={"Allow": allowed}
        )
    if exc.status == 413:
        limit = request.app[STATE].config.server.max_body_mb
        message = (
            f"The request body is larger than server.max_body_mb ({limit:g} MB). "
            "Send smaller images, or raise server.max_body_mb in config.yaml."
        )
        return error_response(413, message, "invalid_request_error", "request_too_large")
    return error_response(exc.status, exc.reason, "invalid_request_error", exc.status)


def cors_middleware(origins: list[str]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    allow_any = "*" in origins

    def allowed(origin: str) -> str | None:
        if allow_any:
            return "*"
        return origin if origin in origins else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            allow = allowed(origin or "")
            headers = {
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", "*"
                ),
                "Access-Control-Max-Age": "86400",
            }
            if allow:
                headers["Access-Control-Allow-Origin"] = allow
            return web.Response(status=204, headers=headers)
        response = await handler(request)
        allow = allowed(origin or "") if origin or allow_any else None
        if allow and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = allow
            response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, X-Models-Source"
        return response

    return middleware


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=lambda o: orjson.dumps(o).decode())


def masked_url(url: str) -> str:
    """The target URL without credentials or query values (keys often live there)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = host_of(url)
    if parts.username or parts.password:
        netloc = "***@" + netloc
    query = "&".join(
        f"{pair.split('=', 1)[0]}=***" if "=" in pair else pair
        for pair in parts.query.split("&")
        if pair
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


async def health_detailed(request: web.Request) -> web.Response:
    state = request.app[STATE]
    config = state.config
    eh = config.error_handling
    body: dict[str, Any] = {
        "status": "ok",
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - state.started, 3),
        "demo_mode": state.loaded.demo,
        "target_url": masked_url(state.target_url),
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
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def add_routes(app: web.Application) -> None:
    for prefix in PREFIXES:
        app.router.add_post(prefix + "/chat/completions", chat_completions)
        app.router.add_get(prefix + "/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/health/detailed", health_detailed)


def create_app(loaded: LoadedConfig, target_url: str | None = None) -> web.Application:
    """Build the application for one config.

    ``target_url`` overrides the configured one; in demo mode the server passes
    the address of the built-in demo upstream once it knows its own port.
    """
    config = loaded.config
    app = web.Application(
        client_max_size=int(config.server.max_body_mb * 1024 * 1024),
        middlewares=[
            request_id_middleware,
            cors_middleware(config.server.cors_origins),
            error_middleware,
        ],
        handler_args={"max_field_size": 65536},
    )
    state = State(loaded=loaded, target_url=target_url or config.target_proxy.url)
    app[STATE] = state
    app[CACHE] = {}
    add_routes(app)
    if loaded.demo:
        add_demo_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        state.open_session()
        yield
        await state.close_session()

    app.cleanup_ctx.append(lifecycle)
    return app


__all__ = ["DEMO_PATH", "create_app"]
