"""The dashboard's server side over real HTTP: the event stream, the JSON API, the files."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy import events
from first_hop_proxy.logs.request_log import RequestRecord
from first_hop_proxy.redact import Redactor
from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body, free_port
from .fake_upstream import FakeUpstream, Json, Sse, text_chunks
from .log_helpers import settle, state_of

KEY = "sk-live-0123456789abcdefWXYZ"


class Feed:
    """A reader of the dashboard's event stream."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, timeout: float = 5) -> tuple[str, Any]:
        kind, data = "", b""
        while True:
            line = await asyncio.wait_for(self.resp.content.readline(), timeout)
            assert line, "the stream ended"
            line = line.rstrip(b"\n")
            if not line:
                if data:
                    return kind, orjson.loads(data)
                continue
            if line.startswith(b"event: "):
                kind = line[7:].decode()
            elif line.startswith(b"data: "):
                data += line[6:]

    async def until(self, test: Any, timeout: float = 5) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            kind, data = await self.next(max(0.01, deadline - time.monotonic()))
            if test(kind, data):
                return kind, data


async def open_feed(client: aiohttp.ClientSession, proxy: RunningServer) -> Feed:
    resp = await client.get(proxy.url + "/dashboard/api/events")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    return Feed(resp)


async def test_the_feed_shows_a_request_as_it_starts_and_ends(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    feed = await open_feed(client, proxy)
    kind, snapshot = await feed.next()
    assert kind == "snapshot" and snapshot == {"running": [], "recent": []}
    kind, health = await feed.next()
    assert kind == "health" and health["upstreams"][0]["name"] == "default"

    upstream.queue(Sse(text_chunks("Hel", "lo"), gap=0.3))
    began = time.monotonic()
    request = asyncio.ensure_future(
        client.post(proxy.url + "/v1/chat/completions", json=chat_body(stream=True))
    )
    _, running = await feed.until(lambda k, d: k == "request")
    assert time.monotonic() - began < 1.0
    assert running["state"] == "running" and running["stream"] is True
    assert running["model"] == "fake-model"
    _, done = await feed.until(lambda k, d: k == "request" and d["state"] == "done")
    resp = await request
    assert done["id"] == resp.headers["X-Request-ID"]
    assert done["status"] == 200 and done["upstream"] == "default"
    assert done["first_token"] is not None and done["duration"] >= done["first_token"]
    assert done["size"] > 0
    assert [a["action"] for a in done["attempts"]] == ["deliver"]
    resp.close()
    _, health = await feed.until(lambda k, d: k == "health", timeout=3)
    assert health["counters"]["requests"] == 1
    feed.resp.close()


async def test_a_new_page_gets_what_happened_before(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Json(503), Json(200))
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        request_id = resp.headers["X-Request-ID"]
    feed = await open_feed(client, proxy)
    _, snapshot = await feed.next()
    [entry] = snapshot["recent"]
    assert entry["id"] == request_id
    assert [(a["status"], a["action"], a["code"]) for a in entry["attempts"]] == [
        (503, "retry", "503"),
        (200, "deliver", ""),
    ]
    feed.resp.close()


async def test_failed_requests_carry_their_error_masked(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 0}})
    upstream.queue(Json(503, body={"error": {"message": f"quota gone for {KEY}"}}))
    feed = await open_feed(client, proxy)
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 503
    _, done = await feed.until(lambda k, d: k == "request" and d["state"] == "done")
    assert done["status"] == 503 and done["error"]
    assert KEY not in orjson.dumps(done).decode()
    assert "quota gone" in done["attempts"][0]["error"]
    feed.resp.close()


async def test_a_key_sent_as_the_model_name_is_masked(
    proxy: RunningServer, client: aiohttp.ClientSession
) -> None:
    feed = await open_feed(client, proxy)
    await feed.next()
    body = chat_body(model=KEY)
    async with client.post(proxy.url + "/v1/chat/completions", json=body) as resp:
        await resp.read()
    _, done = await feed.until(lambda k, d: k == "request" and d["state"] == "done")
    assert done["model"] and KEY not in done["model"]
    feed.resp.close()
    feed = await open_feed(client, proxy)
    _, snapshot = await feed.next()
    assert KEY not in orjson.dumps(snapshot).decode()
    feed.resp.close()


