"""The application factory: routes, middlewares and lifecycle, from one config."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from . import __version__
from .config import LoadedConfig
from .demo import DEMO_PATH, DEMO_PREFIX, add_demo_routes
from .errors import error_response
from .forwarding import chat_completions
from .log_views import add_log_routes, logging_status
from .model_list import CACHE, list_models
from .state import REQUEST_ID, STATE, State
from .upstream import host_of

log = logging.getLogger("first_hop_proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# SillyTavern uses the base URL as typed, so a trailing slash doubles the one before
# the endpoint; these are served directly (no redirect: a redirected POST loses its body).
PREFIXES = ("", "/", "/v1", "/v1/")


def new_request_id() -> str:
    return secrets.token_hex(6)


def request_id_of(request: web.BaseRequest) -> str:
    """The request's id (made on first use), as sent back in ``X-Request-ID``."""
    request_id = request.get(REQUEST_ID)
    if request_id is None:
        request_id = new_request_id()
        request[REQUEST_ID] = request_id
    return request_id


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id_of(request)
    return await handler(request)


async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Runs as every response (streams included) is prepared: headers every answer has."""
    response.headers.setdefault("X-Request-ID", request_id_of(request))
    origin = request.get(CORS_ORIGIN)
    if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, X-Models-Source"
        if origin != "*":
            response.headers.add("Vary", "Origin")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error the client sees is OpenAI-style JSON, never an HTML page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_error(exc, request)
    except Exception as exc:
        log.exception("internal error while serving %s %s", request.method, request.path)
        request.app[STATE].endpoint_error(request, exc)
        return error_response(
            500,
            "The proxy hit an internal error while handling this request (request id "
            f"{request_id_of(request)}); the console has the details. Please report it.",
            "internal_error",
            "internal_error",
        )


def is_chat_request(request: web.Request) -> bool:
    return (
        request.method == "POST"
        and request.path.endswith("/chat/completions")
        and (not request.path.startswith(DEMO_PREFIX))
    )


@web.middleware
async def counters_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Chat request counters for ``/health/detailed``: total, in flight, by final status."""
    if not is_chat_request(request):
        return await handler(request)
    counters = request.app[STATE].counters
    counters.requests += 1
    counters.in_flight += 1
    status = 499  # the client went away before an answer
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except Exception:
        status = 500
        raise
    finally:
        counters.in_flight -= 1
        counters.by_status[status] += 1


def http_error(exc: web.HTTPException, request: web.Request) -> web.Response:
    if exc.status == 404:
        message = (
            f"No such endpoint: {request.method} {request.path}. This proxy serves "
            "POST /v1/chat/completions, GET /v1/models, GET /health and GET /health/detailed."
        )
        return error_response(404, message, "invalid_request_error", "not_found")
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        message = (
            f"{request.method} is not allowed on {request.path}; use {allowed or 'another method'}."
        )
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


CORS_ORIGIN = web.RequestKey("cors_origin", str)


def cors_middleware(origins: list[str]) -> Middleware:
    """CORS for browser clients: any origin by default, else those in ``server.cors_origins``.

    The allowed origin is remembered on the request; :func:`add_response_headers`
    puts it on the response, so streamed answers carry it too.
    """
    allow_any = "*" in origins
    listed = {o.rstrip("/") for o in origins}

    def allowed(origin: str | None) -> str | None:
        if allow_any:
            return "*"
        return origin if origin is not None and origin.rstrip("/") in listed else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        allow = allowed(request.headers.get("Origin"))
        if allow is not None:
            request[CORS_ORIGIN] = allow
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            headers = {
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", "*"
                ),
                "Access-Control-Max-Age": "86400",
            }
            return web.Response(status=204, headers=headers)
        return await handler(request)

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


def breaker_status(state: State) -> dict[str, Any]:
    """The breaker's snapshot, its times moved from the monotonic clock to Unix time."""
    now_mono, now_wall = time.monotonic(), time.time()
    snapshot = state.breaker.snapshot(now_mono)
    for key in ("opened_at", "next_probe_at"):
        if snapshot.get(key) is not None:
            snapshot[key] = round(snapshot[key] - now_mono + now_wall, 3)
    return snapshot


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
        "circuit_breaker": breaker_status(state),
        "logging": logging_status(state.writer, state.request_log, state.error_log),
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
            counters_middleware,
            error_middleware,
        ],
        handler_args={"max_field_size": 65536},
    )
    state = State.build(loaded, target_url)
    app[STATE] = state
    app[CACHE] = {}
    app.on_response_prepare.append(add_response_headers)
    add_routes(app)
    add_log_routes(app, state.request_log, state.error_log)
    if loaded.demo:
        add_demo_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await state.start()
        yield
        await state.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


__all__ = ["DEMO_PATH", "create_app"]
