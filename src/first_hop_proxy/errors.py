"""OpenAI-style error bodies: the one shape every client-facing error takes.

SillyTavern shows only ``error.message``, so every message here is written for a
person: what happened and what to do about it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web


def error_body(message: str, type_: str, code: str | int | None = None, **extra: Any) -> bytes:
    """Serialize ``{"error": {...}}`` with the fields OpenAI clients expect."""
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    error.update((k, v) for k, v in extra.items() if v is not None)
    return orjson.dumps({"error": error})


def json_response(data: Any) -> web.Response:
    """``data`` as an ``application/json`` response, serialized by orjson."""
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | int | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """A JSON error response; never an HTML page."""
    return web.Response(
        status=status,
        body=error_body(message, type_, code, **extra),
        content_type="application/json",
        headers=headers,
    )
