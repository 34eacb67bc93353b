"""SIGTERM: requests get shutdown_grace_seconds to finish, then end with a message."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson

from .conftest import chat_body, free_port
from .fake_upstream import Behaviour, FakeUpstream, Hang, Sse, text_chunks
from .log_helpers import request_logs
from .test_cli import MODULE, Proxy, serving, write_config

LONG_STREAM = Sse(text_chunks(*["word "] * 300), gap=0.1)  # 30 s of words


async def start_stream(session: aiohttp.ClientSession, proxy: Proxy) -> aiohttp.ClientResponse:
    """A stream request, once its first words have arrived."""
    resp = await session.post(proxy.url + "/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    assert b"word" in await resp.content.readuntil(b"word")
    return resp


async def exit_time(proxy: Proxy, sent: float) -> float:
    """Seconds from ``sent`` until the process exited (after reading its stderr)."""
    _, err = await asyncio.wait_for(proxy.process.communicate(), 30)
    proxy.stderr = err.decode()
    assert proxy.process.returncode == 0, proxy.stderr
    return time.monotonic() - sent


def last_events(text: str) -> list[str]:
    return text.strip().split("\n\n")[-2:]


@asynccontextmanager
async def proxy_with_grace(
    tmp_path: Path, grace: float, *behaviours: Behaviour
) -> AsyncIterator[tuple[Proxy, FakeUpstream, aiohttp.ClientSession]]:
    """The proxy as a process, with ``shutdown_grace_seconds: grace``, before an upstream
    that answers ``behaviours`` in turn; and a client session."""
    upstream = await FakeUpstream().start()
    try:
        upstream.queue(*behaviours)
        port = free_port()
        write_config(
            tmp_path / "config.yaml",
            f"target_proxy:\n  url: {upstream.chat_url}\n"
            f"server:\n  port: {port}\n  shutdown_grace_seconds: {grace}\n",
        )
        async with serving([*MODULE], tmp_path, port) as proxy, aiohttp.ClientSession() as session:
            yield proxy, upstream, session
    finally:
        await upstream.close()


async def test_after_the_grace_open_requests_end_with_a_message_and_a_log(
    tmp_path: Path,
) -> None:
    async with proxy_with_grace(tmp_path, 1, LONG_STREAM, Hang(60)) as (proxy, upstream, session):
        stream = await start_stream(session, proxy)
        waiting = asyncio.ensure_future(
            session.post(proxy.url + "/v1/chat/completions", json=chat_body())
        )
        while upstream.calls < 2:
            await asyncio.sleep(0.01)
        sent = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(stream.read(), 10)).decode()
        ended = time.monotonic() - sent
        json_reply = await asyncio.wait_for(waiting, 10)
        took = await exit_time(proxy, sent)
        json_error = (await json_reply.json())["error"]
    error_event, done = last_events(rest)
    error = orjson.loads(error_event.removeprefix("data: "))["error"]
    assert done == "data: [DONE]"
    assert error["code"] == "shutting_down"
    assert error["message"].startswith("The proxy is shutting down, so this reply was ended")
    assert rest.count('"content":"word "') >= 5  # it kept streaming during the grace
    assert 0.9 < ended < 2
    assert json_reply.status == 503 and json_error["code"] == "shutting_down"
    assert took < 1 + 2
    logs = [p.read_text() for p in request_logs(tmp_path / "logs").values()]
    assert len(logs) == 2
    assert all("ended: the proxy is shutting down" in log for log in logs)
    assert sorted(log.split("Final Status: ")[1][:3] for log in logs) == ["200", "503"]
    assert "Traceback" not in proxy.stderr


async def test_a_second_signal_ends_open_streams_at_once(tmp_path: Path) -> None:
    async with proxy_with_grace(tmp_path, 30, LONG_STREAM) as (proxy, _, session):
        stream = await start_stream(session, proxy)
        sent = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        proxy.process.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(stream.read(), 10)).decode()
        took = await exit_time(proxy, sent)
    assert last_events(rest)[1] == "data: [DONE]"
    assert "shutting_down" in last_events(rest)[0]
    assert took < 2.5
