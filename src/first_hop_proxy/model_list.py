"""``GET /models``: the upstreams' lists merged, or their last good ones, or a default.

SillyTavern reads ``data[].id`` to fill its model picker; a failing list must
never show as an error page, so this endpoint always answers 200. With several
upstreams, the healthy ones are asked at once and their lists merged: each
model once, under the name this proxy knows it by (``model_map``), and only
the models an upstream serves (``models``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .headers import is_empty_value
from .state import STATE
from .upstream import TRANSPORT_ERRORS
from .upstreams import Upstream

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


def model_entry(model: str, owner: str = "first-hop-proxy") -> dict[str, Any]:
    return {"id": model, "object": "model", "created": int(time.time()), "owned_by": owner}


def default_list() -> dict[str, Any]:
    return {"object": "list", "data": [model_entry(m) for m in DEFAULT_MODELS]}


async def fetch_list(
    session: aiohttp.ClientSession, upstream: Upstream, client_auth: str
) -> tuple[bytes | None, str]:
    """One upstream's list (raw JSON) and where it came from: ``upstream`` or ``cache``."""
    # The configured headers (keys) and the client's own key when none is configured.
    headers = dict(upstream.headers)
    if not is_empty_value(client_auth) and "authorization" not in {k.lower() for k in headers}:
        headers["Authorization"] = client_auth
    try:
        async with session.get(
            models_url(upstream.url), headers=headers, timeout=LIST_TIMEOUT
        ) as resp:
            body = await resp.read()
            if resp.status == 200:
                parsed = orjson.loads(body)
                if isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
                    upstream.last_models = body
                    return body, "upstream"
    except (*TRANSPORT_ERRORS, orjson.JSONDecodeError):
        pass
    return upstream.last_models, "cache"


def entries_of(upstream: Upstream, raw: bytes | None) -> list[dict[str, Any]]:
    """The models one upstream offers, under our names, only those it serves.

    Without a list from it, the names its config gives (literal ``models`` and
    ``model_map`` keys) stand in.
    """
    if raw is None:
        names = [m for m in (upstream.patterns or ()) if not any(c in m for c in "*?[")]
        names += [m for m in upstream.model_map if m not in names]
        return [model_entry(name, upstream.name) for name in names]
    data = orjson.loads(raw).get("data") or []
    out = []
    for item in data:
        if not isinstance(item, Mapping) or not isinstance(item.get("id"), str):
            continue
        ours = upstream.our_name(item["id"])
        if upstream.serves(ours):
            out.append({**item, "id": ours})
    return out


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    upstreams = state.settings.upstreams
    asked = [u for u in upstreams if u.available()] or list(upstreams)
    answers: list[tuple[bytes | None, str]]
    if request.method == "HEAD":  # a probe: answered from what is known, no upstream call
        answers = [(u.last_models, "cache") for u in asked]
    else:
        # A client key that is one of server.api_keys is the proxy's, not the upstream's.
        consumed = "authorization" in state.access.consumed_headers
        auth = "" if consumed else request.headers.get("Authorization", "")
        answers = await asyncio.gather(*(fetch_list(state.session, u, auth) for u in asked))
    if len(asked) == 1 and not asked[0].model_map and asked[0].patterns is None:
        raw, source = answers[0]
        if raw is not None:  # one plain upstream: its list exactly as it sent it
            return _answer(raw, source)
    merged: dict[str, dict[str, Any]] = {}
    for upstream, (raw, _) in zip(asked, answers, strict=True):
        for entry in entries_of(upstream, raw):
            merged.setdefault(entry["id"], entry)
    if not merged:
        return _answer(orjson.dumps(default_list()), "default")
    fresh = all(source == "upstream" for _, source in answers)
    body = orjson.dumps({"object": "list", "data": list(merged.values())})
    return _answer(body, "upstream" if fresh else "cache")


def _answer(body: bytes, source: str) -> web.Response:
    return web.Response(
        body=body, content_type="application/json", headers={"X-Models-Source": source}
    )
