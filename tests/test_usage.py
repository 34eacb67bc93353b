"""Usage totals (``usage``): counted per day, upstream, key and model, kept in SQLite.

Real sockets throughout: the proxy, the fake upstream, a database file on disk.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Mapping
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy import usage as usage_module
from first_hop_proxy.config import Config, ConfigError, Usage, parse_config
from first_hop_proxy.decisions import Action, History, Outcome, Policy, decide
from first_hop_proxy.exchange import ChatRequest
from first_hop_proxy.server import RunningServer, start
from first_hop_proxy.usage import (
    MAX_ROWS,
    NULL_USAGE,
    OTHER,
    SCHEMA,
    UsageTotals,
    ask_for_usage,
    tokens,
)

from .conftest import StartProxy, chat_body, merge, raw_request, wait_until
from .fake_upstream import (
    Choose,
    FakeUpstream,
    Hang,
    Json,
    Prose,
    Sse,
    chunk,
    completion,
    text_chunks,
    words,
)
from .log_helpers import error_logs, settle, state_of

CHAT = "/v1/chat/completions"
TODAY = date.today().isoformat()
STREAM_USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def openai_stream(body: dict[str, Any], headers: Mapping[str, str]) -> Sse:
    """A stream as OpenAI sends it: with ``include_usage``, every chunk carries
    ``"usage": null`` and a last chunk with no choices carries the usage."""
    asked = (body.get("stream_options") or {}).get("include_usage") is True
    events: list[Any] = [
        {**c, "usage": None} if asked else c for c in text_chunks("Hello", " there!")
    ]
    if asked:
        events.append({**chunk(), "choices": [], "usage": STREAM_USAGE})
    return Sse(events)


async def get_usage(proxy: RunningServer, query: str = "") -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.url + "/usage" + query) as resp,
    ):
        body = await resp.json()
        assert resp.status == 200, body
        assert "warning" not in body, body
        rows: list[dict[str, Any]] = body["totals"]
        return rows


async def post(proxy: RunningServer, body: Any) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url + CHAT, data=data, headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        return resp.status, await resp.read()


def row(**counts: Any) -> dict[str, Any]:
    """A /usage row for today, the default upstream, no key pool, the fake model."""
    base = {"day": TODAY, "upstream": "default", "key": "", "model": "fake-model"}
    base.update(requests=1, failed=0, prompt_tokens=0, completion_tokens=0, total_tokens=0)
    base.update(counts)
    return base


def db_rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT * FROM usage_totals ORDER BY day, model").fetchall()


@pytest.fixture
def quick_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """Write every 50 ms and wait briefly for locks, so the tests see writes happen."""
    monkeypatch.setattr(usage_module, "FLUSH_SECONDS", 0.05)
    monkeypatch.setattr(usage_module, "BUSY_SECONDS", 0.1)


# -- JSON and stream replies ------------------------------------------------------------


async def test_json_reply_usage_is_counted(start_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = await start_proxy()
    for _ in range(2):
        status, _ = await post(proxy, chat_body())
        assert status == 200
    # Shown at once, though still in memory: nothing reached the database yet.
    assert await get_usage(proxy) == [
        row(requests=2, prompt_tokens=6, completion_tokens=6, total_tokens=12)
    ]
    state = state_of(proxy)
    assert state.usage.status()["unsaved_requests"] == 2


async def test_stream_usage_chunk_is_counted_and_relayed(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = Choose(openai_stream)
    proxy = await start_proxy()
    sent = orjson.dumps(chat_body(stream=True, stream_options={"include_usage": True}))
    status, body = await post(proxy, sent)
    assert status == 200
    # The client asked for usage: nothing changes, upstream or back.
    assert upstream.received[-1].body == sent
    assert b'"choices":[],"usage":{"prompt_tokens":5' in body
    assert body.count(b'"usage":null') == 4
    assert await get_usage(proxy) == [row(prompt_tokens=5, completion_tokens=2, total_tokens=7)]


async def test_stream_without_usage_is_counted_as_a_request(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = Choose(openai_stream)
    proxy = await start_proxy()
    status, body = await post(proxy, chat_body(stream=True))
    assert status == 200 and b"usage" not in body
    assert "stream_options" not in upstream.received[-1].json  # track_streams is off
    assert await get_usage(proxy) == [row()]


async def test_usage_in_a_content_chunk_is_counted(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """Some upstreams put usage in the finish chunk, unasked."""
    last = {**chunk(finish="stop"), "usage": {"input_tokens": 9, "output_tokens": 4}}
    upstream.default = Sse([chunk(role=True, text="Hi"), last])
    proxy = await start_proxy({"usage": {"track_streams": True}})
    status, body = await post(proxy, chat_body(stream=True))
    assert status == 200 and b'"input_tokens":9' in body  # it holds content: relayed
    assert await get_usage(proxy) == [row(prompt_tokens=9, completion_tokens=4, total_tokens=13)]


async def test_a_resumed_stream_counts_what_each_upstream_stream_reported(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """stream_resume: the first stream broke after reporting 5 tokens; the
    continuation (with its own prompt) reported the rest."""
    proxy = await start_proxy({"error_handling": {"stream_resume": {"enabled": True}}})
    text = "Once upon a time, there was a dragon who lived in the castle on the hill."
    upstream.queue(Prose(text, cut_after=5, usage="each"), Prose(text, usage="final"))
    status, body = await post(proxy, chat_body(stream=True))
    assert status == 200 and b"stream_interrupted" not in body
    rest = len(words(text)) - 5
    assert await get_usage(proxy) == [
        row(prompt_tokens=20, completion_tokens=5 + rest, total_tokens=20 + 5 + rest)
    ]


# -- track_streams ------------------------------------------------------------------------


async def test_track_streams_asks_upstream_and_keeps_the_client_stream_unchanged(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = Choose(openai_stream)
    plain = await start_proxy()
    tracking = await start_proxy({"usage": {"track_streams": True}})
    client_body = chat_body(stream=True, temperature=0.7)

    status, expected = await post(plain, client_body)
    assert status == 200
    assert upstream.received[-1].json == client_body
    status, got = await post(tracking, client_body)
    assert status == 200
    assert upstream.received[-1].json == {
        **client_body,
        "stream_options": {"include_usage": True},
    }
    assert got == expected  # byte for byte: no usage chunk, no "usage": null
    assert b"usage" not in got
    assert await get_usage(tracking) == [row(prompt_tokens=5, completion_tokens=2, total_tokens=7)]


async def test_track_streams_with_reply_rules_drops_the_usage_chunk(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """Reply rewrite rules parse every event: the usage chunk is gone before they do."""
    upstream.default = Choose(openai_stream)
    rules = {"rules": [{"pattern": "there", "replacement": "here"}]}
    proxy = await start_proxy({"usage": {"track_streams": True}, "response_processing": rules})
    status, body = await post(proxy, chat_body(stream=True))
    assert status == 200
    assert b"here!" in body and b"usage" not in body
    assert (await get_usage(proxy))[0]["total_tokens"] == 7


async def test_track_streams_merges_the_clients_own_stream_options(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = Choose(openai_stream)
    proxy = await start_proxy({"usage": {"track_streams": True}})
    client_body = chat_body(stream=True, stream_options={"include_obfuscation": False})
    status, body = await post(proxy, client_body)
    assert status == 200 and b"usage" not in body
    assert upstream.received[-1].json["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }


async def test_track_streams_leaves_json_requests_alone(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy({"usage": {"track_streams": True}})
    sent = orjson.dumps(chat_body())
    status, _ = await post(proxy, sent)
    assert status == 200
    assert upstream.received[-1].body == sent


# -- failed requests ----------------------------------------------------------------------


async def test_failed_requests_are_counted(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    proxy = await start_proxy()
    upstream.queue(Json(400, {"error": {"message": "bad request", "type": "invalid"}}))
    status, _ = await post(proxy, chat_body())
    assert status == 400
    upstream.queue(Json(503, {"error": {"message": "busy"}}))  # retried, then a reply
    status, _ = await post(proxy, chat_body())
    assert status == 200
    upstream.queue(Sse([chunk(role=True, text="Hel")], end="reset"))  # cut after content
    status, _ = await post(proxy, chat_body(stream=True))
    assert status == 200  # committed before it broke; it ended in an error all the same
    assert await get_usage(proxy) == [
        row(requests=3, failed=2, prompt_tokens=3, completion_tokens=3, total_tokens=6)
    ]


async def test_a_client_that_leaves_counts_as_failed(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy()
    upstream.queue(Hang(5))
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(proxy.url + CHAT, json=chat_body())
    await wait_until(lambda: state_of(proxy).usage.status()["unsaved_requests"], 5)
    assert await get_usage(proxy) == [row(failed=1)]


async def test_requests_that_reach_no_upstream_are_not_counted(
    start_proxy: StartProxy,
) -> None:
    proxy = await start_proxy()
    status, _ = await post(proxy, b"{not json")
    assert status == 400
    assert await get_usage(proxy) == []


async def test_totals_per_upstream_and_model(upstream: FakeUpstream, tmp_path: Path) -> None:
    other = await FakeUpstream().start()
    other.default = Json(body=completion(usage={"prompt_tokens": 10, "completion_tokens": 1}))
    upstreams = [
        {"name": "main", "url": upstream.chat_url, "models": ["fake-model"]},
        {"name": "spare", "url": other.chat_url, "models": ["other-*"]},
    ]
    proxy = await start(parse_config(config(tmp_path, upstreams=upstreams), base_dir=tmp_path))
    try:
        await post(proxy, chat_body())
        await post(proxy, {**chat_body(), "model": "other-1"})
        assert await get_usage(proxy) == [
            row(upstream="main", prompt_tokens=3, completion_tokens=3, total_tokens=6),
            row(
                upstream="spare",
                model="other-1",
                prompt_tokens=10,
                completion_tokens=1,
                total_tokens=11,
            ),
        ]
    finally:
        await proxy.close()
        await other.close()


async def test_totals_per_pool_key_by_its_last_four_characters(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    keys = [f"AIzaSyFAKE{'x' * 24}k{n:03d}" for n in (1, 2)]
    proxy = await start_proxy({"target_proxy": {"keys": keys}})
    for _ in range(3):
        await post(proxy, chat_body())
    rows = await get_usage(proxy)
    assert [(r["key"], r["requests"]) for r in rows] == [("...k001", 2), ("...k002", 1)]
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.url + "/usage") as resp,
    ):
        text = await resp.text()
    assert all(key not in text and key[:-4] not in text for key in keys)


# -- the database -------------------------------------------------------------------------


def config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "error_handling": {"base_delay": 0.01, "max_delay": 0.05},
        "logging": {"folder": str(tmp_path / "logs")},
        "error_logging": {"folder": str(tmp_path / "logs" / "errors")},
    }
    return merge(base, extra)


async def test_totals_survive_a_restart(upstream: FakeUpstream, tmp_path: Path) -> None:
    settings = config(tmp_path, target_proxy={"url": upstream.chat_url})
    first = await start(parse_config(settings, base_dir=tmp_path))
    await post(first, chat_body())
    await first.close()  # the last batch is written on the way out
    db = tmp_path / "usage.sqlite3"  # the default, next to the config
    assert db_rows(db) == [(TODAY, "default", "", "fake-model", 1, 0, 3, 3, 6)]

    second = await start(parse_config(settings, base_dir=tmp_path))
    try:
        await post(second, chat_body())
        assert await get_usage(second) == [
            row(requests=2, prompt_tokens=6, completion_tokens=6, total_tokens=12)
        ]
    finally:
        await second.close()
    assert db_rows(db) == [(TODAY, "default", "", "fake-model", 2, 0, 6, 6, 12)]


async def test_totals_are_written_every_few_seconds(
    start_proxy: StartProxy, tmp_path: Path, quick_flush: None
) -> None:
    db = tmp_path / "data" / "totals.db"  # its folder is made on first need
    proxy = await start_proxy({"usage": {"database": "data/totals.db"}})
    await post(proxy, chat_body())
    state = state_of(proxy)
    await wait_until(lambda: state.usage.status()["unsaved_requests"] == 0, 5)
    assert db_rows(db) == [(TODAY, "default", "", "fake-model", 1, 0, 3, 3, 6)]
    assert state.usage.status()["writes"] >= 1
    assert await get_usage(proxy) == [  # the database's rows, not counted twice
        row(prompt_tokens=3, completion_tokens=3, total_tokens=6)
    ]


async def detailed_usage(proxy: RunningServer) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.url + "/health/detailed") as resp,
    ):
        body: dict[str, Any] = (await resp.json())["usage"]
        return body


@pytest.mark.parametrize("broken", ["directory", "not sqlite"])
async def test_a_broken_database_never_stops_the_proxy(
    start_proxy: StartProxy,
    tmp_path: Path,
    quick_flush: None,
    caplog: pytest.LogCaptureFixture,
    broken: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="first_hop_proxy")
    db = tmp_path / "usage.sqlite3"
    if broken == "directory":
        db.mkdir()
    else:
        db.write_bytes(b"these are my notes, not a database\n" * 200)
    before = db.read_bytes() if db.is_file() else None
    proxy = await start_proxy()
    for _ in range(3):
        status, _ = await post(proxy, chat_body())
        assert status == 200
        await asyncio.sleep(0.1)  # a failed write between requests
    usage = await detailed_usage(proxy)
    assert usage["failures"] >= 2
    assert "database" in usage["last_error"] and usage["unsaved_requests"] == 3

    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.url + "/usage") as resp,
    ):
        assert resp.status == 200
        body = await resp.json()
    assert body["totals"] == [
        row(requests=3, prompt_tokens=9, completion_tokens=9, total_tokens=18)
    ]
    assert "only the totals the proxy holds in memory" in body["warning"]
    warnings = [r for r in caplog.records if "usage totals: cannot use" in r.getMessage()]
    assert len(warnings) == 1  # at most one a minute
    await settle(proxy)
    assert len(error_logs(tmp_path / "logs" / "errors", "usage_db_error")) == 1
    if before is not None:
        assert db.read_bytes() == before  # someone's file is never overwritten

    # Once the database works again, nothing is lost.
    if db.is_dir():
        db.rmdir()
    else:
        db.unlink()
    await wait_until(lambda: db.is_file() and db_rows(db), 5)
    assert db_rows(db) == [(TODAY, "default", "", "fake-model", 3, 0, 9, 9, 18)]
    await wait_until(lambda: "written to" in caplog.text, 5)
    assert "usage totals: written to" in caplog.text and "nothing was lost" in caplog.text


async def test_a_locked_database_waits_in_memory(
    start_proxy: StartProxy, tmp_path: Path, quick_flush: None
) -> None:
    db = tmp_path / "usage.sqlite3"
    with sqlite3.connect(db) as setup:
        setup.execute(SCHEMA)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another program holds it
    try:
        proxy = await start_proxy()
        status, _ = await post(proxy, chat_body())
        assert status == 200
        await wait_until(lambda: state_of(proxy).usage.failures, 5)
        assert "locked" in (state_of(proxy).usage.last_error or "")
        assert state_of(proxy).usage.status()["unsaved_requests"] == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    await wait_until(lambda: db_rows(db), 5)
    assert db_rows(db) == [(TODAY, "default", "", "fake-model", 1, 0, 3, 3, 6)]


async def test_usage_disabled(start_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = await start_proxy({"usage": {"enabled": False, "track_streams": True}})
    status, _ = await post(proxy, chat_body())
    assert status == 200
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.url + "/usage") as resp,
    ):
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "usage_disabled"
    assert (await detailed_usage(proxy))["enabled"] is False
    await proxy.close()
    assert not (tmp_path / "usage.sqlite3").exists()


# -- GET /usage ---------------------------------------------------------------------------


def seed(db: Path, *days_ago: int) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(SCHEMA)
        for n in days_ago:
            day = (date.today() - timedelta(days=n)).isoformat()
            conn.execute(
                "INSERT INTO usage_totals VALUES (?, 'default', '...x7Qa', 'm', 1, 0, 1, 1, 2)",
                (day,),
            )


async def test_usage_days(start_proxy: StartProxy, tmp_path: Path) -> None:
    seed(tmp_path / "usage.sqlite3", 3, 40)
    proxy = await start_proxy()
    await post(proxy, chat_body())

    def days(rows: list[dict[str, Any]]) -> list[str]:
        return [r["day"] for r in rows]

    three, forty = (date.today() - timedelta(days=n) for n in (3, 40))
    assert days(await get_usage(proxy)) == [TODAY, three.isoformat(), forty.isoformat()]
    assert days(await get_usage(proxy, "?days=1")) == [TODAY]
    assert days(await get_usage(proxy, "?days=4")) == [TODAY, three.isoformat()]
    assert days(await get_usage(proxy, "?days=41")) == days(await get_usage(proxy))
    old = (await get_usage(proxy, "?days=4"))[1]
    assert old == {
        "day": three.isoformat(),
        "upstream": "default",
        "key": "...x7Qa",
        "model": "m",
        "requests": 1,
        "failed": 0,
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "total_tokens": 2,
    }


@pytest.mark.parametrize("days", ["0", "-1", "abc", "1.5", "", "99999999", "\u0663"])
async def test_usage_days_must_be_a_whole_number(
    start_proxy: StartProxy, days: str, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    async with client.get(proxy.url + "/usage", params={"days": days}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "invalid_days"
    assert "days must be a whole number from 1 to" in error["message"]


async def test_usage_is_an_admin_page(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"server": {"cors_origins": ["http://localhost:8000"]}})
    foreign = await raw_request(
        proxy.port, "GET", "/usage", headers={"Origin": "https://evil.example"}
    )
    assert foreign.status == 403 and foreign.json["error"]["code"] == "origin_not_allowed"
    cross = await raw_request(proxy.port, "GET", "/usage", headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status == 403
    rebound = await raw_request(proxy.port, "GET", "/usage", headers={"Host": "evil.example"})
    assert rebound.status == 421
    listed = await raw_request(
        proxy.port, "GET", "/usage", headers={"Origin": "http://localhost:8000"}
    )
    assert listed.status == 200 and listed.json == {"totals": []}
    assert "access-control-allow-origin" not in listed.headers  # never on admin pages
    # A chat path with the same listed origin does get CORS: the difference is the page.
    models = await raw_request(
        proxy.port, "GET", "/v1/models", headers={"Origin": "http://localhost:8000"}
    )
    assert models.headers.get("access-control-allow-origin") == "http://localhost:8000"


# -- the parts ----------------------------------------------------------------------------


def test_config_database_is_relative_to_the_config_folder(tmp_path: Path) -> None:
    loaded = parse_config({"usage": {"database": "data/totals.db"}}, base_dir=tmp_path)
    assert loaded.config.usage.database == str(tmp_path / "data" / "totals.db")
    absolute = tmp_path / "elsewhere.db"
    loaded = parse_config({"usage": {"database": str(absolute)}}, base_dir=tmp_path)
    assert loaded.config.usage.database == str(absolute)
    assert Config().usage == Usage(enabled=True, database="usage.sqlite3", track_streams=False)
    with pytest.raises(ConfigError) as caught:
        parse_config({"usage": {"track_streams": "sometimes", "database": ""}}, base_dir=tmp_path)
    assert any(p.startswith("usage.track_streams:") for p in caught.value.problems)
    assert any(p.startswith("usage.database:") for p in caught.value.problems)


def test_tokens_accept_only_sane_numbers() -> None:
    assert tokens({"prompt_tokens": 3, "completion_tokens": 4}) == (3, 4, 7)
    assert tokens({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 9}) == (3, 4, 9)
    assert tokens({"input_tokens": 2.0, "output_tokens": 1}) == (2, 1, 3)
    odd = {"prompt_tokens": "12", "completion_tokens": -5, "total_tokens": True}
    assert tokens(odd) == (0, 0, 0)
    assert tokens({"prompt_tokens": float("nan"), "completion_tokens": 10**30}) == (
        0,
        10**12,
        10**12,
    )


def chat_request(body: bytes) -> ChatRequest:
    return ChatRequest(body=body, parsed=orjson.loads(body), headers=None, stream=True, model="m")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "messages": [], "stream": true}',
        b'{"model":"m","messages":[],"stream":true}  \n',
        b'{"model": "m", "stream": true, "stream_options": null}',
        b'{"model": "m", "stream": true, "stream_options": {"include_usage": false, "x": 1}}',
    ],
)
def test_ask_for_usage_adds_the_option(body: bytes) -> None:
    chat = chat_request(body)
    on = Usage(track_streams=True)
    assert ask_for_usage(on, chat)
    sent = orjson.loads(chat.body)
    assert sent["stream_options"]["include_usage"] is True
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {
        k: v for k, v in orjson.loads(body).items() if k != "stream_options"
    }
    assert chat.payload == sent


def test_ask_for_usage_changes_nothing_when_asked_or_off() -> None:
    body = b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'
    chat = chat_request(body)
    assert not ask_for_usage(Usage(track_streams=True), chat)
    assert chat.body == body
    chat = chat_request(b'{"model": "m", "stream": true}')
    assert not ask_for_usage(Usage(), chat)
    assert not ask_for_usage(Usage(enabled=False, track_streams=True), chat)
    assert chat.body == b'{"model": "m", "stream": true}'


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (b'data: {"id":"c","choices":[],"usage":null}', b'data: {"id":"c","choices":[]}'),
        (b'data: {"usage":null,"id":"c"}', b'data: {"id":"c"}'),
        (b'data: {"id": "c", "usage": null, "x": 1}', b'data: {"id": "c", "x": 1}'),
        (b'data: {"id": "c" , "usage" : null }', b'data: {"id": "c"  }'),
    ],
)
def test_null_usage_is_removed_with_its_comma(event: bytes, expected: bytes) -> None:
    assert NULL_USAGE.sub(b"", event, count=1) == expected
    assert orjson.loads(expected[6:]) == {
        k: v for k, v in orjson.loads(event[6:]).items() if k != "usage"
    }


def test_text_that_quotes_usage_is_not_touched() -> None:
    event = b'data: {"choices":[{"delta":{"content":"\\"usage\\":null,"}}]}'
    assert NULL_USAGE.search(event) is None


def test_rows_in_memory_are_bounded() -> None:
    totals = UsageTotals(lambda: Usage())
    for i in range(MAX_ROWS + 50):
        totals.add("up", "", f"model-{i}", False, {"total_tokens": 1})
    pending = totals._pending
    assert len(pending) == MAX_ROWS + 1
    assert pending[(TODAY, "up", "", OTHER)] == [50, 0, 0, 0, 50]
    totals.add("up", "", "x" * 1000, True, None)  # long names are cut
    assert (TODAY, "up", "", "x" * 200) not in pending  # past the bound: under OTHER
    assert pending[(TODAY, "up", "", OTHER)] == [51, 1, 0, 0, 50]


def test_the_day_is_asked_again_after_midnight() -> None:
    totals = UsageTotals(lambda: Usage())
    totals.add("up", "", "m", False, None)
    assert totals._day == TODAY and totals._day_ends > time.time()
    totals._day, totals._day_ends = "1999-12-31", time.time() - 1  # midnight has passed
    totals.add("up", "", "m", False, None)
    assert list(totals._pending) == [(TODAY, "up", "", "m")]
    assert totals._pending[(TODAY, "up", "", "m")][0] == 2


def test_a_delivered_reply_carries_its_usage() -> None:
    policy = Policy.from_config(Config())
    good = decide(Outcome(status=200, body=orjson.dumps(completion()).decode()), History(), policy)
    assert good.action is Action.DELIVER
    assert good.usage == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    odd = decide(
        Outcome(status=200, body=orjson.dumps(completion(usage=[1, 2])).decode()),
        History(),
        policy,
    )
    assert odd.action is Action.DELIVER and odd.usage is None
