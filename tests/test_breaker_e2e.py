"""The circuit breaker through the real server: every transition, what the client
gets while it is open, what /health/detailed shows, and that each change is logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body, wait_until
from .fake_upstream import FakeUpstream, Hang, Json, Reset, completion

CHAT = "/v1/chat/completions"
RECOVERY = 0.3


def breaker_settings(threshold: int = 3, max_retries: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "error_handling": {"max_retries": max_retries},
        "circuit_breaker": {
            "failure_threshold": threshold,
            "recovery_timeout": RECOVERY,
            **extra,
        },
    }


async def ask(
    client: aiohttp.ClientSession, proxy: RunningServer, stream: bool = False
) -> tuple[int, dict[str, str], Any]:
    async with client.post(proxy.url + CHAT, json=chat_body(stream=stream)) as resp:
        body = await resp.read()
        parsed = orjson.loads(body) if resp.content_type == "application/json" else body
        return resp.status, dict(resp.headers), parsed


async def breaker(client: aiohttp.ClientSession, proxy: RunningServer) -> dict[str, Any]:
    async with client.get(proxy.url + "/health/detailed") as resp:
        assert resp.status == 200
        data: dict[str, Any] = (await resp.json())["circuit_breaker"]
        return data


async def open_circuit(
    client: aiohttp.ClientSession, proxy: RunningServer, upstream: FakeUpstream, threshold: int
) -> None:
    upstream.default = Json(503, {"error": {"message": "Service Unavailable"}})
    for _ in range(threshold):
        status, _, _ = await ask(client, proxy)
        assert status == 503
    assert upstream.calls == threshold
    assert (await breaker(client, proxy))["state"] == "open"


async def test_opens_at_threshold_and_refuses_without_calling_upstream(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(breaker_settings(threshold=3))
    upstream.default = Json(503, {"error": {"message": "Service Unavailable"}})
    for n in range(1, 3):
        status, _, body = await ask(client, proxy)
        assert status == 503 and body["error"]["type"] == "upstream_error"
        state = await breaker(client, proxy)
        assert state["state"] == "closed"
        assert state["consecutive_failures"] == n
    status, _, _ = await ask(client, proxy)
    assert status == 503
    assert upstream.calls == 3
    state = await breaker(client, proxy)
    assert state["state"] == "open"
    assert state["consecutive_failures"] == 3
    assert state["next_probe_at"] is not None
    assert 0 < state["retry_in"] <= RECOVERY

    for stream in (False, True):
        status, headers, body = await ask(client, proxy, stream=stream)
        assert upstream.calls == 3  # refused before any upstream call
        assert status == 503
        assert headers["Retry-After"] == "1"
        error = body["error"]
        assert error["type"] == "circuit_open"
        assert error["code"] == "circuit_open"
        assert error["retry_after"] == 1
        assert error["attempts"] == 0
        assert "3 times in a row" in error["message"]
        assert "Try again in 1 s" in error["message"]


async def test_retry_after_header_is_the_time_left(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    settings = breaker_settings(threshold=1)
    settings["circuit_breaker"]["recovery_timeout"] = 30
    proxy = await start_proxy(settings)
    upstream.default = Json(502)
    await ask(client, proxy)
    status, headers, body = await ask(client, proxy)
    assert upstream.calls == 1
    assert status == 503
    assert 29 <= int(headers["Retry-After"]) <= 30
    assert body["error"]["retry_after"] == 30
    assert "Try again in 30 s" in body["error"]["message"]


async def test_half_open_probe_success_closes(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(breaker_settings(threshold=2))
    await open_circuit(client, proxy, upstream, 2)
    await asyncio.sleep(RECOVERY + 0.05)
    upstream.default = Json(200, completion("Back again"))
    status, _, body = await ask(client, proxy)
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "Back again"
    assert upstream.calls == 3
    state = await breaker(client, proxy)
    assert state["state"] == "closed"
    assert state["consecutive_failures"] == 0
    assert state["next_probe_at"] is None
    status, _, _ = await ask(client, proxy)
    assert status == 200 and upstream.calls == 4


async def test_half_open_probe_failure_reopens(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(breaker_settings(threshold=2))
    await open_circuit(client, proxy, upstream, 2)
    await asyncio.sleep(RECOVERY + 0.05)
    upstream.default = Reset()
    status, _, body = await ask(client, proxy)
    assert status == 502 and body["error"]["type"] == "connection_error"
    assert upstream.calls == 3
    state = await breaker(client, proxy)
    assert state["state"] == "open"
    assert state["retry_in"] > RECOVERY / 2
    status, _, body = await ask(client, proxy)
    assert status == 503 and body["error"]["type"] == "circuit_open"
    assert upstream.calls == 3


async def test_half_open_lets_only_max_probes_through(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(breaker_settings(threshold=2, half_open_max_requests=2))
    await open_circuit(client, proxy, upstream, 2)
    await asyncio.sleep(RECOVERY + 0.05)
    upstream.default = Json(200, completion("probe"), delay=0.2)
    results = await asyncio.gather(*(ask(client, proxy) for _ in range(4)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200, 503, 503]
    assert upstream.calls == 4  # two before, two probes
    for status, _, body in results:
        if status == 503:
            assert body["error"]["type"] == "circuit_open"
    assert (await breaker(client, proxy))["state"] == "closed"


async def test_any_success_resets_the_count(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(breaker_settings(threshold=3))
    upstream.queue(Json(503), Json(503), Json(), Json(503), Json(503))
    statuses = [(await ask(client, proxy))[0] for _ in range(5)]
    assert statuses == [503, 503, 200, 503, 503]
    assert upstream.calls == 5
    state = await breaker(client, proxy)
    assert state["state"] == "closed"
    assert state["consecutive_failures"] == 2


async def test_a_request_keeps_its_retries_and_the_next_one_hears_why(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """Consecutive failed attempts count, retries included, so one request's retries open
    the circuit; but that request keeps its whole retry budget. The next request is
    refused at once, told the last upstream error and when the proxy will try again."""
    proxy = await start_proxy(breaker_settings(threshold=3, max_retries=5))
    upstream.default = Json(503, {"error": {"message": "Service Unavailable"}})
    status, _, body = await ask(client, proxy)
    assert upstream.calls == 6  # all of max_retries, though the circuit opened at 3
    assert status == 503
    assert body["error"]["code"] == "retries_exhausted"
    assert body["error"]["attempts"] == 6
    state = await breaker(client, proxy)
    assert state["state"] == "open"
    assert state["last_failure"] == "503 Service Unavailable: Service Unavailable"

    status, headers, body = await ask(client, proxy)
    assert upstream.calls == 6
    assert status == 503 and headers["Retry-After"] == "1"
    message = body["error"]["message"]
    assert body["error"]["code"] == "circuit_open"
    assert "3 times in a row" in message and "Try again in 1 s" in message
    assert "The last error: 503 Service Unavailable: Service Unavailable" in message


async def test_a_retry_does_not_wait_for_the_probe_and_its_success_closes(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """A request already retrying is not stalled by a circuit its own failures opened:
    it retries after its backoff delay, and its success closes the circuit."""
    settings = breaker_settings(threshold=2, max_retries=5)
    settings["circuit_breaker"]["recovery_timeout"] = 30
    proxy = await start_proxy(settings)
    upstream.queue(Json(503), Json(503), Json(200, completion("after the pause")))
    began = time.monotonic()
    status, _, body = await ask(client, proxy)
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "after the pause"
    assert upstream.calls == 3
    assert time.monotonic() - began < 2  # not the 30 s recovery timeout
    assert (await breaker(client, proxy))["state"] == "closed"


@pytest.mark.parametrize("kind", ["503", "429", "reset", "timeout", "invalid_json"])
async def test_failures_that_count(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, kind: str
) -> None:
    settings = breaker_settings(threshold=2)
    settings["target_proxy"] = {"timeout": 0.2}
    proxy = await start_proxy(settings)
    upstream.default = {
        "503": Json(503),
        "429": Json(429),
        "reset": Reset(),
        "timeout": Hang(),
        "invalid_json": Json(200, "<html>Bad gateway</html>"),
    }[kind]
    for _ in range(2):
        status, _, body = await ask(client, proxy)
        assert body["error"]["type"] != "circuit_open"
    assert upstream.calls == 2
    assert (await breaker(client, proxy))["state"] == "open"
    status, _, body = await ask(client, proxy)
    assert status == 503 and body["error"]["type"] == "circuit_open"
    assert upstream.calls == 2


async def test_client_leaving_does_not_count(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(breaker_settings(threshold=1))
    upstream.default = Hang(5)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as short:
        with pytest.raises(asyncio.TimeoutError):
            await ask(short, proxy)
    await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as session:
        state = await breaker(session, proxy)
    assert upstream.calls == 1
    assert state["state"] == "closed"
    assert state["consecutive_failures"] == 0


@pytest.mark.parametrize("kind", ["client_error", "hard_stop", "empty"])
async def test_client_errors_hard_stops_and_empty_replies_do_not_count(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, kind: str
) -> None:
    rule = {"pattern": "Cannot read properties of undefined", "user_message": "Rephrase."}
    settings = breaker_settings(threshold=2)
    settings["error_handling"]["hard_stop_conditions"] = {"rules": [rule]}
    proxy = await start_proxy(settings)
    behaviour = {
        "client_error": Json(400, {"error": {"message": "bad request"}}),
        "hard_stop": Json(500, {"error": {"message": "x: Cannot read properties of undefined"}}),
        "empty": Json(200, completion("")),
    }[kind]
    upstream.default = behaviour
    for _ in range(3):
        _status, _, body = await ask(client, proxy)
        assert body["error"]["type"] != "circuit_open"
    # An empty reply is retried on its own budget (3 retries): still no failure counted.
    assert upstream.calls == (12 if kind == "empty" else 3)
    state = await breaker(client, proxy)
    assert state["state"] == "closed"
    assert state["consecutive_failures"] == 0


async def test_recategorized_status_counts_as_what_it_became(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    settings = breaker_settings(threshold=2)
    rule = {"pattern": "The model is overloaded", "original_status": 200, "new_status": 429}
    settings["response_parsing"] = {"status_recategorization": {"rules": [rule]}}
    proxy = await start_proxy(settings)
    upstream.default = Json(200, {"error": {"message": "The model is overloaded"}})
    for _ in range(2):
        _status, _, body = await ask(client, proxy)
        assert body["error"]["type"] == "rate_limited"
    assert upstream.calls == 2
    assert (await breaker(client, proxy))["state"] == "open"


async def test_disabled_breaker_never_opens(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    settings = breaker_settings(threshold=1)
    settings["circuit_breaker"]["enabled"] = False
    proxy = await start_proxy(settings)
    upstream.default = Json(503)
    for _ in range(3):
        status, _, _ = await ask(client, proxy)
        assert status == 503
    assert upstream.calls == 3
    assert (await breaker(client, proxy))["state"] == "closed"


async def test_every_state_change_is_logged(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.WARNING, logger="first_hop_proxy")
    proxy = await start_proxy(breaker_settings(threshold=2))
    await open_circuit(client, proxy, upstream, 2)
    await asyncio.sleep(RECOVERY + 0.05)
    await ask(client, proxy)  # the probe fails: open again
    await asyncio.sleep(RECOVERY + 0.05)
    upstream.default = Json()
    await ask(client, proxy)  # the probe succeeds: closed
    moves = [r.getMessage() for r in caplog.records if "circuit " in r.getMessage()]
    expected = [
        "closed -> open",
        "open -> half_open",
        "half_open -> open",
        "open -> half_open",
        "half_open -> closed",
    ]
    assert len(moves) == len(expected), moves
    for line, move in zip(moves, expected, strict=True):
        assert move in line, moves
    folder = tmp_path / "logs" / "errors"

    def circuit_logs() -> list[Path]:
        return [f for f in folder.glob("*.log") if "circuit" in f.name]

    await wait_until(lambda: len(circuit_logs()) >= len(expected), 2)
    files = circuit_logs()
    assert len(files) == len(expected), files
    text = "\n".join(f.read_text() for f in files)
    for move in expected:
        assert f"circuit {move}" in text, move
    # Times in the files are wall-clock ISO timestamps, not monotonic seconds.
    from datetime import datetime

    opened = re.findall(r'"opened_at": "([^"]+)"', text)
    assert opened, text
    assert all(abs(datetime.fromisoformat(t).timestamp() - time.time()) < 60 for t in opened)


async def test_health_says_what_is_true(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """unknown before the upstream was reached, ok once it answered, degraded (with the
    reason) while attempts fail or the breaker is open; times are ISO wall-clock."""
    from datetime import datetime

    proxy = await start_proxy(breaker_settings(threshold=2))

    async def health() -> dict[str, Any]:
        async with client.get(proxy.url + "/health/detailed") as resp:
            return dict(await resp.json())

    assert (await health())["status"] == "unknown"
    await ask(client, proxy)
    body = await health()
    assert body["status"] == "ok", body["reason"]
    upstream.default = Json(503, {"error": {"message": "Service Unavailable"}})
    await ask(client, proxy)
    body = await health()
    assert body["status"] == "degraded"
    assert "the last 1 attempt(s)" in body["reason"] and "503 Service Unavailable" in body["reason"]
    await ask(client, proxy)
    body = await health()
    assert body["status"] == "degraded" and "circuit breaker is open" in body["reason"]
    opened = datetime.fromisoformat(body["circuit_breaker"]["opened_at"])
    assert opened.tzinfo is not None
    assert abs(opened.timestamp() - time.time()) < 5
    assert datetime.fromisoformat(body["circuit_breaker"]["next_probe_at"]) > opened