async def test_watchers_are_capped(
    proxy: RunningServer, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "MAX_SUBSCRIBERS", 1)
    feed = await open_feed(client, proxy)
    async with client.get(proxy.url + "/dashboard/api/events") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "too_many_watchers"
    feed.resp.close()


async def test_shutdown_does_not_wait_for_an_open_page(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"server": {"shutdown_grace_seconds": 30}})
    feed = await open_feed(client, proxy)
    await feed.next()
    began = time.monotonic()
    await proxy.close()
    assert time.monotonic() - began < 5
    feed.resp.close()


async def test_request_detail_reads_the_log(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Json(503, body={"error": {"message": "busy"}}), Json(200))
    headers = {"Authorization": f"Bearer {KEY}"}
    url = proxy.url + "/v1/chat/completions"
    async with client.post(url, json=chat_body(), headers=headers) as resp:
        request_id = resp.headers["X-Request-ID"]
    await settle(proxy)
    async with client.get(f"{proxy.url}/dashboard/api/requests/{request_id}") as resp:
        assert resp.status == 200
        detail = await resp.json()
    assert detail["id"] == request_id and detail["status"] == 200
    assert [(a["status"], a["action"]) for a in detail["attempts"]] == [
        (503, "retry"),
        (200, "deliver"),
    ]
    assert detail["attempts"][0]["delay"] is not None
    assert "busy" in detail["attempts"][0]["error"]
    assert detail["raw"] == f"/logs/requests/{request_id}"
    assert KEY not in orjson.dumps(detail).decode()
    assert dict(detail["request_headers"])["Authorization"].startswith("Bearer sk-")
    async with client.get(proxy.url + detail["raw"]) as resp:
        assert resp.status == 200 and request_id in await resp.text()


async def test_request_detail_while_the_log_is_written(
    proxy: RunningServer, client: aiohttp.ClientSession
) -> None:
    state = state_of(proxy)
    state.hub.started(RequestRecord("inflight1", "/v1/chat/completions"), Redactor)
    base = proxy.url + "/dashboard/api/requests/"
    async with client.get(base + "inflight1") as resp:
        assert resp.status == 202 and (await resp.json())["pending"] is True
    async with client.get(base + "neverseen") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "log_not_found"
    async with client.get(base + "..%2f..%2fetc") as resp:
        assert resp.status in (400, 404)


async def test_request_detail_without_request_logs(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"logging": {"enabled": False}})
    async with client.get(proxy.url + "/dashboard/api/requests/abc") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "logging_disabled"


async def test_errors_are_listed_and_filtered(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 0}})
    upstream.queue(Json(503, body={"error": {"message": "overloaded"}}))
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        failed_id = resp.headers["X-Request-ID"]
    async with client.post(proxy.url + "/v1/chat/completions", data=b"{not json") as resp:
        assert resp.status == 400
    await settle(proxy)
    api = proxy.url + "/dashboard/api/errors"

    async def listing(**query: str) -> dict[str, Any]:
        async with client.get(api, params=query) as resp:
            assert resp.status == 200
            result: dict[str, Any] = await resp.json()
            return result

    everything = await listing()
    assert everything["codes"] == {"503": 1, "bad_request": 1}
    assert everything["upstreams"] == ["default"]
    [row] = (await listing(code="503"))["files"]
    assert row["request_id"] == failed_id
    assert row["upstream"] == "default"
    assert row["status"] == 503 and "overloaded" in row["message"]
    assert [r["code"] for r in (await listing(code="bad_request"))["files"]] == ["bad_request"]
    # A bad request never reached an upstream: only the 503 is the upstream's.
    assert [r["code"] for r in (await listing(upstream="default"))["files"]] == ["503"]
    assert (await listing(upstream="elsewhere"))["files"] == []
    assert (await listing(since=str(time.time() + 60)))["files"] == []
    assert len((await listing(since=str(time.time() - 60)))["files"]) == 2
    async with client.get(api, params={"since": "yesterday"}) as resp:
        assert resp.status == 400


