"""Streaming relay, black-box: timing, framing, timeouts and the client leaving."""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp
import orjson

from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body, wait_until
from .fake_upstream import FakeUpstream, Sse, chunk, text_chunks

CHAT = "/v1/chat/completions"


def events_of(text: str) -> list[str]:
    """Split a relayed body as SillyTavern's browser code does: on blank lines."""
    assert text.endswith("\n\n"), repr(text[-40:])
    return text[:-2].split("\n\n")


def content_of(events: list[str]) -> str:
    out = ""
    for event in events:
        data = "\n".join(line[6:] for line in event.split("\n") if line.startswith("data: "))
        if not data or data == "[DONE]":
            continue
        delta = orjson.loads(data)["choices"][0]["delta"]
        out += delta.get("content") or ""
    return out


async def test_events_arrive_as_sent(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """Events 200 ms apart reach the client as separate reads about 200 ms apart."""
    words = ["one", " two", " three", " four"]
    upstream.queue(Sse([chunk(w, role=i == 0) for i, w in enumerate(words)], gap=0.2))
    reads: list[tuple[float, bytes]] = []
    async with client.post(proxy.url + CHAT, json=chat_body(stream=True)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        while True:
            data = await resp.content.readany()
            if not data:
                break
            reads.append((time.monotonic(), data))
    # One read per event: the first arrives alone, then each after its gap.
    assert len(reads) == len(words) + 1, [r[1] for r in reads]
    for (_, data), word in zip(reads, words, strict=False):
        assert data.endswith(b"\n\n") and data.count(b"\n\n") == 1
        assert orjson.dumps(word) in data
    assert reads[-1][1] == b"data: [DONE]\n\n"
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(reads)]
    assert all(gap >= 0.15 for gap in gaps), gaps
    assert all(gap < 0.6 for gap in gaps), gaps


async def test_stream_headers_and_framing(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Sse(text_chunks("Hello", " world")))
    async with client.post(proxy.url + CHAT, json=chat_body(stream=True)) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        assert resp.headers["X-Request-ID"]
        text = await resp.text()
    events = events_of(text)
    assert len(events) == 5
    assert all(e.startswith("data: ") and "\n\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    assert content_of(events) == "Hello world"


async def test_final_event_without_blank_line_gets_one(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    first = b"data: " + orjson.dumps(chunk("Hi", role=True)) + b"\n\n"
    last = b"data: " + orjson.dumps(chunk(" there", finish="stop"))  # no blank line after it
    upstream.queue(Sse([first, last], raw=True, end="close"))
    async with client.post(proxy.url + CHAT, json=chat_body(stream=True)) as resp:
        text = await resp.text()
    events = events_of(text)
    assert len(events) == 2
    assert content_of(events) == "Hi there"


async def test_events_split_and_merged_are_reframed(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    e1 = b"data: " + orjson.dumps(chunk("Alpha", role=True)) + b"\n\n"
    e2 = b"data: " + orjson.dumps(chunk(" beta")) + b"\n\n"
    e3 = b"data: " + orjson.dumps(chunk(" gamma")) + b"\r\n\r\n"
    e4 = b": a comment\nevent: message\ndata: " + orjson.dumps(chunk(" delta")) + b"\n\n"
    e5 = b"data: [DONE]\n\n"
    wire = e1 + e2 + e3 + e4 + e5
    cuts = [10, len(e1) + 3, len(e1) + len(e2) + len(e3) - 3, len(e1 + e2 + e3) + 5]
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    # Reads split events mid-line and merge the end of one with the start of the next.
    upstream.queue(Sse(pieces, raw=True, gap=0.05, end="close"))
    reads: list[bytes] = []
    async with client.post(proxy.url + CHAT, json=chat_body(stream=True)) as resp:
        while data := await resp.content.readany():
            reads.append(data)
    text = b"".join(reads).decode()
    events = events_of(text)
    assert len(events) == 5
    assert content_of(events) == "Alpha beta gamma delta"
    assert events[3].startswith(": a comment\n")
    assert events[-1] == "data: [DONE]"
    assert "\r" not in text
    # Nothing is sent before its event is complete.
    for data in reads:
        assert data.endswith(b"\n\n")


async def test_long_stream_with_short_gaps_completes(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """The timeout bounds the gap between events, not the length of the stream."""
    proxy = await start_proxy({"target_proxy": {"timeout": 0.3}})
    texts = [f"w{i} " for i in range(10)]
    upstream.queue(Sse(text_chunks(*texts), gap=0.1))
    started = time.monotonic()
    async with client.post(proxy.url + CHAT, json=chat_body(stream=True)) as resp:
        assert resp.status == 200
        text = await resp.text()
    assert time.monotonic() - started > 0.9  # longer than three timeouts
    events = events_of(text)
    assert content_of(events) == "".join(texts)
    assert events[-1] == "data: [DONE]"
    assert upstream.calls == 1


async def test_client_leaves_mid_stream(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """SillyTavern's Stop button: the upstream sees its connection closed within 1 s."""
    upstream.queue(Sse(text_chunks(*[f"t{i}" for i in range(40)]), gap=0.5))
    resp = await client.post(proxy.url + CHAT, json=chat_body(stream=True))
    assert resp.status == 200
    first = await resp.content.readany()
    assert first.startswith(b"data: ")
    resp.close()  # drop the connection, as a browser abort does
    left = time.monotonic()
    await wait_until(lambda: upstream.disconnects, 1.5)
    assert upstream.disconnects, "the upstream stream was not aborted"
    assert upstream.disconnects[0] - left < 1


async def test_client_leaves_before_first_content(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """Leaving while the proxy still waits for the first token aborts the upstream too."""
    upstream.queue(Sse([chunk(role=True, text=""), chunk("late")], gap=5))
    task = asyncio.create_task(client.post(proxy.url + CHAT, json=chat_body(stream=True)))
    await wait_until(lambda: upstream.calls, 2)
    await asyncio.sleep(0.05)
    task.cancel()
    left = time.monotonic()
    await wait_until(lambda: upstream.disconnects, 1.5)
    assert upstream.disconnects, "the upstream stream was not aborted"
    assert upstream.disconnects[0] - left < 1


async def test_concurrent_streams_do_not_mix(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(*(Sse(text_chunks(f"s{i}a", f"s{i}b"), gap=0.02) for i in range(5)))

    async def one() -> str:
        async with client.post(proxy.url + CHAT, json=chat_body(stream=True)) as resp:
            return content_of(events_of(await resp.text()))

    results = await asyncio.gather(*(one() for _ in range(5)))
    assert sorted(results) == sorted(f"s{i}as{i}b" for i in range(5))
