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

from .config import LoadedConfig
from .config_file import INIT_COMMAND, shown, user_config_file
from .errors import json_response
from .sse import DONE, frame

DEMO_PREFIX = "/__demo__/"
DEMO_PATH = DEMO_PREFIX + "v1/chat/completions"
DEMO_TEXT = (
    "Hello from first-hop-proxy's demo upstream! The proxy works, but no real "
    f"upstream is set yet. Run `{INIT_COMMAND}` to write a starter config, set "
    "target_proxy.url in it to your AI proxy's chat completions URL (or set the "
    "FHP_TARGET_URL environment variable), then restart the proxy."
)
_DEMO = "so replies come from the built-in demo upstream."


def banner(loaded: LoadedConfig) -> str:
    """Why the proxy is in demo mode, where it looked for a config, and what to do next."""
    restart = "and restart (or set FHP_TARGET_URL)."
    if loaded.path is None:
        looked = ", ".join(
            ["--config (not given)", "$FHP_CONFIG (not set)", *map(shown, loaded.searched)]
        )
        user_file = shown(user_config_file())
        return (
            f"DEMO MODE: no config file found, {_DEMO}\n"
            f"  Looked for: {looked}.\n"
            f"  To use your AI proxy: run `{INIT_COMMAND}` (it writes {user_file}),\n"
            f"  set target_proxy.url there, {restart}"
        )
    path = shown(loaded.path)
    if loaded.empty:
        return (
            f"DEMO MODE: the config file {path} is empty, {_DEMO}\n"
            f"  To use your AI proxy: set target_proxy.url in it (or delete it and run\n"
            f"  `{INIT_COMMAND} {path}` for the commented starter config), {restart}"
        )
    return (
        f"DEMO MODE: the config file {path} sets no target_proxy.url (and no upstreams),\n"
        f"  {_DEMO} To use your AI proxy: set target_proxy.url in it, {restart}"
    )


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
