"""The resilience engine for streams: retried unseen before the first token, kept
alive while that takes long, and ended with an error event after content.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body
from .fake_upstream import FakeUpstream, Hang, Json, Reset, Sse, chunk, text_chunks

CHAT = "/v1/chat/completions"
GOOD = text_chunks("Hello", " world")
BROKEN_MIDDLEWARE = "googleAIBlockingResponseHandler: Cannot read properties of undefined"
FIX_MESSAGE = "Please rephrase your message."


def wire(events: list[dict[str, Any]]) -> bytes:
    """What the fake upstream sends for ``Sse(events)``."""
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def data_events(text: str) -> list[str]:
    """The data payloads of a stream body, in order (comments skipped)."""
    out = []
    for event in text.split("\n\n"):
        data = [line[6:] for line in event.split("\n") if line.startswith("data: ")]
        if data:
            out.append("\n".join(data))
    return out


def content_of(text: str) -> str:
    out = ""
    for data in data_events(text):
        if data == "[DONE]":
            continue
        payload = orjson.loads(data)
        if "choices" in payload:
            out += payload["choices"][0]["delta"].get("content") or ""
    return out


def comments_of(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.startswith(":")]


async def stream(client: aiohttp.ClientSession, proxy: RunningServer) -> tuple[int, str, str]:
    """(status, content type, body) of a streaming request."""
    async with client.post(proxy.url + CHAT, json=chat_body(stream=True)) as resp:
        return resp.status, resp.content_type, (await resp.read()).decode()


async def timed_reads(
    client: aiohttp.ClientSession, proxy: RunningServer
) -> tuple[int, list[tuple[float, bytes]]]:
    reads: list[tuple[float, bytes]] = []
    began = time.monotonic()
    async with client.post(proxy.url + CHAT, json=chat_body(stream=True)) as resp:
        status = resp.status
        while data := await resp.content.readany():
            reads.append((time.monotonic() - began, data))
    return status, reads


# -- failures before the first token are retried unseen ---------------------------


async def test_stream_failing_twice_before_first_token_is_delivered_whole(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    error_event = {"error": {"message": "upstream overloaded", "code": 503}}
    upstream.queue(
        Json(503, {"error": {"message": "Service Unavailable"}}),
        Sse([chunk(role=True, text=""), error_event]),
        Sse(GOOD),
    )
    status, content_type, body = await stream(client, proxy)
    assert upstream.calls == 3
    assert status == 200
    assert content_type == "text/event-stream"
    assert body.encode() == wire(GOOD)
    assert content_of(body) == "Hello world"
    assert "error" not in body and "overloaded" not in body and "retrying" not in body


async def test_stream_error_event_first_is_retried(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Sse([{"error": {"message": "quota", "code": 429}}]), Sse(GOOD))
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 2
    assert status == 200
    assert body.encode() == wire(GOOD)


async def test_stream_ending_without_content_is_retried_as_empty(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    empty = [chunk(role=True, text=""), chunk(finish="stop")]
    upstream.queue(Sse(empty), Sse(empty, end="close"), Sse(GOOD))
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 3
    assert status == 200
    assert body.encode() == wire(GOOD)


async def test_stream_always_empty_gets_empty_response_error(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"empty_response": {"max_retries": 2}}})
    upstream.default = Sse([chunk(role=True, text=""), chunk(finish="SAFETY")])
    status, content_type, body = await stream(client, proxy)
    assert upstream.calls == 3
    assert status == 502
    assert content_type == "application/json"
    error = orjson.loads(body)["error"]
    assert error["type"] == "empty_response"
    assert error["code"] == "empty_response"
    assert error["attempts"] == 3
    assert "3 times" in error["message"] and "SAFETY" in error["message"]


async def test_stream_always_empty_deliver_last(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"error_handling": {"empty_response": {"max_retries": 1, "deliver_last": True}}}
    )
    empty = [chunk(role=True, text=""), chunk(finish="SAFETY")]
    upstream.default = Sse(empty)
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 2
    assert status == 200
    assert body.encode() == wire(empty)


async def test_stream_reset_before_content_is_retried(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Sse([chunk(role=True, text="")], end="reset"), Reset(), Sse(GOOD))
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 3
    assert status == 200
    assert body.encode() == wire(GOOD)


async def test_stream_idle_before_content_is_retried(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"target_proxy": {"timeout": 0.2}})
    upstream.queue(Sse([chunk(role=True, text="")], end="hang"), Hang(), Sse(GOOD))
    began = time.monotonic()
    status, _, body = await stream(client, proxy)
    assert time.monotonic() - began < 2
    assert upstream.calls == 3
    assert status == 200
    assert body.encode() == wire(GOOD)


async def test_stream_invalid_json_before_content_is_not_content(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """A stream whose only events are not JSON has no content: retried as empty."""
    upstream.queue(Sse(["not json at all"]), Sse(GOOD))
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 2
    assert status == 200
    assert body.encode() == wire(GOOD)


# -- a stream that ends badly before any commit: the JSON error --------------------


async def test_stream_exhausted_before_commit_gets_json_error_like_non_streaming(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"error_handling": {"max_retries": 2}, "circuit_breaker": {"enabled": False}}
    )
    upstream.default = Json(502, {"error": {"message": "bad gateway upstream"}})
    status, content_type, body = await stream(client, proxy)
    assert upstream.calls == 3
    async with client.post(proxy.url + CHAT, json=chat_body()) as resp:
        plain_status, plain = resp.status, await resp.json()
    assert upstream.calls == 6
    assert status == plain_status == 502
    assert content_type == "application/json"
    error = orjson.loads(body)["error"]
    for key in ("type", "code", "attempts"):
        assert error[key] == plain["error"][key]
    assert error["code"] == "retries_exhausted"
    assert "bad gateway upstream" in error["message"]


async def test_stream_exhausted_429_before_commit_is_503(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 1}})
    upstream.default = Sse([{"error": {"message": "Rate limited", "code": 429}}])
    status, content_type, body = await stream(client, proxy)
    assert upstream.calls == 2
    assert status == 503
    assert content_type == "application/json"
    error = orjson.loads(body)["error"]
    assert error["type"] == "rate_limited"
    assert "Rate limited" in error["message"]


@pytest.mark.parametrize("where", ["status", "event"])
async def test_stream_hard_stop_before_commit(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, where: str
) -> None:
    rule = {"pattern": "Cannot read properties of undefined", "user_message": FIX_MESSAGE}
    proxy = await start_proxy({"error_handling": {"hard_stop_conditions": {"rules": [rule]}}})
    error_body = {"error": {"message": BROKEN_MIDDLEWARE}}
    if where == "status":
        upstream.default = Json(500, error_body)
    else:
        upstream.default = Sse([chunk(role=True, text=""), error_body])
    status, content_type, body = await stream(client, proxy)
    assert upstream.calls == 1
    assert status == (500 if where == "status" else 502)
    assert content_type == "application/json"
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "code", "original_response"}
    assert error["message"] == FIX_MESSAGE
    assert error["type"] == "hard_stop_error"
    assert error["code"] == "hard_stop_condition_met"
    assert error["original_response"] == orjson.dumps(error_body).decode()


async def test_stream_recategorized_event_is_retried(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    rule = {"pattern": "model is overloaded", "new_status": 429}
    proxy = await start_proxy({"response_parsing": {"status_recategorization": {"rules": [rule]}}})
    upstream.queue(Sse([{"error": {"message": "The model is overloaded", "code": 400}}]), Sse(GOOD))
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 2
    assert status == 200
    assert body.encode() == wire(GOOD)


async def test_patterns_in_content_already_read_do_not_count(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """Events read together with the first content are the reply, not an error to judge."""
    rule = {"pattern": "model.*capacity", "original_status": 200, "new_status": 429}
    stop = {"pattern": "Cannot read properties", "user_message": FIX_MESSAGE}
    proxy = await start_proxy(
        {
            "response_parsing": {"status_recategorization": {"rules": [rule]}},
            "error_handling": {"hard_stop_conditions": {"rules": [stop]}},
        }
    )
    story = text_chunks("Hello", " the model ran at full capacity.", " Cannot read properties.")
    upstream.queue(Sse(story))
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 1
    assert status == 200
    assert body.encode() == wire(story)


# -- keep-alive comments -------------------------------------------------------


async def test_keepalive_comments_on_schedule_then_content(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"stream_keepalive_seconds": 0.2}})
    slow_503 = Json(503, {"error": {"message": "busy"}}, delay=0.2)
    upstream.queue(slow_503, slow_503, slow_503, Sse(GOOD))
    status, reads = await timed_reads(client, proxy)
    assert status == 200
    assert upstream.calls == 4
    body = b"".join(data for _, data in reads).decode()
    comments = comments_of(body)
    assert 2 <= len(comments) <= 4, body
    for line in comments[1:]:
        assert line.startswith(": retrying, attempt ") and " of at most 11" in line, line
    assert comments[0] == ": waiting for the first token, attempt 1 of at most 11"
    assert comments[1] == ": retrying, attempt 2 of at most 11, last error 503 (busy)"
    # Every comment about 0.2 s after the last, the content after them.
    times = [t for t, data in reads if data.startswith(b":")]
    assert 0.17 <= times[0] <= 0.35, times
    for a, b in itertools.pairwise(times):
        assert 0.15 <= b - a <= 0.3, times
    text = body.split("\n\n", len(comments))[-1]
    assert text.encode() == wire(GOOD)
    assert content_of(body) == "Hello world"


async def test_keepalive_count_never_exceeds_its_total(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """Empty replies have their own budget: more attempts than max_retries + 1."""
    proxy = await start_proxy(
        {
            "error_handling": {
                "stream_keepalive_seconds": 0.05,
                "max_retries": 1,
                "empty_response": {"max_retries": 3},
            }
        }
    )
    upstream.default = Sse([chunk(role=True, text=""), chunk(finish="stop")], gap=0.06)
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 4
    assert status == 200
    numbers = []
    for line in comments_of(body):
        n, total = line.split("attempt ")[1].split(",")[0].split(" of at most ")
        assert int(n) <= int(total), line
        numbers.append(int(n))
    assert numbers[-1] == 4
    events = data_events(body)
    assert events[-1] == "[DONE]"
    assert orjson.loads(events[0])["error"]["type"] == "empty_response"


async def test_plain_json_reply_after_keepalive_commit_is_one_event(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """An upstream that ignores "stream" answers JSON; after a commit it goes out as one
    event, even when the upstream pretty-printed it over many lines."""
    import json

    proxy = await start_proxy({"error_handling": {"stream_keepalive_seconds": 0.1}})
    reply = {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
    }
    pretty = json.dumps(reply, indent=2)
    upstream.queue(Json(503, delay=0.15), Json(200, pretty))
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 2
    assert status == 200
    events = data_events(body)
    assert events[-1] == "[DONE]"
    assert len(events) == 2
    assert orjson.loads(events[0]) == reply
    for line in body.split("\n"):
        assert line == "" or line.startswith((":", "data: ")), line


async def test_no_keepalive_when_content_comes_in_time(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"stream_keepalive_seconds": 0.3}})
    upstream.queue(Json(503, delay=0.1), Sse(GOOD))
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 2
    assert status == 200
    assert body.encode() == wire(GOOD)


async def test_failure_after_keepalive_commit_is_an_error_event(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"error_handling": {"stream_keepalive_seconds": 0.1, "max_retries": 2}}
    )
    upstream.default = Json(503, {"error": {"message": "still down"}}, delay=0.1)
    status, content_type, body = await stream(client, proxy)
    assert upstream.calls == 3
    assert status == 200
    assert content_type == "text/event-stream"
    assert comments_of(body)
    events = data_events(body)
    assert events[-1] == "[DONE]"
    assert len(events) == 2
    error = orjson.loads(events[0])["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "retries_exhausted"
    assert error["attempts"] == 3
    assert "still down" in error["message"]
    assert body.endswith("data: [DONE]\n\n")


async def test_hard_stop_after_keepalive_commit_is_an_error_event(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    rule = {"pattern": "Cannot read properties of undefined", "user_message": FIX_MESSAGE}
    proxy = await start_proxy(
        {
            "error_handling": {
                "stream_keepalive_seconds": 0.1,
                "hard_stop_conditions": {"rules": [rule]},
            }
        }
    )
    upstream.queue(Json(503, delay=0.15), Json(500, {"error": {"message": BROKEN_MIDDLEWARE}}))
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 2
    assert status == 200
    events = data_events(body)
    assert events[-1] == "[DONE]" and len(events) == 2
    error = orjson.loads(events[0])["error"]
    assert error["type"] == "hard_stop_error"
    assert error["message"] == FIX_MESSAGE


# -- failures after content: an error event, no retry --------------------------------


async def test_reset_after_content_ends_with_error_event(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Sse([chunk("Hel", role=True), chunk("lo")], end="reset"))
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 1
    assert status == 200
    assert content_of(body) == "Hello"
    events = data_events(body)
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == "stream_interrupted"
    assert error["type"] == "connection_error"
    assert "incomplete" in error["message"]
    await asyncio.sleep(0.1)
    assert upstream.calls == 1


async def test_idle_after_content_ends_with_error_event(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"target_proxy": {"timeout": 0.2}})
    upstream.queue(Sse([chunk("Hel", role=True), chunk("lo")], end="hang"))
    began = time.monotonic()
    status, _, body = await stream(client, proxy)
    assert time.monotonic() - began < 2
    assert upstream.calls == 1
    assert status == 200
    assert content_of(body) == "Hello"
    events = data_events(body)
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["type"] == "timeout"
    assert "0.2 s" in error["message"]


@pytest.mark.parametrize("logging", [True, False])
async def test_error_event_after_content_is_passed_on_and_done(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, logging: bool
) -> None:
    """With the request log on, events are parsed; off, they are relayed unparsed."""
    proxy = await start_proxy({"logging": {"enabled": logging}})
    mid = {"error": {"message": "provider dropped the stream", "code": 502}}
    upstream.queue(Sse([chunk("Part", role=True), mid, chunk(" never")], end="close"))
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 1
    assert status == 200
    assert content_of(body) == "Part"
    events = data_events(body)
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "stream_interrupted"
    assert "provider dropped the stream" in error["message"]
    assert "incomplete" in error["message"]
    assert "never" not in body


async def test_hard_stop_event_after_content_gets_hard_stop_body(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    rule = {"pattern": "Cannot read properties of undefined", "user_message": FIX_MESSAGE}
    proxy = await start_proxy({"error_handling": {"hard_stop_conditions": {"rules": [rule]}}})
    mid = {"error": {"message": BROKEN_MIDDLEWARE}}
    upstream.queue(Sse([chunk("Part", role=True), mid]))
    status, _, body = await stream(client, proxy)
    assert upstream.calls == 1
    assert status == 200
    assert content_of(body) == "Part"
    events = data_events(body)
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["type"] == "hard_stop_error"
    assert error["code"] == "hard_stop_condition_met"
    assert error["message"] == FIX_MESSAGE
    assert BROKEN_MIDDLEWARE in error["original_response"]


# -- the client leaving ------------------------------------------------------------


async def test_no_attempts_after_stream_client_leaves(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy({"error_handling": {"base_delay": 0.1, "max_delay": 0.1}})
    upstream.default = Json(503)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.25)) as short:
        with pytest.raises(asyncio.TimeoutError):
            async with short.post(proxy.url + CHAT, json=chat_body(stream=True)) as resp:
                await resp.read()
    seen = upstream.calls
    assert 1 <= seen <= 4
    await asyncio.sleep(0.4)
    assert upstream.calls == seen


async def test_no_attempts_after_client_leaves_during_keepalive(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(
        {"error_handling": {"base_delay": 0.1, "max_delay": 0.1, "stream_keepalive_seconds": 0.05}}
    )
    upstream.default = Json(503)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.url + CHAT, json=chat_body(stream=True))
        assert resp.status == 200
        line = b""
        while not line.startswith(b": retrying"):  # after the first failed attempt
            line = await asyncio.wait_for(resp.content.readline(), 2)
            assert line.startswith((b":", b"\n")), line
        resp.close()
    await asyncio.sleep(0.15)
    seen = upstream.calls
    await asyncio.sleep(0.4)
    assert upstream.calls == seen
