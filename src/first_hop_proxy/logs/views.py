"""HTTP views of the request and error logs (``/logs/errors``, ``/logs/requests``).

Log names come from the URL, so every name is checked before it touches the
file system: only plain ``*.log`` files directly inside the log folder can be
read, never a path outside it and never through a symlink. Directory scans and
file reads run in a thread so the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ..errors import error_response, json_response
from .error_log import ErrorLog, scan_error_files
from .request_log import RequestLog
from .writer import LogWriter

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\.log$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_ENCODED_SEPARATORS = ("%2f", "%5c", "%00", "%2e%2e")


INVALID = "invalid_request_error"


def parse_limit(request: web.Request) -> int | web.Response:
    """``?limit=`` as an int in 1..1000 (larger values are capped), or a 400 response."""
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        return error_response(
            400, f"limit must be a whole number from 1 to {MAX_LIMIT}", INVALID, "invalid_limit"
        )
    return min(limit, MAX_LIMIT)


def safe_log_name(request: web.Request, name: str, pattern: re.Pattern[str]) -> bool:
    """Whether ``name`` from the URL can only mean a file directly inside a log folder."""
    raw = request.raw_path.lower()
    if any(sep in raw for sep in _ENCODED_SEPARATORS):
        return False
    if ".." in name or "/" in name or "\\" in name or "\x00" in name:
        return False
    return pattern.match(name) is not None


def read_log_file(folder: str | os.PathLike[str], name: str) -> bytes | None:
    """The content of the regular file ``name`` directly inside ``folder``, else ``None``.

    Symlinks are refused, and the resolved path must still be inside the folder.
    """
    try:
        root = os.path.realpath(folder)
        path = os.path.join(root, name)
        if os.path.dirname(path) != root:
            return None
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        if os.path.commonpath([os.path.realpath(path), root]) != root:
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return f.read()
    except (OSError, ValueError):
        return None


def _text_response(content: bytes) -> web.Response:
    return web.Response(
        body=content,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


class LogViews:
    """The four log endpoints, reading the running proxy's current logs (a reload that
    changes a log's settings gives it a new one)."""

    def __init__(self, logs: Callable[[], tuple[RequestLog, ErrorLog]]) -> None:
        self._logs = logs

    @property
    def request_log(self) -> RequestLog:
        return self._logs()[0]

    @property
    def error_log(self) -> ErrorLog:
        return self._logs()[1]

    async def errors(self, request: web.Request) -> web.Response:
        """``GET /logs/errors``: what happened since start-up (counted in memory) and
        what is on disk (the files kept after rotation), labelled as such, plus the
        newest files."""
        limit = parse_limit(request)
        if isinstance(limit, web.Response):
            return limit
        files = await asyncio.to_thread(scan_error_files, self.error_log.folder)
        status = self.error_log.status()
        files_by_code: dict[str, int] = {}
        for f in files:
            files_by_code[f.code] = files_by_code.get(f.code, 0) + 1
        return json_response(
            {
                "enabled": status["enabled"],
                "since_start": {
                    "errors": status["total"],
                    "by_code": status["by_code"],
                    "by_type": status["by_type"],
                },
                "on_disk": {
                    "files": len(files),
                    "size_bytes": sum(f.size for f in files),
                    "by_code": files_by_code,
                },
                "files": [f.as_dict() for f in reversed(files[-limit:])],
            }
        )

    async def error_file(self, request: web.Request) -> web.Response:
        """``GET /logs/errors/{name}``: one error log as text."""
        name = request.match_info["name"]
        if not safe_log_name(request, name, _SAFE_NAME):
            return error_response(400, "invalid error log name", INVALID, "invalid_log_name")
        content = await asyncio.to_thread(read_log_file, self.error_log.folder, name)
        if content is None:
            return error_response(404, f"no error log named {name}", INVALID, "log_not_found")
        return _text_response(content)

    async def requests(self, request: web.Request) -> web.Response:
        """``GET /logs/requests``: the most recent request logs, newest first."""
        limit = parse_limit(request)
        if isinstance(limit, web.Response):
            return limit
        entries = self.request_log.entries(limit)
        return json_response(
            {
                "enabled": self.request_log.enabled,
                "count": len(entries),
                "requests": [e.as_dict() for e in entries],
            }
        )

    async def request_file(self, request: web.Request) -> web.Response:
        """``GET /logs/requests/{request_id}``: one request log as text."""
        path = find_request_log(request, self.request_log)
        if isinstance(path, web.Response):
            return path
        content = await asyncio.to_thread(read_log_file, path.parent, path.name)
        if content is None:
            return not_logged(request)
        return _text_response(content)


def not_logged(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    return error_response(404, f"no request log for {request_id}", INVALID, "log_not_found")


def find_request_log(request: web.Request, request_log: RequestLog) -> Path | web.Response:
    """The log file of the request id in the URL, or the 400/404 to answer instead."""
    request_id = request.match_info["request_id"]
    if not safe_log_name(request, request_id, _SAFE_ID):
        return error_response(400, "invalid request id", INVALID, "invalid_request_id")
    path = request_log.path_for(request_id)
    if path is None:
        return not_logged(request)
    return path


def add_log_routes(app: web.Application, logs: Callable[[], tuple[RequestLog, ErrorLog]]) -> None:
    """Register ``GET /logs/errors[/{name}]`` and ``GET /logs/requests[/{request_id}]``."""
    views = LogViews(logs)
    app.router.add_get("/logs/errors", views.errors)
    app.router.add_get("/logs/errors/{name}", views.error_file)
    app.router.add_get("/logs/requests", views.requests)
    app.router.add_get("/logs/requests/{request_id}", views.request_file)


def logging_status(
    writer: LogWriter, request_log: RequestLog, error_log: ErrorLog
) -> dict[str, Any]:
    """The logging part of ``/health/detailed``."""
    return {
        "writer": writer.status(),
        "request_log": request_log.status(),
        "error_log": error_log.status(),
    }
