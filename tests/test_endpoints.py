"""Endpoints and non-streaming forwarding, black-box: the real proxy against the fake upstream."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import orjson
import pytest

from first_hop_proxy import __version__
from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body, free_port, raw_request, wait_until
from .fake_upstream import FakeUpstream, Hang, Json, Reset, completion

CHAT_PATHS = ["/chat/completions", "/v1/chat/completions", "//chat/completions"]
CHAT_PATHS += ["/v1//chat/completions"]
MODEL_PATHS = ["/models", "/v1/models", "//models", "/v1//models"]
NO_RETRY = {"error_handling": {"max_retries": 0}}


def assert_error_shape(body: object) -> dict[str, object]:
    assert isinstance(body, dict) and set(body) == {"error"}
    error = body["error"]
    assert isinstance(error, dict)
    assert {"message", "type", "code"} <= set(error)
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


# --- Paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CHAT_PATHS)
async def test_chat_paths_served_directly(
    proxy: RunningServer, upstream: FakeUpstream, path: str
) -> None:
    body = orjson.dumps(chat_body())
    resp = await raw_request(proxy.port, "POST", path, body, {"Content-Type": "application/json"})
    assert resp.status == 200, resp.body
    assert "location" not in resp.headers
    assert resp.json["choices"][0]["message"]["content"] == "Hello there!"
    assert [r.path for r in upstream.received] == ["/v1/chat/completions"]
    assert upstream.received[0].body == body


@pytest.mark.parametrize("path", CHAT_PATHS)
async def test_chat_paths_no_redirect_with_client(
    proxy: RunningServer, client: aiohttp.ClientSession, path: str
) -> None:
    async with client.post(proxy.url + path, json=chat_body(), allow_redirects=False) as resp:
        assert resp.status == 200
        assert not resp.history


@pytest.mark.parametrize("path", MODEL_PATHS)
async def test_models_paths(proxy: RunningServer, upstream: FakeUpstream, path: str) -> None:
    resp = await raw_request(proxy.port, "GET", path)
    assert resp.status == 200
    assert resp.headers["x-models-source"] == "upstream"
    assert resp.json["data"][0]["id"] == "fake-model"
    assert [r.path for r in upstream.received] == ["/v1/models"]


# --- Models ---------------------------------------------------------------------------------


async def test_models_upstream_then_cache(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"target_proxy": {"headers": {"Authorization": "Bearer sk-configured"}}}
    )
    async with client.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 200
        assert resp.headers["X-Models-Source"] == "upstream"
        first = await resp.json()
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-configured"

    upstream.models = Json(500, body={"error": {"message": "down"}})
    async with client.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 200
        assert resp.headers["X-Models-Source"] == "cache"
        assert await resp.json() == first

    upstream.models = Json(200, body=b"<html>not json</html>")
    async with client.get(proxy.url + "/models") as resp:
        assert resp.status == 200
        assert resp.headers["X-Models-Source"] == "cache"


async def test_models_default_when_never_fetched(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.models = Json(503, body={"error": {"message": "down"}})
    proxy = await start_proxy()
    async with client.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 200
        assert resp.headers["X-Models-Source"] == "default"
        body = await resp.json()
    assert body["object"] == "list"
    assert body["data"] and all(isinstance(m["id"], str) for m in body["data"])


async def test_models_default_when_unreachable(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/chat/completions"
    proxy = await start_proxy({"target_proxy": {"url": url}})
    async with client.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 200
        assert resp.headers["X-Models-Source"] == "default"


async def test_models_forward_client_key(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": "Bearer sk-client"}
    async with client.get(proxy.url + "/v1/models", headers=headers) as resp:
        assert resp.status == 200
    async with client.get(
        proxy.url + "/v1/models", headers={"Authorization": "Bearer undefined"}
    ) as resp:
        assert resp.status == 200
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-client"
    assert "Authorization" not in upstream.received[1].headers


# --- Health ---------------------------------------------------------------------------------


async def test_health_makes_no_upstream_call(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.default = Hang()
    proxy = await start_proxy()
    started = time.monotonic()
    async with client.get(proxy.url + "/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    assert time.monotonic() - started < 1
    assert upstream.received == []


async def test_health_detailed(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    url = f"http://user:hunter2@127.0.0.1:{upstream.port}/v1/chat/completions?key=sk-secret&x=1"
    proxy = await start_proxy({"target_proxy": {"url": url}, "error_handling": {"max_retries": 4}})
    async with client.get(proxy.url + "/health/detailed") as resp:
        assert resp.status == 200
        text = await resp.text()
        body = orjson.loads(text)
    assert body["version"] == __version__
    assert isinstance(body["uptime_seconds"], int | float) and body["uptime_seconds"] >= 0
    assert "hunter2" not in text and "sk-secret" not in text and "user:" not in text
    target = body["target_url"]
    assert f"127.0.0.1:{upstream.port}/v1/chat/completions" in target
    assert "key=***" in target
    assert body["retry"]["max_retries"] == 4
    assert body["retry"]["base_delay"] == 0.01
    assert 429 in body["retry"]["retry_codes"]
    assert body["circuit_breaker"]["state"] == "closed"
    assert body["circuit_breaker"]["failure_threshold"] == 5
    counters = body["counters"]
    assert counters["requests"] == 0 and counters["in_flight"] == 0
    assert counters["by_status"] == {}
    assert upstream.received == []


async def test_health_detailed_counters(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Json(), Json(400, body={"error": {"message": "bad"}}), Json(delay=0.5))
    proxy = await start_proxy(NO_RETRY)
    for _ in range(2):
        async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
            await resp.read()
    async with client.post(proxy.url + "/v1/chat/completions", data=b"nope") as resp:
        assert resp.status == 400
    slow = asyncio.create_task(client.post(proxy.url + "/v1/chat/completions", json=chat_body()))
    await wait_until(lambda: upstream.calls == 3, 1)
    async with client.get(proxy.url + "/health/detailed") as resp:
        counters = (await resp.json())["counters"]
    assert counters["requests"] == 4
    assert counters["in_flight"] == 1
    assert counters["by_status"] == {"200": 1, "400": 2}
    (await slow).release()
    async with client.get(proxy.url + "/health/detailed") as resp:
        counters = (await resp.json())["counters"]
    assert counters["in_flight"] == 0
    assert counters["by_status"] == {"200": 2, "400": 2}


# --- Errors, request ids ------------------------------------------------------------------


async def test_unknown_path_is_json_404(
    proxy: RunningServer, client: aiohttp.ClientSession
) -> None:
    for method, path in [("GET", "/nope"), ("POST", "/v1/completions"), ("GET", "/v2")]:
        async with client.request(method, proxy.url + path) as resp:
            assert resp.status == 404
            assert resp.content_type == "application/json"
            error = assert_error_shape(await resp.json())
            assert path in str(error["message"])
            assert error["code"] == "not_found"
            assert resp.headers["X-Request-ID"]


async def test_wrong_method_is_json_405(
    proxy: RunningServer, client: aiohttp.ClientSession
) -> None:
    for method, path in [("GET", "/v1/chat/completions"), ("POST", "/health")]:
        async with client.request(method, proxy.url + path) as resp:
            assert resp.status == 405
            assert resp.content_type == "application/json"
            error = assert_error_shape(await resp.json())
            assert method in str(error["message"])
            assert resp.headers["Allow"]
            assert resp.headers["X-Request-ID"]


async def test_request_id_on_every_response(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Json(), Json(400, body={"error": {"message": "bad"}}))
    proxy = await start_proxy(NO_RETRY)
    ids = []
    requests = [
        ("POST", "/v1/chat/completions", orjson.dumps(chat_body())),
        ("POST", "/v1/chat/completions", orjson.dumps(chat_body())),
        ("POST", "/v1/chat/completions", orjson.dumps(chat_body(stream=True))),
        ("POST", "/v1/chat/completions", b"not json"),
        ("GET", "/v1/models", b""),
        ("GET", "/health", b""),
        ("GET", "/health/detailed", b""),
        ("GET", "/missing", b""),
        ("DELETE", "/v1/chat/completions", b""),
    ]
    for method, path, data in requests:
        async with client.request(method, proxy.url + path, data=data) as resp:
            await resp.read()
            ids.append(resp.headers.get("X-Request-ID"))
    assert all(ids), ids
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch("[0-9a-f]{12}", i) for i in ids), ids  # safe in a log file name


async def test_upstream_request_id_not_leaked(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Json(headers={"X-Request-ID": "upstream-id"}))
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.headers["X-Request-ID"] != "upstream-id"
        assert len(resp.headers.getall("X-Request-ID")) == 1


# --- Bad requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"{not json", "invalid_json", "not valid JSON"),
        (b"", "invalid_json", "not valid JSON"),
        (b"[1, 2]", "invalid_body", "not an object"),
        (b'"text"', "invalid_body", "not an object"),
        (b'{"model": "m"}', "missing_messages", "'messages'"),
        (b'{"messages": "hi"}', "invalid_messages", "must be a list"),
        (b'{"messages": {"role": "user"}}', "invalid_messages", "must be a list"),
    ],
)
async def test_bad_request(
    proxy: RunningServer,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    body: bytes,
    code: str,
    words: str,
) -> None:
    headers = {"Content-Type": "application/json"}
    async with client.post(proxy.url + "/v1/chat/completions", data=body, headers=headers) as r:
        assert r.status == 400
        assert r.content_type == "application/json"
        error = assert_error_shape(await r.json())
    assert error["code"] == code
    assert words in str(error["message"])
    assert upstream.received == []


async def test_body_too_large(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"server": {"max_body_mb": 0.001}})
    big = chat_body(text="x" * 5000)
    async with client.post(proxy.url + "/v1/chat/completions", json=big) as resp:
        assert resp.status == 413
        assert resp.content_type == "application/json"
        error = assert_error_shape(await resp.json())
        assert "max_body_mb" in str(error["message"])
        assert resp.headers["X-Request-ID"]
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
    assert upstream.calls == 1


# --- Forwarding -------------------------------------------------------------------------


async def test_body_forwarded_byte_for_byte(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    body = (
        b'{"zeta":1,"messages":[{"role":"user","content":"caf\\u00e9 \\ud83d\\ude00 \\"q\\""}],'
        b'"model":"m","temperature":0.70,"top_p":1.0e2,"max_tokens":100,'
        b'"custom_field":{"nested":[1, 2 ,3]},"logit_bias":{},"stream":false,'
        b'"repetition_penalty":1.10}'
    )
    headers = {"Content-Type": "application/json"}
    async with client.post(proxy.url + "/v1/chat/completions", data=body, headers=headers) as r:
        assert r.status == 200
    assert upstream.received[0].body == body


async def test_large_body_with_image_forwarded(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    image = "data:image/png;base64," + "A" * 3_000_000
    content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": image}]
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": content}]})
    async with client.post(proxy.url + "/v1/chat/completions", data=body) as resp:
        assert resp.status == 200
    assert upstream.received[0].body == body


async def test_headers_forwarded(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    proxy = await start_proxy(
        {"target_proxy": {"headers": {"X-Configured": "cfg", "User-Agent": "configured-ua"}}}
    )
    body = orjson.dumps(chat_body())
    resp = await raw_request(
        proxy.port,
        "POST",
        "/v1/chat/completions",
        body,
        {
            "Content-Type": "application/json",
            "Authorization": "Bearer sk-client",
            "User-Agent": "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
            "Accept": "*/*",
            "X-Custom": "kept",
            "x-configured": "client-value",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "X-Hop": "named in Connection",
            "Connection": "close, X-Hop",
        },
    )
    assert resp.status == 200
    got = {k.lower(): v for k, v in upstream.received[0].headers.items()}
    assert got["authorization"] == "Bearer sk-client"
    assert got["x-custom"] == "kept"
    assert got["content-type"] == "application/json"
    assert got["x-configured"] == "cfg"
    assert got["user-agent"] == "configured-ua"
    for hop in ("keep-alive", "te", "upgrade", "proxy-authorization", "x-hop"):
        assert hop not in got, hop
    assert got.get("connection", "keep-alive").lower() != "close, x-hop"
    assert got["host"] == f"127.0.0.1:{upstream.port}"
    assert got["content-length"] == str(len(body))


@pytest.mark.parametrize("auth", ["Bearer undefined", "Bearer null", "Bearer", "Bearer "])
async def test_empty_bearer_counts_as_absent(
    start_proxy: StartProxy, upstream: FakeUpstream, auth: str
) -> None:
    proxy = await start_proxy()
    headers = {"Content-Type": "application/json", "Authorization": auth}
    body = orjson.dumps(chat_body())
    resp = await raw_request(proxy.port, "POST", "/v1/chat/completions", body, headers)
    assert resp.status == 200
    assert "authorization" not in {k.lower() for k in upstream.received[0].headers}


@pytest.mark.parametrize("auth", ["Bearer undefined", "Bearer null", "Bearer", "Bearer sk-x"])
async def test_configured_key_wins(
    start_proxy: StartProxy, upstream: FakeUpstream, auth: str
) -> None:
    proxy = await start_proxy({"target_proxy": {"headers": {"authorization": "Bearer sk-cfg"}}})
    headers = {"Content-Type": "application/json", "Authorization": auth}
    body = orjson.dumps(chat_body())
    resp = await raw_request(proxy.port, "POST", "/v1/chat/completions", body, headers)
    assert resp.status == 200
    got = [v for k, v in upstream.received[0].headers.items() if k.lower() == "authorization"]
    assert got == ["Bearer sk-cfg"]


async def test_env_api_key_reaches_upstream(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"target_proxy": {"headers": {"Authorization": "Bearer from-file"}}},
        env={"FHP_TARGET_API_KEY": "sk-from-env"},
    )
    headers = {"Authorization": "Bearer sk-client"}
    async with client.post(
        proxy.url + "/v1/chat/completions", json=chat_body(), headers=headers
    ) as resp:
        assert resp.status == 200
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-from-env"


async def test_unset_configured_key_keeps_client_key(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"target_proxy": {"headers": {"Authorization": "Bearer ${FHP_TEST_UNSET_KEY:-}"}}}
    )
    headers = {"Authorization": "Bearer sk-client"}
    async with client.post(
        proxy.url + "/v1/chat/completions", json=chat_body(), headers=headers
    ) as resp:
        assert resp.status == 200
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-client"


async def test_json_reply_passes_through(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    reply = completion("Exact reply", extra_field={"kept": True})
    upstream.queue(Json(body=reply, headers={"X-Upstream-Header": "yes"}))
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert resp.headers["X-Upstream-Header"] == "yes"
        assert await resp.json() == reply


async def test_fail_code_passes_through(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Json(400, body={"error": {"message": "context too long", "type": "x"}}))
    proxy = await start_proxy(NO_RETRY)
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert "context too long" in str(body["error"]["message"])
    assert upstream.calls == 1


async def test_unreachable_upstream_502(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    proxy = await start_proxy(
        {"target_proxy": {"url": f"http://127.0.0.1:{port}/v1/chat/completions"}, **NO_RETRY}
    )
    for stream in (False, True):
        async with client.post(
            proxy.url + "/v1/chat/completions", json=chat_body(stream=stream)
        ) as resp:
            assert resp.status == 502
            error = assert_error_shape(await resp.json())
        message = str(error["message"])
        assert f"127.0.0.1:{port}" in message
        assert "could not connect" in message.lower()
        assert error["type"] == "connection_error"


async def test_unreachable_upstream_names_cause(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    proxy = await start_proxy(
        {"target_proxy": {"url": f"http://127.0.0.1:{port}/v1/chat/completions"}, **NO_RETRY}
    )
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 502
        error = assert_error_shape(await resp.json())
    assert "connection refused" in str(error["message"]).lower()


async def test_dns_failure_502(start_proxy: StartProxy, client: aiohttp.ClientSession) -> None:
    url = "http://nonexistent.invalid:9/v1/chat/completions"
    proxy = await start_proxy({"target_proxy": {"url": url}, **NO_RETRY})
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 502
        error = assert_error_shape(await resp.json())
    assert "nonexistent.invalid" in str(error["message"])
    assert "resolve" in str(error["message"])
    assert error["type"] == "connection_error"


@pytest.mark.parametrize("stream", [False, True])
async def test_hang_504(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, stream: bool
) -> None:
    upstream.default = Hang()
    proxy = await start_proxy({"target_proxy": {"timeout": 0.3}, **NO_RETRY})
    started = time.monotonic()
    async with client.post(
        proxy.url + "/v1/chat/completions", json=chat_body(stream=stream)
    ) as resp:
        assert resp.status == 504
        error = assert_error_shape(await resp.json())
    assert time.monotonic() - started < 2
    message = str(error["message"])
    assert "0.3 s" in message and "target_proxy.timeout" in message
    assert error["type"] == "timeout"


async def test_client_leaves_while_upstream_hangs(
    proxy: RunningServer, upstream: FakeUpstream
) -> None:
    upstream.default = Hang()
    body = orjson.dumps(chat_body())
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    request = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    writer.write(request)
    await writer.drain()
    await wait_until(lambda: upstream.calls, 2)
    assert upstream.calls == 1
    writer.close()
    left = time.monotonic()
    await wait_until(lambda: upstream.disconnects, 1)
    assert upstream.disconnects, "the upstream request was not aborted"
    assert upstream.disconnects[0] - left < 1


async def test_fail_code_on_stream_passes_through(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Json(400, body={"error": {"message": "bad model name", "type": "x"}}))
    proxy = await start_proxy(NO_RETRY)
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body(stream=True)) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/json"
        error = assert_error_shape(await resp.json())
    assert "bad model name" in str(error["message"])


async def test_upstream_reset_502(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.default = Reset()
    proxy = await start_proxy(NO_RETRY)
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 502
        error = assert_error_shape(await resp.json())
    assert f"127.0.0.1:{upstream.port}" in str(error["message"])
    assert error["type"] == "connection_error"
