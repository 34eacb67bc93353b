"""The built-in demo upstream: what the proxy talks to when no target is set.

So that a fresh ``make run`` gives an endpoint SillyTavern can chat with at
once, and the reply itself says how to point the proxy at a real upstream.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
from aiohttp import web

from .errors import json_response
from .sse import DONE, frame

DEMO_PREFIX = "/__demo__/"
DEMO_PATH = DEMO_PREFIX + "v1/chat/completions"
DEMO_TEXT = (
    "Hello from first-hop-proxy's demo upstream! The proxy works, but no real "
    "upstream is set yet. Copy config.yaml.example to config.yaml and set "
    "target_proxy.url to your AI proxy's chat completions URL (or set the "
    "FHP_TARGET_URL environment variable), then restart the proxy."
)
BANNER = (
    "DEMO MODE: {why}, so replies come from the built-in demo upstream.\n"
    "  To use your AI proxy: cp config.yaml.example config.yaml, set target_proxy.url,\n"
    "  and restart (or set FHP_TARGET_URL)."
)


def banner(config_path: object | None) -> str:
    """The console banner of demo mode, saying why there is no upstream."""
    why = (
        "no config file found" if config_path is None else f"{config_path} sets no target_proxy.url"
    )
    return BANNER.format(why=why)


async def demo_chat(request: web.Request) -> web.StreamResponse:
    payload = orjson.loads(await request.read() or b"{}")
    model = payload.get("model") or "demo" if isinstance(payload, dict) else "demo"
    ident = f"chatcmpl-demo-{uuid.uuid4().hex[:12]}"
    created = int(time.time())
    if isinstance(payload, dict) and payload.get("stream") is True:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        words = DEMO_TEXT.split(" ")
        for i, word in enumerate(words):
            delta = {"content": word if i == 0 else " " + word}
            if i == 0:
                delta["role"] = "assistant"
            chunk = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
            await out.write(frame(orjson.dumps(chunk)))
            await asyncio.sleep(0.01)
        end = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        await out.write(frame(orjson.dumps(end)) + frame(DONE))
        await out.write_eof()
        return out
    reply = {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": DEMO_TEXT},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    return json_response(reply)


async def demo_models(request: web.Request) -> web.Response:
    body = {
        "object": "list",
        "data": [{"id": "demo", "object": "model", "created": 0, "owned_by": "first-hop-proxy"}],
    }
    return json_response(body)


def add_demo_routes(app: web.Application) -> None:
    app.router.add_post(DEMO_PATH, demo_chat)
    app.router.add_get(DEMO_PATH.removesuffix("/chat/completions") + "/models", demo_models)
