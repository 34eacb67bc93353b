"""Streams that break half-way, finished (error_handling.stream_resume), over real sockets."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body, merge, wait_until
from .fake_upstream import (
    FakeUpstream,
    Hang,
    Json,
    Prose,
    Reset,
    Sse,
    chunk,
    disguised_chunk,
    words,
)
from .log_helpers import request_logs, section, settle
from .test_stream_resilience import comments_of, data_events

CHAT = "/v1/chat/completions"
TEXT = (
    "Once upon a time, there was a dragon who lived in the castle on the hill. "
    "It guarded a pile of gold and slept all winter."
)
RESUME = {"error_handling": {"stream_resume": {"enabled": True}}}


def resuming(**settings: Any) -> dict[str, Any]:
    """The test config with stream resume on, and ``settings`` merged over it."""
    return merge(RESUME, settings)


def first_words(n: int, text: str = TEXT) -> str:
    return "".join(words(text)[:n])


def chunks_of(body: str) -> list[dict[str, Any]]:
    return [orjson.loads(d) for d in data_events(body) if d != "[DONE]"]


def content_of(body: str) -> str:
    """The reply's text in a stream body."""
    return "".join(
        ch["delta"].get("content") or "" for c in chunks_of(body) for ch in c.get("choices", [])
    )


async def stream(client: aiohttp.ClientSession, proxy: RunningServer, **extra: Any) -> str:
    async with client.post(proxy.url + CHAT, json=chat_body(stream=True, **extra)) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        return (await resp.read()).decode()


