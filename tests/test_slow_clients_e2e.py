"""Slow clients are cut off after server.client_timeout; connections are capped."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson

from first_hop_proxy.connections import connection_cap
from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, raw_request
from .fake_upstream import FakeUpstream, Sse, text_chunks
from .log_helpers import request_logs, settle

TIMEOUT = 0.5  # server.client_timeout in these tests


async def read_all(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), seconds)


async def open_raw(proxy: RunningServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def trickle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, gap: float
) -> bytes:
    """Send ``data`` one byte every ``gap`` seconds until the server answers; its answer."""
    for byte in data:
        writer.write(bytes([byte]))
        try:
            answer = await asyncio.wait_for(reader.read(65536), gap)
        except TimeoutError:
            continue
        writer.close()
        return answer
    writer.close()
    raise AssertionError("the server took all of it without answering")


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def error_of(data: bytes) -> dict[str, str]:
    error: dict[str, str] = orjson.loads(data.partition(b"\r\n\r\n")[2])["error"]
    return error


async def test_half_sent_request_lines_are_closed_after_client_timeout(
    start_proxy: StartProxy,
) -> None:
    proxy = await start_proxy({"server": {"client_timeout": TIMEOUT}})
    connections = [await open_raw(proxy) for _ in range(200)]
    started = time.monotonic()
    for _, writer in connections:
        writer.write(b"POST /v1/chat/comp")
    answers = await asyncio.gather(*(read_all(reader, 5) for reader, _ in connections))
    took = time.monotonic() - started
    for _, writer in connections:
        writer.close()
    assert TIMEOUT * 0.8 < took < TIMEOUT + 2
    assert {status_of(a) for a in answers} == {408}
    error = error_of(answers[0])
    assert error["code"] == "request_timeout"
    assert "server.client_timeout (0.5 s)" in error["message"]


async def test_a_connection_that_sends_nothing_is_closed_too(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"server": {"client_timeout": TIMEOUT}})
    reader, writer = await open_raw(proxy)
    assert status_of(await read_all(reader, 3)) == 408
    writer.close()


async def test_headers_at_one_byte_at_a_time_are_cut_off(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"server": {"client_timeout": TIMEOUT}})
    reader, writer = await open_raw(proxy)
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"
    started = time.monotonic()
    answer = await trickle(reader, writer, request, 0.05)
    assert status_of(answer) == 408
    assert time.monotonic() - started < len(request) * 0.05  # long before all was sent
    assert time.monotonic() - started < TIMEOUT + 1.5


async def test_a_body_trickling_in_gets_a_408_and_a_request_log(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy({"server": {"client_timeout": TIMEOUT}})
    reader, writer = await open_raw(proxy)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    started = time.monotonic()
    answer = await trickle(reader, writer, b" " * 100, 0.1)
    assert status_of(answer) == 408
    assert "request body did not arrive within server.client_timeout" in error_of(answer)["message"]
    assert time.monotonic() - started < TIMEOUT + 1.5
    assert upstream.calls == 0
    await settle(proxy)
    [log] = request_logs(tmp_path / "logs").values()
    assert "Final Status: 408" in log.read_text()


async def test_a_slow_but_steady_stream_reply_is_not_cut(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """client_timeout is about receiving the request: a reply may take its time."""
    proxy = await start_proxy({"server": {"client_timeout": TIMEOUT}})
    upstream.queue(Sse(text_chunks("a", "b", "c", "d"), gap=0.3))
    body = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    answer = await raw_request(proxy.port, "POST", "/v1/chat/completions", body)
    assert answer.status == 200 and answer.body.endswith(b"data: [DONE]\n\n")


async def test_connections_beyond_the_cap_get_a_clear_503(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"server": {"max_connections": 5, "client_timeout": 10}})
    idle = [await open_raw(proxy) for _ in range(5)]
    await asyncio.sleep(0.1)
    over = await raw_request(proxy.port, "GET", "/health")
    assert over.status == 503
    assert over.headers["retry-after"] == "1"
    assert over.json["error"]["code"] == "too_many_connections"
    assert "5 connections open (server.max_connections)" in over.json["error"]["message"]
    _, writer = idle.pop()
    writer.close()
    await asyncio.sleep(0.1)
    assert (await raw_request(proxy.port, "GET", "/health")).status == 200
    for _, writer in idle:
        writer.close()


def test_the_cap_stays_below_the_open_file_limit() -> None:
    assert connection_cap(2048, None) == 2048
    assert connection_cap(2048, 1_048_576) == 2048
    assert connection_cap(2048, 1024) == (1024 - 64) // 2
    assert connection_cap(2048, 256) == 96
    assert connection_cap(2048, 10) == 1
