"""Request and error logs through the real proxy: names, sections, switches, pruning, rotation."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy.logs.error_log import ErrorEvent
from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body, free_port, wait_until
from .fake_upstream import FakeUpstream, Hang, Json, Sse, chunk, completion
from .log_helpers import (
    REQUEST_NAME,
    SPEC_DETAIL_KEYS,
    error_details,
    error_logs,
    request_logs,
    section,
    settle,
    state_of,
)

NO_BREAKER = {"circuit_breaker": {"enabled": False}}
NO_RETRY = {"error_handling": {"max_retries": 0}, **NO_BREAKER}
REWRITE = {
    "regex_replacement": {
        "rules": [{"pattern": "colour", "replacement": "color", "apply_to": "user"}]
    }
}


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path / "logs"


@pytest.fixture
def errors(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "errors"


async def post(
    client: aiohttp.ClientSession, proxy: RunningServer, body: Any = None, **kw: Any
) -> tuple[int, str, bytes]:
    """POST a chat request; (status, X-Request-ID, body)."""
    if body is None:
        body = chat_body()
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    async with client.post(proxy.url + "/v1/chat/completions", data=data, headers=headers) as r:
        return r.status, r.headers["X-Request-ID"], await r.read()


# --- request logs --------------------------------------------------------------------------


async def test_request_log_name_and_every_section(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, logs: Path
) -> None:
    proxy = await start_proxy(REWRITE)
    upstream.queue(Json(503, {"error": {"message": "overloaded"}}), Json(503), Json(200))
    before = time.time()
    status, rid, _ = await post(
        client, proxy, chat_body(text="my favourite colour"), headers={"User-Agent": "ST/1.0"}
    )
    assert status == 200
    await settle(proxy)
    files = request_logs(logs)
    assert list(files) == [rid]
    match = REQUEST_NAME.match(files[rid].name)
    assert match is not None
    stamp = datetime.strptime(f"{match[1]}{match[2]}{match[3]}", "%Y%m%d%H%M%S%f").timestamp()
    assert before - 1 <= stamp <= time.time()
    text = files[rid].read_text()

    assert text.startswith("=" * 80 + "\nUNIFIED REQUEST LOG - ")
    assert f"Request ID: {rid}\n" in text
    assert "Endpoint: /v1/chat/completions\n" in text
    assert "Timestamp: " in text and "Start Time: " in text
    headers = section(text, "REQUEST HEADERS:")
    assert "User-Agent: ST/1.0" in headers and "Content-Type: application/json" in headers
    data = section(text, "REQUEST DATA:")
    assert "my favourite color" in data and "colour" not in data
    original = section(text, "ORIGINAL REQUEST DATA (before rewrite rules):")
    assert "my favourite colour" in original

    first = section(text, "UPSTREAM ATTEMPT #1:")
    assert "Status: 503" in first
    assert "Duration: " in first
    assert "Decision: retry (" in first
    assert "Delay Before Next Attempt: " in first
    assert "Error: " in first and "overloaded" in first
    second = section(text, "UPSTREAM ATTEMPT #2:")
    assert "Status: 503" in second and "Delay Before Next Attempt: " in second
    third = section(text, "UPSTREAM ATTEMPT #3:")
    assert "Status: 200" in third and "Decision: deliver" in third
    assert "Delay Before Next" not in third and "Error:" not in third
    assert "UPSTREAM ATTEMPT #4" not in text

    final = section(text, "FINAL RESPONSE DATA:")
    assert "Hello there!" in final
    timing = section(text, "TIMING INFORMATION:")
    assert "End Time: " in timing and "Total Duration: " in timing
    assert "Final Status: 200  Attempts: 3" in text
    assert text.rstrip().endswith("=" * 80)
    assert "LOG COMPLETE - " in text


async def test_unchanged_request_has_no_original_section(
    start_proxy: StartProxy, client: aiohttp.ClientSession, logs: Path
) -> None:
    proxy = await start_proxy(REWRITE)
    status, rid, _ = await post(client, proxy, chat_body(text="nothing to change"))
    assert status == 200
    await settle(proxy)
    text = request_logs(logs)[rid].read_text()
    assert "REQUEST DATA:" in text and "ORIGINAL REQUEST DATA" not in text


async def test_stream_request_log_assembles_text_per_choice(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, logs: Path
) -> None:
    proxy = await start_proxy()
    events = [
        chunk(role=True, text=""),
        chunk("Hel"),
        chunk("Oth", index=1),
        chunk("lo there"),
        chunk("er one", index=1),
        chunk(finish="stop"),
        chunk(finish="length", index=1),
    ]
    upstream.queue(Sse(events))
    status, rid, body = await post(client, proxy, chat_body(stream=True))
    assert status == 200 and b"[DONE]" in body
    await settle(proxy)
    text = request_logs(logs)[rid].read_text()
    final = section(text, "FINAL RESPONSE DATA:")
    assert "Stream Events: 8" in final  # seven chunks and [DONE]
    assert "Time To First Content: " in final
    assert "Choice 0 (finish reason: stop):\nHello there" in final
    assert "Choice 1 (finish reason: length):\nOther one" in final
    assert "Stream: true" in text
    assert "Time To First Content: " in section(text, "TIMING INFORMATION:")


@pytest.mark.parametrize(
    ("switch", "titles"),
    [
        ("include_headers", ["REQUEST HEADERS:", "RESPONSE HEADERS:"]),
        ("include_request_data", ["REQUEST DATA:", "ORIGINAL REQUEST DATA"]),
        ("include_response_data", ["FINAL RESPONSE DATA:"]),
        ("include_timing", ["TIMING INFORMATION:"]),
    ],
)
async def test_each_include_switch_removes_its_section(
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    logs: Path,
    switch: str,
    titles: list[str],
) -> None:
    proxy = await start_proxy({**REWRITE, "logging": {switch: False}})
    status, rid, _ = await post(client, proxy, chat_body(text="colour"))
    assert status == 200
    await settle(proxy)
    text = request_logs(logs)[rid].read_text()
    everything = {
        "REQUEST HEADERS:",
        "RESPONSE HEADERS:",
        "REQUEST DATA:",
        "ORIGINAL REQUEST DATA",
        "FINAL RESPONSE DATA:",
        "TIMING INFORMATION:",
        "UPSTREAM ATTEMPT #1:",
    }
    for title in everything:
        if title in titles:
            assert f"\n{title}" not in text, title
        else:
            assert f"\n{title}" in text, title


async def test_logging_disabled_writes_no_request_log_but_errors_still(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    logs: Path,
    errors: Path,
) -> None:
    proxy = await start_proxy({"logging": {"enabled": False}})
    upstream.queue(Json(503))
    status, rid, _ = await post(client, proxy)
    assert status == 200
    await settle(proxy)
    assert request_logs(logs) == {}
    [retry] = error_logs(errors, "503")
    assert error_details(retry.read_text())["request_id"] == rid


async def test_error_logging_disabled_writes_no_error_log_but_requests_still(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    logs: Path,
    errors: Path,
) -> None:
    proxy = await start_proxy({"error_logging": {"enabled": False}})
    upstream.queue(Json(503))
    status, rid, _ = await post(client, proxy)
    assert status == 200
    status, _, _ = await post(client, proxy, b"{not json")
    assert status == 400
    await settle(proxy)
    assert error_logs(errors) == []
    assert rid in request_logs(logs)
    assert "UPSTREAM ATTEMPT #2:" in request_logs(logs)[rid].read_text()


def old_request_log(folder: Path, age_days: float, n: int) -> Path:
    when = time.time() - age_days * 86400
    stamp = datetime.fromtimestamp(when)
    path = folder / f"{stamp:%Y%m%d_%H%M%S}_{n:03d}_old{n}.log"
    path.write_text(f"Request ID: old{n}\nFinal Status: 200  Attempts: 1  Duration: 0.100 s\n")
    os.utime(path, (when, when))
    return path


async def test_request_logs_pruned_by_age_and_count_at_start_and_while_writing(
    start_proxy: StartProxy, client: aiohttp.ClientSession, logs: Path
) -> None:
    logs.mkdir(parents=True)
    ancient = [old_request_log(logs, 40 - i, i) for i in range(3)]  # older than max_age_days
    recent = [old_request_log(logs, 1 - i / 10, 10 + i) for i in range(5)]
    stranger = logs / "notes.txt"
    stranger.write_text("not a log")
    proxy = await start_proxy({"logging": {"max_files": 3, "max_age_days": 30}})
    await settle(proxy)
    assert not any(p.exists() for p in ancient)
    assert sorted(request_logs(logs).values()) == recent[-3:]  # oldest first removed
    assert stranger.exists()

    ids = []
    for _ in range(2):
        status, rid, _ = await post(client, proxy)
        assert status == 200
        ids.append(rid)
        await settle(proxy)
    left = request_logs(logs)
    assert len(left) == 3
    assert set(ids) <= set(left) and "old14" in left
    assert state_of(proxy).request_log.status()["pruned"] == 3 + 2 + 2


async def test_request_logs_pruned_by_age_while_running(
    start_proxy: StartProxy, client: aiohttp.ClientSession, logs: Path
) -> None:
    proxy = await start_proxy({"logging": {"max_age_days": 0.5 / 86400}})  # half a second
    status, first, _ = await post(client, proxy)
    await settle(proxy)
    assert first in request_logs(logs)
    await asyncio.sleep(0.6)
    status, second, _ = await post(client, proxy)
    assert status == 200
    await settle(proxy)
    assert list(request_logs(logs)) == [second]


# --- error logs ----------------------------------------------------------------------------


async def test_retry_error_logs(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, errors: Path
) -> None:
    proxy = await start_proxy()
    body = {"error": {"message": "The model is overloaded"}}
    upstream.queue(Json(503, body, headers={"Server": "nginx"}), Json(503, body), Json(200))
    status, rid, _ = await post(client, proxy)
    assert status == 200
    await settle(proxy)
    files = error_logs(errors)
    assert [f.name.split("_")[0] for f in files] == ["503", "503"]
    texts = sorted((f.read_text() for f in files), key=lambda t: error_details(t)["retry_attempt"])
    for n, text in enumerate(texts, start=1):
        assert text.startswith("=" * 80 + "\nERROR LOG - ")
        assert "Error Code: 503\n" in text
        assert f"RETRY ATTEMPT #{n}\nRetry Delay: " in text
        details = error_details(text)
        assert set(details) == set(SPEC_DETAIL_KEYS)
        assert details["request_id"] == rid
        assert details["status_code"] == 503
        assert details["status_text"] == "Service Unavailable"
        assert details["url"] == upstream.chat_url
        assert details["headers"]["Server"] == "nginx" or n == 2
        assert "The model is overloaded" in details["response_text"]
        assert details["retry_attempt"] == n
        assert isinstance(details["retry_delay"], float)
        assert details["error_type"] and details["error_message"]
        assert details["context"]["decision"] == "retry"
        assert "REQUEST CONTEXT:" in text and f'"request_id": "{rid}"' in text
        assert "TIMING INFORMATION:" in text
        assert "STACK TRACE:" not in text  # not an exception
    for path in files:
        assert f"File: {path.name}\n" in path.read_text()


async def test_final_error_log(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, errors: Path
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 1}, **NO_BREAKER})
    upstream.queue(Json(503), Json(503))
    status, rid, _ = await post(client, proxy)
    assert status == 503
    await settle(proxy)
    details = [error_details(p.read_text()) for p in error_logs(errors, "503")]
    final = [d for d in details if d["retry_attempt"] is None]
    assert len(details) == 2 and len(final) == 1
    assert final[0]["context"]["decision"] == "fail"
    assert final[0]["request_id"] == rid


async def test_hard_stop_error_log(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, errors: Path
) -> None:
    rule = {"pattern": "content_policy", "user_message": "Blocked.", "description": "policy"}
    proxy = await start_proxy({"error_handling": {"hard_stop_conditions": {"rules": [rule]}}})
    upstream.queue(Json(400, {"error": {"message": "content_policy violation"}}))
    status, rid, body = await post(client, proxy)
    assert status == 400 and orjson.loads(body)["error"]["type"] == "hard_stop_error"
    await settle(proxy)
    [path] = error_logs(errors)
    assert path.name.startswith("hard_stop_")
    details = error_details(path.read_text())
    assert details["request_id"] == rid and details["status_code"] == 400
    assert details["context"]["decision"] == "hard_stop"
    assert upstream.calls == 1


async def test_recategorization_error_log(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, errors: Path
) -> None:
    rule = {"pattern": "model is overloaded", "original_status": 200, "new_status": 503}
    proxy = await start_proxy({"response_parsing": {"status_recategorization": {"rules": [rule]}}})
    upstream.queue(Json(200, {"error": {"message": "The model is overloaded"}}), Json(200))
    status, rid, _ = await post(client, proxy)
    assert status == 200
    await settle(proxy)
    [recat] = error_logs(errors, "recategorized")
    details = error_details(recat.read_text())
    assert details["request_id"] == rid
    assert details["context"]["original_status"] == 200
    assert details["context"]["new_status"] == 503
    assert details["context"]["matched_pattern"] == "model is overloaded"
    [retry] = error_logs(errors, "503")
    assert error_details(retry.read_text())["retry_attempt"] == 1


async def test_body_too_large_is_logged_with_its_413(
    start_proxy: StartProxy, client: aiohttp.ClientSession, logs: Path
) -> None:
    proxy = await start_proxy({"server": {"max_body_mb": 0.001}})
    status, rid, _ = await post(client, proxy, chat_body(text="x" * 5000))
    assert status == 413
    await settle(proxy)
    text = request_logs(logs)[rid].read_text()
    assert "Final Status: 413" in text
    assert state_of(proxy).counters.by_status[413] == 1


async def test_bad_request_error_log(
    start_proxy: StartProxy, client: aiohttp.ClientSession, errors: Path
) -> None:
    proxy = await start_proxy()
    status, rid, _ = await post(client, proxy, b'{"messages": ')
    assert status == 400
    status, rid2, _ = await post(client, proxy, {"model": "m"})
    assert status == 400
    await settle(proxy)
    found = {error_details(p.read_text())["request_id"]: p for p in error_logs(errors)}
    assert set(found) == {rid, rid2}
    for path in found.values():
        assert path.name.startswith("bad_request_")
        details = error_details(path.read_text())
        assert details["status_code"] == 400
        assert details["status_text"] == "Bad Request"
    assert "not valid JSON" in error_details(found[rid].read_text())["error_message"]
    assert "messages" in error_details(found[rid2].read_text())["error_message"]


async def test_circuit_breaker_change_error_log(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, errors: Path
) -> None:
    proxy = await start_proxy(
        {
            "error_handling": {"max_retries": 0},
            "circuit_breaker": {"failure_threshold": 2, "recovery_timeout": 60},
        }
    )
    upstream.default = Json(503)
    for _ in range(2):
        assert (await post(client, proxy))[0] == 503
    status, rid, _ = await post(client, proxy)  # refused by the open circuit
    assert status == 503
    await settle(proxy)
    opened = [p for p in error_logs(errors, "circuit_open") if "closed -> open" in p.read_text()]
    assert len(opened) == 1
    details = error_details(opened[0].read_text())
    assert details["error_type"] == "CircuitBreaker"
    assert details["context"]["state"] == "open"
    refused = [error_details(p.read_text()) for p in error_logs(errors, "circuit_open")]
    assert any(d["request_id"] == rid for d in refused)
    assert upstream.calls == 2


async def test_connection_error_log(
    start_proxy: StartProxy, client: aiohttp.ClientSession, errors: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/chat/completions"
    proxy = await start_proxy({"target_proxy": {"url": url}, **NO_RETRY})
    status, rid, _ = await post(client, proxy)
    assert status == 502
    await settle(proxy)
    [path] = error_logs(errors, "connection_error")
    details = error_details(path.read_text())
    assert details["request_id"] == rid and details["status_code"] is None
    assert "Could not connect" in details["error_message"]
    assert details["url"] == url


async def test_timeout_error_log(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, errors: Path
) -> None:
    proxy = await start_proxy({"target_proxy": {"timeout": 0.2}, **NO_RETRY})
    upstream.queue(Hang(5))
    status, rid, _ = await post(client, proxy)
    assert status == 504
    await settle(proxy)
    [path] = error_logs(errors, "timeout")
    assert error_details(path.read_text())["request_id"] == rid


async def test_empty_reply_and_invalid_json_error_logs(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, errors: Path
) -> None:
    proxy = await start_proxy(NO_BREAKER)
    upstream.queue(Json(200, completion(text="")), Json(200, "<html>oops</html>"), Json(200))
    status, rid, _ = await post(client, proxy)
    assert status == 200
    await settle(proxy)
    [empty] = error_logs(errors, "empty_response")
    [garbage] = error_logs(errors, "invalid_json")
    assert error_logs(errors) == sorted([empty, garbage])
    for path in (empty, garbage):
        details = error_details(path.read_text())
        assert details["request_id"] == rid and details["status_code"] == 200
        assert details["retry_attempt"] is not None
    assert "<html>oops</html>" in error_details(garbage.read_text())["response_text"]


async def test_stream_interrupted_after_content_error_log(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, errors: Path
) -> None:
    proxy = await start_proxy()
    upstream.queue(Sse([chunk(role=True, text=""), chunk("Hel")], end="reset"))
    status, rid, body = await post(client, proxy, chat_body(stream=True))
    assert status == 200 and b"stream_interrupted" in body
    await settle(proxy)
    [path] = error_logs(errors)
    details = error_details(path.read_text())
    assert details["request_id"] == rid
    assert details["error_type"] == "StreamInterrupted"
    assert details["context"]["after_content"] is True


@pytest.mark.parametrize("traces", [True, False])
@pytest.mark.parametrize("context", [True, False])
async def test_stack_trace_and_request_context_switches(
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    errors: Path,
    monkeypatch: pytest.MonkeyPatch,
    traces: bool,
    context: bool,
) -> None:
    from first_hop_proxy import forwarding

    def broken(*args: Any) -> Any:
        raise RuntimeError("rewrite engine exploded")

    monkeypatch.setattr(forwarding, "parse_chat_request", broken)
    proxy = await start_proxy(
        {"error_logging": {"include_stack_traces": traces, "include_request_context": context}}
    )
    status, rid, body = await post(client, proxy)
    assert status == 500 and rid in orjson.loads(body)["error"]["message"]
    await settle(proxy)
    [path] = error_logs(errors, "endpoint_error")
    text = path.read_text()
    details = error_details(text)
    assert details["request_id"] == rid and details["error_type"] == "RuntimeError"
    assert "rewrite engine exploded" in details["error_message"]
    assert ("STACK TRACE:" in text) is traces
    assert ("Traceback (most recent call last)" in text) is traces
    assert ("REQUEST CONTEXT:" in text) is context


async def test_error_logs_rotate_at_max_files(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, errors: Path
) -> None:
    errors.mkdir(parents=True)
    for i in range(4):
        (errors / f"503_20200101_000000_{i:03d}.log").write_text("old")
    proxy = await start_proxy({"error_logging": {"max_files": 3}, **NO_RETRY})
    await settle(proxy)
    assert [p.name for p in error_logs(errors)] == [
        f"503_20200101_000000_{i:03d}.log" for i in (1, 2, 3)
    ]
    upstream.default = Json(503)
    ids = []
    for _ in range(5):
        ids.append((await post(client, proxy))[1])
    await settle(proxy)
    files = error_logs(errors)
    assert len(files) == 3
    assert [error_details(p.read_text())["request_id"] for p in files] == ids[-3:]
    assert state_of(proxy).error_log.status()["removed"] == 1 + 5


async def test_error_log_truncated_at_max_file_size(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, errors: Path
) -> None:
    proxy = await start_proxy({"error_logging": {"max_file_size_mb": 0.01}, **NO_RETRY})
    huge = "overloaded " + "x" * 500_000
    upstream.queue(Json(503, {"error": {"message": huge}}))
    status, rid, _ = await post(client, proxy)
    assert status == 503
    await settle(proxy)
    [path] = error_logs(errors)
    assert path.stat().st_size <= 0.01 * 1024 * 1024
    text = path.read_text()
    assert "truncated" in text
    assert error_details(text)["request_id"] == rid  # still a complete, parseable log


async def test_same_millisecond_events_never_overwrite(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, errors: Path
) -> None:
    proxy = await start_proxy({"error_logging": {"max_files": 1000}, **NO_RETRY})
    state = state_of(proxy)
    now = time.time()
    for n in range(3):
        state.error_log.log(ErrorEvent("same_ms", "Test", f"event {n}", timestamp=now))
    upstream.default = Json(503)
    results = await asyncio.gather(*(post(client, proxy) for _ in range(50)))
    assert all(status == 503 for status, _, _ in results)
    await settle(proxy)
    same = error_logs(errors, "same_ms")
    assert len({p.name for p in same}) == 3
    assert sorted(error_details(p.read_text())["error_message"] for p in same) == [
        "event 0",
        "event 1",
        "event 2",
    ]
    by_id = [error_details(p.read_text())["request_id"] for p in error_logs(errors, "503")]
    assert sorted(by_id) == sorted(rid for _, rid, _ in results)


async def test_log_write_error_is_logged(
    start_proxy: StartProxy, client: aiohttp.ClientSession, tmp_path: Path, errors: Path
) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    proxy = await start_proxy({"logging": {"folder": str(blocker / "logs")}})
    assert (await post(client, proxy))[0] == 200
    await settle(proxy)
    await settle(proxy)
    [path] = error_logs(errors, "log_write_error")
    assert "afile" in error_details(path.read_text())["error_message"]


# --- many at once ---------------------------------------------------------------------------


async def test_200_concurrent_requests_each_get_their_files(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    logs: Path,
    errors: Path,
) -> None:
    proxy = await start_proxy({"error_logging": {"max_files": 1000}, **NO_BREAKER})
    upstream.queue(*(Json(503) for _ in range(100)))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(post(session, proxy) for _ in range(200)))
    assert [status for status, _, _ in results] == [200] * 200
    await settle(proxy)
    ids = {rid for _, rid, _ in results}
    assert len(ids) == 200
    files = request_logs(logs)
    assert set(files) == ids
    retried = [error_details(p.read_text())["request_id"] for p in error_logs(errors, "503")]
    assert len(retried) == 100 and set(retried) <= ids
    attempts = {rid: files[rid].read_text().count("UPSTREAM ATTEMPT #") for rid in ids}
    assert sum(attempts.values()) == 300
    assert state_of(proxy).writer.failures == 0


# --- a folder that cannot be written -----------------------------------------------------


@pytest.mark.parametrize("errors_too", [False, True])
async def test_unwritable_log_folder_keeps_serving_and_warns_once(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    errors_too: bool,
) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("a file where the log folder should be")
    caplog.set_level(logging.INFO, logger="first_hop_proxy")
    settings: dict[str, Any] = {"logging": {"folder": str(blocker / "logs")}}
    if errors_too:
        settings["error_logging"] = {"folder": str(blocker / "errors")}
    proxy = await start_proxy(settings)
    upstream.queue(Json(503), Json(503))
    for _ in range(5):
        status, _, _ = await post(client, proxy)
        assert status == 200
    await settle(proxy)
    async with client.get(proxy.url + "/health/detailed") as resp:
        assert resp.status == 200
        health = await resp.json()
    writer = health["logging"]["writer"]
    assert writer["failures"] >= 5
    assert writer["last_error"]
    assert health["logging"]["request_log"]["enabled"] is True
    warnings = [r for r in caplog.records if "log write failed" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert blocker.read_text() == "a file where the log folder should be"


# --- the console ---------------------------------------------------------------------------


def console_lines(caplog: pytest.LogCaptureFixture, rid: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if rid in r.getMessage()]


async def test_console_one_line_per_request(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="first_hop_proxy")
    proxy = await start_proxy()
    upstream.queue(Json(503), Json(503), Json(200))
    _, rid, _ = await post(client, proxy)
    upstream.queue(Sse())
    _, srid, _ = await post(client, proxy, chat_body(stream=True))
    [line] = console_lines(caplog, rid)
    assert line.startswith(rid) and "fake-model" in line and "json" in line
    assert "-> 200" in line and "3 attempts" in line and line.rstrip().endswith(" s")
    [sline] = console_lines(caplog, srid)
    assert "stream" in sline and "-> 200" in sline and "1 attempt," in sline
    assert all(r.levelno >= logging.INFO for r in caplog.records if r.name == "first_hop_proxy")


async def test_console_debug_adds_detail(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="first_hop_proxy")
    proxy = await start_proxy({"server": {"debug": True}})
    upstream.queue(Json(503, {"error": {"message": "busy now"}}), Json(200))
    _, rid, _ = await post(client, proxy)
    lines = console_lines(caplog, rid)
    assert len(lines) > 1
    detail = "\n".join(lines)
    assert "attempt #1" in detail and "503" in detail and "retry" in detail
    assert "attempt #2" in detail and "deliver" in detail


async def test_rule_timeout_error_log(
    start_proxy: StartProxy, client: aiohttp.ClientSession, errors: Path
) -> None:
    rule = {"pattern": "(a|aa)+$", "replacement": "x", "apply_to": "user"}
    proxy = await start_proxy({"regex_replacement": {"rules": [rule], "timeout_ms": 1}})
    status, rid, _ = await post(client, proxy, chat_body(text="a" * 60 + "b"))
    assert status == 200
    await settle(proxy)
    [path] = error_logs(errors, "rule_timeout")
    details = error_details(path.read_text())
    assert details["request_id"] == rid and details["error_type"] == "RuleTimeout"


# -- what the logs say is true ------------------------------------------------------------


async def test_no_delay_logged_that_was_not_taken(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy({"error_handling": {"base_delay": 2, "max_delay": 2}})
    upstream.default = Json(503, {"error": {"message": "busy"}})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.4)) as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(proxy.url + "/v1/chat/completions", json=chat_body()) as r:
                await r.read()
    await wait_until(lambda: request_logs(tmp_path / "logs"), 2)
    await settle(proxy)
    (log,) = request_logs(tmp_path / "logs").values()
    text = log.read_text()
    assert "UPSTREAM ATTEMPT #1" in text
    assert "Delay Before Next Attempt" not in text  # the client left during the wait


async def test_taken_delay_is_logged_and_messages_are_said_once(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy(
        {"target_proxy": {"timeout": 0.2}, "error_handling": {"max_retries": 1}}
    )
    upstream.queue(Hang(), Json())
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + "/v1/chat/completions", json=chat_body()) as r,
    ):
        assert r.status == 200
    await settle(proxy)
    (log,) = request_logs(tmp_path / "logs").values()
    text = log.read_text()
    assert text.count("Delay Before Next Attempt") == 1
    (error,) = error_logs(tmp_path / "logs" / "errors", "timeout")
    message = error_details(error.read_text())["error_message"]
    assert message.count("sent nothing for 0.2 s") == 1, message