async def test_config_view_masks_every_secret(
    start_proxy: StartProxy, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token, client_key = "admin-token-0123456789abcdef", "client-key-0123456789abcdef"
    proxy = await start_proxy(
        {
            "target_proxy": {"headers": {"Authorization": f"Bearer {KEY}"}},
            "server": {"admin_token": token, "api_keys": [client_key], "hots": "x"},
        }
    )
    headers = {"Authorization": f"Bearer {token}"}
    async with client.get(proxy.url + "/dashboard/api/config", headers=headers) as resp:
        assert resp.status == 200
        text = await resp.text()
    for secret in (KEY, token, client_key):
        assert secret not in text
    view = orjson.loads(text)
    assert view["config"]["target_proxy"]["headers"]["Authorization"].startswith("Bearer ***")
    assert view["config"]["server"]["admin_token"].startswith("***")
    assert any("server.hots" in w for w in view["warnings"])
    assert view["loaded_at"] <= time.time()


async def test_health_shows_an_open_breaker(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"circuit_breaker": {"failure_threshold": 2}, "error_handling": {"max_retries": 1}}
    )
    upstream.queue(Json(503), Json(503))
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 503
    async with client.get(proxy.url + "/dashboard/api/health") as resp:
        health = await resp.json()
    [up] = health["upstreams"]
    assert up["circuit_breaker"]["state"] == "open"
    next_probe = datetime.fromisoformat(up["circuit_breaker"]["next_probe_at"])
    assert next_probe.timestamp() > time.time()
    assert up["last_5_minutes"]["attempts"] == 2 and up["last_5_minutes"]["success_rate"] == 0
    assert health["status"] == "degraded"
    assert sum(m["failures"] for m in health["per_minute"]) == 1
    assert health["logging"]["writer"]["dropped"] == 0


async def test_several_upstreams_each_have_their_figures(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """A request that fails over shows where it went; health and /metrics list each one."""
    down = f"http://127.0.0.1:{free_port()}/v1/chat/completions"
    proxy = await start_proxy(
        {
            "target_proxy": {"url": ""},
            "upstreams": [
                {"name": "down", "url": down},
                {"name": "good", "url": upstream.chat_url},
            ],
            "circuit_breaker": {"failure_threshold": 1},
        }
    )
    feed = await open_feed(client, proxy)
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
    _, done = await feed.until(lambda k, d: k == "request" and d["state"] == "done")
    assert done["upstream"] == "good"
    assert [a["upstream"] for a in done["attempts"]] == ["down", "good"]
    _, health = await feed.until(lambda k, d: k == "health")
    by_name = {u["name"]: u for u in health["upstreams"]}
    assert by_name["down"]["circuit_breaker"]["state"] == "open"
    assert by_name["good"]["last_5_minutes"]["success_rate"] == 1.0
    feed.resp.close()
    async with client.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    assert 'first_hop_proxy_circuit_breaker_state{state="open",upstream="down"} 1.0' in text
    assert 'first_hop_proxy_requests_total{status="200",upstream="good"} 1.0' in text
    assert 'first_hop_proxy_upstream_latency_seconds_count{upstream="down"} 1.0' in text


STATIC = resources.files("first_hop_proxy.dashboard") / "static"


async def test_the_page_and_its_files(proxy: RunningServer, client: aiohttp.ClientSession) -> None:
    for path, content_type in [
        ("/", "text/html"),
        ("/dashboard", "text/html"),
        ("/dashboard/static/app.js", "text/javascript"),
        ("/dashboard/static/style.css", "text/css"),
        ("/dashboard/static/favicon.svg", "image/svg+xml"),
    ]:
        async with client.get(proxy.url + path) as resp:
            assert resp.status == 200, path
            assert resp.content_type == content_type
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert "Access-Control-Allow-Origin" not in resp.headers
    async with client.get(proxy.url + "/dashboard/static/nope.js") as resp:
        assert resp.status == 404


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """No CDN, no web font, no other host: the only URL is the SVG namespace name."""
    for entry in STATIC.iterdir():
        text = entry.read_text(encoding="utf-8")
        urls = set(re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"')]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (entry.name, urls)
        assert "@import" not in text and "@font-face" not in text
