"""``GET /models``: the upstream's list, or the last good one, or a default.

SillyTavern reads ``data[].id`` to fill its model picker; a failing list must
never show as an error page, so this endpoint always answers 200.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .headers import is_empty_value
from .state import STATE
from .upstream import TRANSPORT_ERRORS

# SillyTavern waits for the list when it connects: a hung upstream must not stall it
# for the whole chat timeout before the cached or default list is offered.
LIST_TIMEOUT = aiohttp.ClientTimeout(total=10)
DEFAULT_MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "gemini-2.5-pro")


def models_url(target_url: str) -> str:
    """The target URL with its trailing ``/chat/completions`` replaced by ``/models``."""
    base = target_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base[: -len("/chat/completions")] + "/models"
    return base + "/models"


def default_list() -> dict[str, Any]:
    now = int(time.time())
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "first-hop-proxy"}
            for m in DEFAULT_MODELS
        ],
    }


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    url = models_url(state.target_url)
    # The configured headers (keys) and the client's own key when none is configured.
    headers = dict(state.headers)
    auth = request.headers.get("Authorization", "")
    if not is_empty_value(auth) and "authorization" not in {k.lower() for k in headers}:
        headers["Authorization"] = auth
    try:
        async with state.session.get(url, headers=headers, timeout=LIST_TIMEOUT) as resp:
            body = await resp.read()
            if resp.status == 200:
                parsed = orjson.loads(body)
                if isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
                    state.last_models = body
                    return _answer(body, "upstream")
    except (*TRANSPORT_ERRORS, orjson.JSONDecodeError):
        pass
    if state.last_models is not None:
        return _answer(state.last_models, "cache")
    return _answer(orjson.dumps(default_list()), "default")


def _answer(body: bytes, source: str) -> web.Response:
    return web.Response(
        body=body, content_type="application/json", headers={"X-Models-Source": source}
    )