def assert_one_stream(body: str) -> list[dict[str, Any]]:
    """One well-formed stream: every chunk the first one's id, model and created, one
    finish_reason at the end, one [DONE] last, no error; returns the chunks."""
    events = data_events(body)
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    chunks = chunks_of(body)
    assert not [c for c in chunks if "error" in c]
    assert len({(c["id"], c["model"], c["created"]) for c in chunks}) == 1
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["stop"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    for c in chunks[1:]:
        assert "role" not in c["choices"][0]["delta"]  # one role, at the start
    return chunks


def stream_error(body: str) -> dict[str, Any]:
    """The error event that ends a stream (just before [DONE])."""
    events = data_events(body)
    assert events[-1] == "[DONE]"
    error: dict[str, Any] = orjson.loads(events[-2])["error"]
    assert sum("error" in c for c in chunks_of(body)) == 1
    return error


# -- a clean join ----------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["reset", "error", "silence", "disguised"])
async def test_stream_broken_after_content_is_finished_as_one_stream(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, cut: str
) -> None:
    proxy = await start_proxy(resuming(target_proxy={"timeout": 0.5}))
    upstream.queue(
        Prose(TEXT, cut_after=6, cut=cut),
        Prose(TEXT, model="fake-model-2024-01-01"),  # a continuation answers as another model
    )
    body = await stream(client, proxy, temperature=0.7)
    assert content_of(body) == TEXT
    chunks = assert_one_stream(body)
    assert chunks[0]["model"] == "fake-model"
    assert upstream.calls == 2
    asked, again = upstream.received[0].json, upstream.received[1].json
    prefill = {"role": "assistant", "content": first_words(6)}
    assert again == {**asked, "messages": [*asked["messages"], prefill]}


async def test_continue_instruction_follows_the_prefill(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    instruction = "Continue exactly where you left off."
    proxy = await start_proxy(
        resuming(error_handling={"stream_resume": {"continue_instruction": instruction}})
    )
    upstream.queue(Prose(TEXT, cut_after=3), Prose(TEXT))
    body = await stream(client, proxy)
    assert content_of(body) == TEXT
    assert upstream.received[1].json["messages"][1:] == [
        {"role": "assistant", "content": first_words(3)},
        {"role": "user", "content": instruction},
    ]


async def test_off_by_default_a_break_ends_with_an_error_event(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Prose(TEXT, cut_after=3), Prose(TEXT))
    body = await stream(client, proxy)
    assert content_of(body) == first_words(3)
    error = stream_error(body)
    assert error["code"] == "stream_interrupted"
    assert "Resuming" not in error["message"]
    await asyncio.sleep(0.1)
    assert upstream.calls == 1


# -- the overlap, a restart --------------------------------------------------------------


@pytest.mark.parametrize("restate", [2, 4])
async def test_restated_words_are_cut(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, restate: int
) -> None:
    proxy = await start_proxy(RESUME)
    upstream.queue(Prose(TEXT, cut_after=9), Prose(TEXT, restate=restate))
    body = await stream(client, proxy)
    assert content_of(body) == TEXT
    assert_one_stream(body)


OTHER = "Once upon a time, there was a dragon who dozed in a cave by the sea."


async def test_a_continuation_that_starts_over_is_refused(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await start_proxy(resuming(error_handling={"stream_resume": {"max_resumes": 1}}))
    upstream.queue(Prose(TEXT, cut_after=12), Prose(OTHER, restart=True), Prose(TEXT))
    async with client.post(proxy.url + CHAT, json=chat_body(stream=True)) as resp:
        request_id = resp.headers["X-Request-ID"]
        body = (await resp.read()).decode()
    assert content_of(body) == first_words(12)
    assert "dozed" not in body  # nothing of the restart reached the client
    error = stream_error(body)
    assert error["code"] == "stream_interrupted"
    assert "Resuming it was tried once; the last try started the reply over." in error["message"]
    assert "incomplete" in error["message"]
    await asyncio.sleep(0.1)
    assert upstream.calls == 2
    await settle(proxy)
    log = request_logs(tmp_path / "logs")[request_id].read_text()
    assert "Decision: dropped (the continuation started the reply over)" in log
    assert "Outcome: started the reply over: dropped unseen" in section(log, "STREAM RESUME #1:")
    # A reset mid-body reads as a cut-short reply or a closed connection.
    assert re.search(r"Outcome: stream failed after content: \w+; resuming tried once", log)


async def test_after_a_refused_restart_the_next_resume_joins(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(RESUME)
    upstream.queue(Prose(TEXT, cut_after=12), Prose(OTHER, restart=True), Prose(TEXT))
    body = await stream(client, proxy)
    assert content_of(body) == TEXT
    assert "dozed" not in body
    assert_one_stream(body)
    assert upstream.calls == 3
    # Both continuations asked for the same thing: the refused one added nothing.
    assert upstream.received[1].json == upstream.received[2].json


# -- limits ------------------------------------------------------------------------------


async def test_max_resumes_exhausted_ends_with_the_error_saying_so(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(RESUME)  # max_resumes: 2
    upstream.queue(
        Prose(TEXT, cut_after=4), Prose(TEXT, cut_after=2), Prose(TEXT, cut_after=3), Prose(TEXT)
    )
    body = await stream(client, proxy)
    assert content_of(body) == first_words(9)  # each continuation's text was kept
    error = stream_error(body)
    assert error["code"] == "stream_interrupted"
    assert error["type"] == "connection_error"
    assert "Resuming it was tried twice; the last try broke too." in error["message"]
    await asyncio.sleep(0.1)
    assert upstream.calls == 3
    prefills = [r.json["messages"][-1]["content"] for r in upstream.received[1:]]
    assert prefills == [first_words(4), first_words(6)]


@pytest.mark.parametrize(
    ("broken", "sent"),
    [
        (Prose(TEXT, cut_after=3, cut="error", status_code=400), first_words(3)),
        # The reply was whole: a continuation could only add to it.
        (Sse([chunk("Hel", role=True), chunk("lo", finish="stop")], end="reset"), "Hello"),
    ],
    ids=["error_no_retry_can_fix", "after_the_finish_reason"],
)
async def test_breaks_a_continuation_cannot_help_are_not_resumed(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    broken: Prose | Sse,
    sent: str,
) -> None:
    proxy = await start_proxy(RESUME)
    upstream.queue(broken, Prose(TEXT))
    body = await stream(client, proxy)
    assert content_of(body) == sent
    assert "Resuming" not in stream_error(body)["message"]
    await asyncio.sleep(0.1)
    assert upstream.calls == 1


async def test_time_spent_streaming_is_not_on_the_time_budget(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """A long reply that broke can be resumed, and its continuation retried: only
    failing time counts."""
    proxy = await start_proxy(resuming(error_handling={"max_total_seconds": 0.3}))
    busy = Json(503, {"error": {"message": "busy"}})
    upstream.queue(Prose(TEXT, cut_after=10, gap=0.05), busy, Prose(TEXT))  # 0.5 s of text
    body = await stream(client, proxy)
    assert content_of(body) == TEXT
    assert upstream.calls == 3


async def test_resuming_stays_within_the_time_budget(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        resuming(
            error_handling={"max_total_seconds": 0.5, "base_delay": 0.2, "max_delay": 0.2},
            circuit_breaker={"enabled": False},
        )
    )
    upstream.queue(Prose(TEXT, cut_after=3))
    upstream.default = Json(503, {"error": {"message": "busy"}})
    began = time.monotonic()
    body = await stream(client, proxy)
    assert time.monotonic() - began < 1.5
    assert content_of(body) == first_words(3)
    message = stream_error(body)["message"]
    assert "Resuming it was tried once; the last try failed: 503 Service Unavailable" in message
    assert 2 <= upstream.calls <= 4


# -- a continuation goes through the same rules as any attempt ----------------------------


async def test_a_resume_meeting_a_429_and_a_disguised_error_is_retried(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(RESUME)
    upstream.queue(
        Prose(TEXT, cut_after=5),
        Json(429, {"error": {"message": "Rate limited"}}),
        Sse([disguised_chunk()]),
        Reset(),
        Prose(TEXT),
    )
    body = await stream(client, proxy)
    assert content_of(body) == TEXT
    assert "Proxy error" not in body and "Rate limited" not in body
    assert_one_stream(body)
    assert upstream.calls == 5
    continuations = [r.json for r in upstream.received[1:]]
    assert all(c == continuations[0] for c in continuations)


async def test_keepalives_while_the_continuation_is_fetched(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(resuming(error_handling={"stream_keepalive_seconds": 0.1}))
    busy = Json(503, {"error": {"message": "busy"}}, delay=0.25)
    upstream.queue(Prose(TEXT, cut_after=4), busy, busy, Prose(TEXT))
    body = await stream(client, proxy)
    assert content_of(body) == TEXT
    comments = comments_of(body)
    assert comments
    assert all(c.startswith(": resuming the reply (1 of at most 2): ") for c in comments)
    assert any("last error 503 (busy)" in c for c in comments)
    # They come between the text so far and the continuation's.
    text_before = content_of(body[: body.index(comments[0])])
    assert text_before == first_words(4)
    assert_one_stream(body)


async def test_a_continuation_whose_start_is_slow_gets_keepalives_while_held(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """A restated start is held until it is known where it joins; the line stays alive."""
    proxy = await start_proxy(resuming(error_handling={"stream_keepalive_seconds": 0.04}))
    short = "The old dragon slept in the castle on the hill."
    # " slept", " in", " the" again, each 0.1 s apart: held until it is clear where they join.
    upstream.queue(Prose(short, cut_after=6), Prose(short, restate=3, gap=0.1))
    body = await stream(client, proxy)
    assert content_of(body) == short
    assert any(c.endswith("joining it to the text") for c in comments_of(body))


# -- the client leaving ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["fetching", "joining"])
async def test_client_leaving_during_a_resume_closes_the_upstream_request(
    start_proxy: StartProxy, upstream: FakeUpstream, where: str
) -> None:
    proxy = await start_proxy(RESUME)
    continuation = (
        Hang() if where == "fetching" else Prose(TEXT, restate=2, cut_after=1, cut="silence")
    )
    upstream.queue(Prose(TEXT, cut_after=4), continuation)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.url + CHAT, json=chat_body(stream=True))
        assert b'"content":"Once"' in await asyncio.wait_for(resp.content.readany(), 2)
        await wait_until(lambda: upstream.calls == 2, 2)
        await asyncio.sleep(0.1)  # the continuation is being fetched, or its start held
        assert upstream.disconnects == []
        resp.close()
        left = time.monotonic()
    await wait_until(lambda: upstream.disconnects, 2)
    assert upstream.disconnects and upstream.disconnects[0] - left < 0.5
    await asyncio.sleep(0.2)
    assert upstream.calls == 2


# -- rewrite rules, usage, JSON --------------------------------------------------------


async def test_reply_rules_see_the_joined_text_as_one_text(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    rules = [
        {"pattern": r"dragon\s+who", "replacement": "wyrm that"},  # a regex
        {"pattern": "the castle", "replacement": "the fortress"},  # a literal
    ]
    proxy = await start_proxy(resuming(response_processing={"rules": rules}))
    # Breaks between "dragon" and " who", then between " the" and " castle"; the second
    # continuation says " in the" again first.
    upstream.queue(Prose(TEXT, cut_after=8), Prose(TEXT, cut_after=4), Prose(TEXT, restate=2))
    body = await stream(client, proxy)
    expected = TEXT.replace("dragon who", "wyrm that").replace("the castle", "the fortress")
    assert content_of(body) == expected
    assert_one_stream(body)
    assert upstream.calls == 3
    # The continuations continue what the upstream wrote, not what the rules made of it.
    assert upstream.received[2].json["messages"][-1]["content"] == first_words(12)


async def test_usage_counts_the_completion_tokens_of_every_attempt(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(RESUME)
    upstream.queue(Prose(TEXT, cut_after=5, usage="each"), Prose(TEXT, usage="final"))
    body = await stream(client, proxy)
    assert content_of(body) == TEXT
    usages = [c["usage"] for c in chunks_of(body) if c.get("usage")]
    assert [u["completion_tokens"] for u in usages[:5]] == [1, 2, 3, 4, 5]  # as sent
    total = len(words(TEXT))
    assert usages[-1] == {
        "prompt_tokens": 10,
        "completion_tokens": total,  # 5 before the break, the rest after it
        "total_tokens": 10 + total,
    }


async def test_json_requests_are_unaffected(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(RESUME)
    upstream.queue(Reset(), Json())
    async with client.post(proxy.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 200
        reply = await resp.json()
    assert reply["choices"][0]["message"]["content"] == "Hello there!"
    assert upstream.calls == 2
    assert upstream.received[0].body == upstream.received[1].body
    assert [m["role"] for m in upstream.received[1].json["messages"]] == ["user"]


# -- the request log -------------------------------------------------------------------


async def test_the_request_log_tells_the_whole_story(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await start_proxy(RESUME)
    upstream.queue(Prose(TEXT, cut_after=6), Prose(TEXT, restate=2))
    async with client.post(proxy.url + CHAT, json=chat_body(stream=True)) as resp:
        request_id = resp.headers["X-Request-ID"]
        assert content_of((await resp.read()).decode()) == TEXT
    await settle(proxy)
    text = request_logs(tmp_path / "logs")[request_id].read_text()
    assert "Final Status: 200  Attempts: 2" in text
    assert re.search(
        r"Outcome: stream resumed once after it broke \((cut_short|connection_error)\)", text
    )
    resume = section(text, "STREAM RESUME #1:")
    delivered = first_words(6)
    assert f"Broke After: {len(delivered)} characters of text, " in resume
    assert re.search("cut its reply short|closed the connection unexpectedly", resume)
    assert "Upstream Attempts: from #2" in resume
    assert orjson.dumps(delivered).decode() in resume  # the prefill
    cut = "".join(words(TEXT)[4:6])  # the two words said again
    assert f"Overlap Cut: {cut!r} ({len(cut)} characters)" in resume
    assert "Outcome: joined" in resume
    response = section(text, "FINAL RESPONSE DATA:")
    assert "Stream Resumes: 1 (see STREAM RESUME)" in response
    assert TEXT in response
    assert "UPSTREAM ATTEMPT #2:" in text
