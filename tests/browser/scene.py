"""A proxy with a story to show: the fake upstream, the real proxy and a mix of requests.

Used by the browser tests and by ``screenshot.py``, so the README shows what the tests
check. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from first_hop_proxy.config import parse_config
from first_hop_proxy.server import RunningServer, start

from ..conftest import chat_body, default_settings, merge
from ..fake_upstream import FakeUpstream, Json, Sse, completion, text_chunks


async def start_proxy(
    upstream: FakeUpstream, folder: Path, settings: dict[str, Any] | None = None
) -> RunningServer:
    data = merge(default_settings(upstream, folder), settings or {})
    return await start(parse_config(data, base_dir=folder, env={}), "127.0.0.1", 0)


async def chat(
    session: aiohttp.ClientSession, proxy: RunningServer, **body: Any
) -> tuple[int, str]:
    """One chat request; its status and request id."""
    async with session.post(proxy.url + "/v1/chat/completions", json=chat_body(**body)) as resp:
        await resp.read()
        return resp.status, resp.headers["X-Request-ID"]


@asynccontextmanager
async def story(folder: Path) -> AsyncIterator[RunningServer]:
    """A proxy that has served a few of everything, with one stream still running."""
    upstream = await FakeUpstream().start()
    proxy = await start_proxy(upstream, folder)
    try:
        async with aiohttp.ClientSession() as session:
            upstream.queue(Json(delay=0.4, body=completion("Of course.")))
            await chat(session, proxy, model="claude-3-5-sonnet")
            upstream.queue(Sse(text_chunks("Once", " upon", " a time."), gap=0.05))
            await chat(session, proxy, stream=True, model="gemini-2.5-pro")
            upstream.queue(
                Json(503, body={"error": {"message": "The model is overloaded"}}),
                Json(503, body={"error": {"message": "The model is overloaded"}}),
                Json(delay=0.9),
            )
            await chat(session, proxy, model="gpt-4o")
            upstream.queue(Json(200, body=completion("", finish="stop")), Json(delay=1.3))
            await chat(session, proxy, model="gemini-2.5-pro")
            upstream.queue(Json(403, body={"error": {"message": "Your key has no access."}}))
            await chat(session, proxy, model="gpt-4o")
            upstream.queue(Sse(text_chunks("Sure", "!"), gap=0.1))
            await chat(session, proxy, stream=True, model="claude-3-5-sonnet")
            upstream.queue(Json(delay=2.1))
            await chat(session, proxy, model="deepseek-r1")
            upstream.queue(Sse(text_chunks(*["word "] * 400), gap=0.25))
            running = asyncio.ensure_future(chat(session, proxy, stream=True, model="gpt-4o"))
            try:
                await asyncio.sleep(0.6)
                yield proxy
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
    finally:
        await proxy.close()
        await upstream.close()
