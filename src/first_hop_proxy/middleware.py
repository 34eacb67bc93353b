"""The one middleware every request passes: request id, guard, CORS, counters, JSON errors.

One middleware rather than four: each layer costs a coroutine frame on every
request, and this is the proxy's hot path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from random import getrandbits

from aiohttp import web
from aiohttp.typedefs import Middleware

from .access import REALM
from .demo import DEMO_PREFIX
from .errors import error_response
from .guard import PUBLIC_PATHS
from .logs.error_log import ErrorEvent
from .redact import is_secret_header, redact_text
from .state import REQUEST_ID, STATE

log = logging.getLogger("first_hop_proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: The origin allowed to read the answer (None: no CORS header). Set on every request the
#: middleware sees, so that reading it never takes the missing-key path (an exception).
CORS_ORIGIN: web.RequestKey[str | None] = web.RequestKey("cors_origin")


def new_request_id() -> str:
    """12 hex digits. Not a secret (``GET /logs/requests`` lists them), so no system
    call: reading ``os.urandom`` hands the GIL to the log writer on every request."""
    return f"{getrandbits(48):012x}"


def request_id_of(request: web.BaseRequest) -> str:
    """The request's id (made on first use), as sent back in ``X-Request-ID``."""
    request_id = request.get(REQUEST_ID)
    if request_id is None:
        request_id = new_request_id()
        request[REQUEST_ID] = request_id
    return request_id


async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Runs as every response (streams included) is prepared: headers every answer has."""
    response.headers.setdefault("X-Request-ID", request_id_of(request))
    origin = request.get(CORS_ORIGIN)
    if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, X-Models-Source"
        if origin != "*":
            response.headers.add("Vary", "Origin")


def is_chat_request(request: web.Request) -> bool:
    return (
        request.method == "POST"
        and request.path.endswith("/chat/completions")
        and not request.path.startswith(DEMO_PREFIX)
    )


def front_door() -> Middleware:
    """The middleware in front of every handler.

    - every request gets an id, sent back in ``X-Request-ID``;
    - the guard (:mod:`guard`): a foreign ``Host`` gets 421, a foreign page 403;
    - the locks (:mod:`access`): the admin token on the admin routes, the
      client keys (``server.api_keys``) on the chat endpoints;
    - CORS: the allowed origin is remembered on the request and
      :func:`add_response_headers` puts it on the response (streams too);
      preflights are answered here;
    - chat requests are counted (total, in flight, by final status);
    - every error the client sees is OpenAI-style JSON, never an HTML page.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[REQUEST_ID] = new_request_id()  # the first to ask: made here, not looked up
        state = request.app[STATE]
        guard = state.guard
        headers = request.headers
        path = request.path
        host, origin = headers.get("Host"), headers.get("Origin")
        if not guard.host_allowed(host):
            return refuse(request, 421, foreign_host_message(host or ""), "host_not_allowed")
        if path not in PUBLIC_PATHS and not guard.origin_allowed(
            origin, headers.get("Sec-Fetch-Site"), host
        ):
            return refuse(request, 403, foreign_origin_message(origin), "origin_not_allowed")
        request[CORS_ORIGIN] = guard.cors_origin(origin, path)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in headers:
            return preflight(request)
        locked = state.access.refusal(path, headers)
        if locked is not None:
            return refuse(request, *locked)
        counters = state.counters if is_chat_request(request) else None
        if counters is not None:
            counters.requests += 1
            counters.in_flight += 1
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = http_error(exc, request)
        except Exception as exc:
            log.exception("internal error while serving %s %s", request.method, request.path)
            request.app[STATE].endpoint_error(request, exc)
            response = error_response(
                500,
                "The proxy hit an internal error while handling this request (request id "
                f"{request_id_of(request)}); the console has the details. Please report it.",
                "internal_error",
                "internal_error",
            )
        finally:
            if counters is not None:
                counters.in_flight -= 1
        if counters is not None:
            counters.by_status[response.status] += 1
        return response

    return middleware


def foreign_host_message(host: str) -> str:
    shown = redact_text(host)[:100].encode("ascii", "backslashreplace").decode()
    return (
        f"This proxy only answers requests addressed to it by IP address or as localhost; this "
        f"one was addressed to {shown!r}. A web page can point its own name at 127.0.0.1 to "
        "reach the proxy (DNS rebinding), so other names are refused. If you reach the proxy "
        "through that name yourself, add it to server.allowed_hosts in config.yaml."
    )


def foreign_origin_message(origin: str | None) -> str:
    shown = redact_text(origin or "another site")[:100].encode("ascii", "backslashreplace")
    return (
        f"Requests from web pages ({shown.decode()}) are refused: a page open in your browser "
        "could otherwise read your chats or spend your key. SillyTavern does not need this. To "
        "let a page you trust use the proxy, add its origin to server.cors_origins in config.yaml."
    )


def refuse(request: web.Request, status: int, message: str, code: str) -> web.Response:
    """A refusal (guard or lock): counted, logged without any credential the request
    carried, answered with a JSON error; a 401 says how to authenticate."""
    state = request.app[STATE]
    state.access.refused(
        state,
        ErrorEvent(
            code,
            "Unauthorized" if status == 401 else "Forbidden",
            message,
            status_code=status,
            request_id=request_id_of(request),
            method=request.method,
            path=request.path[:200],
            client=request.remote,
            headers={k: v for k, v in request.headers.items() if not is_secret_header(k)},
        ),
    )
    if status == 401:
        challenge = {"WWW-Authenticate": f'Bearer realm="{REALM}"'}
        return error_response(status, message, "authentication_error", code, headers=challenge)
    return error_response(status, message, "invalid_request_error", code)


def preflight(request: web.Request) -> web.Response:
    headers = {
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "*"),
        "Access-Control-Max-Age": "86400",
    }
    return web.Response(status=204, headers=headers)


def http_error(exc: web.HTTPException, request: web.Request) -> web.Response:
    if exc.status == 404:
        message = (
            f"No such endpoint: {request.method} {request.path}. This proxy serves "
            "POST /v1/chat/completions, GET /v1/models, GET /health, GET /health/detailed, "
            "the dashboard at / and GET /metrics."
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
