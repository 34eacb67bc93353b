"""The yardstick: a bare aiohttp pass-through, the best a Python proxy can do here.

Forwards the body and Authorization to the upstream with one shared ClientSession and
relays the reply; streams are relayed as they arrive (iter_any). No logging, no checks.
Runs on uvloop when it is installed (the best the platform offers) and prints which
event loop it runs on.

Run: python bench/passthrough.py --port 9002 --upstream http://127.0.0.1:9001/v1/chat/completions
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": "application/json"}
    if auth := request.headers.get("Authorization"):
        headers["Authorization"] = auth
    async with request.app[SESSION].post(request.app[UPSTREAM], data=body, headers=headers) as up:
        ctype = up.headers.get("Content-Type", "application/json")
        if not ctype.startswith("text/event-stream"):
            return web.Response(status=up.status, body=await up.read(), content_type=ctype)
        resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="upstream chat completions URL")
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM] = args.upstream
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", chat)
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    loop = factory()
    print(f"event loop: {type(loop).__module__.partition('.')[0]}", flush=True)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        backlog=4096,
        access_log=None,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
