"""The dashboard's routes: the page, its static files and its JSON API.

Every path here is an admin route (:mod:`first_hop_proxy.access`): no CORS
headers, other pages refused, and the API behind the admin token when one is
in force. The page is plain HTML, CSS and JavaScript shipped inside the
package: nothing is fetched from anywhere else, so it works offline.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any

from aiohttp import web

from ..config_view import effective_config
from ..errors import error_response, json_response
from ..logs.request_detail import read_request_log
from ..logs.views import INVALID, find_request_log, not_logged
from ..state import STATE
from .errors import ErrorIndex
from .feed import events
from .health import health

STATIC_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
#: The page talks to this proxy only: no other host, no inline script, no framing.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": PAGE_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
ERROR_LIMIT = 100
MAX_ERROR_LIMIT = 500
ERROR_INDEX = web.AppKey("error_index", ErrorIndex)


def load_static() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once from the package: name -> (content, content type)."""
    files: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    return files


def api(data: Any) -> web.Response:
    response = json_response(data)
    response.headers.update(API_HEADERS)
    return response


class Dashboard:
    """The page and its API, bound to one running proxy."""

    def __init__(self) -> None:
        self.static = load_static()

    async def page(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def static_file(self, request: web.Request) -> web.Response:
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.Response:
        found = self.static.get(name)
        if found is None:
            return error_response(404, f"no dashboard file {name}", INVALID, "not_found")
        body, content_type = found
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
        return web.Response(body=body, content_type=content_type, headers=headers)

    async def health(self, request: web.Request) -> web.Response:
        return api(health(request.app[STATE]))

    async def config(self, request: web.Request) -> web.Response:
        state = request.app[STATE]
        loaded = state.loaded
        return api(
            {
                "config": effective_config(loaded),
                "warnings": [state.redactor.text(w) for w in loaded.warnings],
                "path": str(loaded.path) if loaded.path else None,
                "loaded_at": state.settings.loaded_at,
                "demo_mode": loaded.demo,
            }
        )

    async def request_detail(self, request: web.Request) -> web.Response:
        """One request's log, read back into its parts; 202 while it is being written."""
        state = request.app[STATE]
        if not state.request_log.enabled:
            return error_response(
                404,
                "Request logging is off (logging.enabled: false), so there is no detail to show.",
                INVALID,
                "logging_disabled",
            )
        path = find_request_log(request, state.request_log)
        if isinstance(path, web.Response):
            if path.status == 404 and state.hub.knows(request.match_info["request_id"]):
                return web.json_response({"pending": True}, status=202, headers=API_HEADERS)
            return path
        detail = await asyncio.to_thread(read_request_log, str(path))
        if detail is None:
            return not_logged(request)
        detail["file"] = path.name
        detail["raw"] = f"/logs/requests/{request.match_info['request_id']}"
        return api(detail)

    async def errors(self, request: web.Request) -> web.Response:
        """The error logs, newest first; ``?code=``, ``?upstream=``, ``?since=`` (Unix s)."""
        state = request.app[STATE]
        query = request.query
        try:
            since = float(query["since"]) if query.get("since") else None
            limit = min(int(query.get("limit", ERROR_LIMIT)), MAX_ERROR_LIMIT)
        except ValueError:
            return error_response(400, "since and limit must be numbers", INVALID, "invalid_filter")
        urls = {state.redactor.url(u.url): u.name for u in state.upstreams}
        listing = await asyncio.to_thread(
            request.app[ERROR_INDEX].listing,
            state.error_log.folder,  # the current one: a config reload may move it
            urls,
            code=query.get("code") or None,
            upstream=query.get("upstream") or None,
            since=since,
            limit=max(limit, 1),
        )
        listing["now"] = time.time()
        return api(listing)


def add_dashboard_routes(app: web.Application) -> None:
    """``/`` and ``/dashboard`` (the page), ``/dashboard/static/*`` and ``/dashboard/api/*``."""
    state = app[STATE]
    app[ERROR_INDEX] = ErrorIndex()
    views = Dashboard()
    app.router.add_get("/", views.page)
    app.router.add_get("/dashboard", views.page)
    app.router.add_get("/dashboard/static/{name}", views.static_file)
    app.router.add_get("/dashboard/api/events", events)
    app.router.add_get("/dashboard/api/health", views.health)
    app.router.add_get("/dashboard/api/config", views.config)
    app.router.add_get("/dashboard/api/errors", views.errors)
    app.router.add_get("/dashboard/api/requests/{request_id}", views.request_detail)

    async def close_feed(app: web.Application) -> None:
        state.hub.close()

    app.on_shutdown.append(close_feed)
