"""No key ever leaks: not into log files, console lines, client error bodies or /health/detailed.

One proxy is configured with an upstream key in its Authorization header and in
the target URL's query; the client sends a different key of its own. After a
success, retries, a stream, a hard stop, a 401 whose body echoes the key back,
a connection failure and a timeout, no output anywhere holds either key or any
12-character piece of one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from .conftest import StartProxy, chat_body, free_port
from .fake_upstream import FakeUpstream, Hang, Json, Sse, chunk
from .keys import random_key
from .leak_helpers import Outputs
from .log_helpers import error_logs, request_logs, settle
from .test_redact import SHAPE_EXAMPLES


@pytest.mark.timeout(60)
async def test_no_key_or_piece_of_one_leaks_anywhere(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    key = random_key("sk-test-")
    client_key = random_key("cl-", 45)  # not key-shaped: only known-secret masking catches it
    hard_stop = {"pattern": "content_policy", "user_message": "Blocked by policy."}
    settings: dict[str, Any] = {
        "target_proxy": {
            "url": f"{upstream.chat_url}?key={key}",
            "headers": {"Authorization": f"Bearer {key}"},
        },
        "server": {"debug": True},
        "error_handling": {"hard_stop_conditions": {"rules": [hard_stop]}},
        "circuit_breaker": {"enabled": False},
        "error_logging": {"max_files": 1000},
    }
    proxy = await start_proxy(settings)
    out = Outputs()
    client_headers = {"Authorization": f"Bearer {client_key}", "X-Api-Key": client_key}

    async def chat(body: Any, stream: bool = False) -> int:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                proxy.url + "/v1/chat/completions",
                data=data,
                headers={"Content-Type": "application/json", **client_headers},
            ) as resp,
        ):
            payload = await resp.read()
            if resp.status >= 400 or b'"error"' in payload:
                out.add(f"client error body {resp.status}", payload)
            return resp.status

    # the upstream also sees the client's X-Api-Key, and may echo it too
    said = f"Incorrect API key provided: {key} (X-Api-Key {client_key})."
    echo = {"error": {"message": said, "type": "auth"}}
    # a success, with the client's key pasted into the prompt
    assert await chat(chat_body(text=f"my key is {client_key}")) == 200
    # retries whose error bodies echo the key, then success
    upstream.queue(Json(503, echo), Json(503, echo, headers={"X-Key": key}), Json(200))
    assert await chat(chat_body()) == 200
    # a stream whose text carries the key, split across events
    events = [chunk(role=True, text=""), chunk(key[:20]), chunk(key[20:]), chunk(finish="stop")]
    upstream.queue(Sse(events))
    assert await chat(chat_body(stream=True), stream=True) == 200
    # a stream that fails after content with an error event quoting the key
    events = [chunk(role=True, text=""), chunk("Hi"), {"error": {"message": said}}]
    upstream.queue(Sse(events))
    assert await chat(chat_body(stream=True), stream=True) == 200
    # a hard stop: the original response (with the key) is preserved for the client
    upstream.queue(Json(400, {"error": {"message": f"content_policy hit for {key}"}}))
    assert await chat(chat_body()) == 400
    # a 401 whose body echoes the key back
    upstream.queue(Json(401, echo))
    assert await chat(chat_body()) == 401
    # same in a stream request
    upstream.queue(Json(401, echo))
    assert await chat(chat_body(stream=True), stream=True) == 401
    # a request body that is not JSON, with the key in it
    assert await chat(f'{{"messages": "{client_key}'.encode()) == 400
    assert upstream.calls == 9

    # a connection failure and a timeout, with the key in the URL of a dead upstream
    dead = await start_proxy(
        {
            **settings,
            "target_proxy": {
                **settings["target_proxy"],
                "url": f"http://127.0.0.1:{free_port()}/v1/chat/completions?key={key}",
            },
            "error_handling": {"max_retries": 1},
        }
    )
    slow = await start_proxy(
        {
            **settings,
            "target_proxy": {**settings["target_proxy"], "timeout": 0.2},
            "error_handling": {"max_retries": 1},
        }
    )
    upstream.queue(Hang(3), Hang(3))
    for other, expected in ((dead, 502), (slow, 504)):
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                other.url + "/v1/chat/completions",
                data=orjson.dumps(chat_body()),
                headers=client_headers,
            ) as resp,
        ):
            out.add(f"client error body {resp.status}", await resp.read())
            assert resp.status == expected

    await out.gather([proxy, dead, slow], tmp_path, caplog, capsys)
    assert len(request_logs(tmp_path / "logs")) == 8 + 2
    errors = error_logs(tmp_path / "logs" / "errors")
    codes = {p.name.split("_20")[0] for p in errors}
    assert {"503", "hard_stop", "401", "bad_request", "connection_error", "timeout"} <= codes

    # the outputs are not empty: the keys were masked, not the logs lost
    assert any("sk-…" in text for text in out.texts.values())
    assert any("Incorrect API key provided" in t for w, t in out.texts.items() if "file" in w)
    assert any(w.startswith("client error body 401") for w in out.texts)
    assert out.leaks({"upstream key": key, "client key": client_key}) == {}


async def test_no_key_placeholder_is_not_masked(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """SillyTavern with no stored key sends ``Bearer undefined``: the word stays readable in
    the person's prompt, in the request log and in the upstream's error text."""
    proxy = await start_proxy()
    upstream.default = Json(400, {"error": {"message": "TypeError: x is undefined"}})
    prompt = "Why is my variable undefined?"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url + "/v1/chat/completions",
            json=chat_body(text=prompt),
            headers={"Authorization": "Bearer undefined"},
        ) as resp,
    ):
        error = (await resp.json())["error"]
    assert "TypeError: x is undefined" in error["message"]
    await settle(proxy)
    (log,) = request_logs(tmp_path / "logs").values()
    text = log.read_text()
    assert prompt in text
    assert "x is undefined" in text
    assert "***" not in text
    assert "Authorization" not in upstream.received[-1].headers


@pytest.mark.timeout(60)
async def test_every_key_shape_is_masked_end_to_end(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Keys of every common shape, pasted into a message and quoted back by the upstream
    in a retried error and a final one, reach no log, console line, error body or view."""
    caplog.set_level(logging.DEBUG)
    keys = [make() for makers in SHAPE_EXAMPLES.values() for make in makers]
    quoted = "Invalid keys: " + ", ".join(keys)
    proxy = await start_proxy({"server": {"debug": True}})
    out = Outputs()
    upstream.queue(Json(503, {"error": {"message": quoted}}), Json(401, {"error": quoted}))
    async with aiohttp.ClientSession() as session:
        body = chat_body(text="my keys: " + " ".join(keys))
        async with session.post(proxy.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 401
            out.add("client error body", await resp.read())
        await settle(proxy)
        for path in ("/logs/errors", "/logs/requests"):
            async with session.get(proxy.url + path) as resp:
                out.add(path, await resp.read())
        async with session.get(proxy.url + "/logs/requests") as resp:
            (entry,) = (await resp.json())["requests"]
        async with session.get(f"{proxy.url}/logs/requests/{entry['id']}") as resp:
            out.add("GET /logs/requests/{id}", await resp.read())
    for path in (tmp_path / "logs").rglob("*.log"):
        out.add(f"file {path.relative_to(tmp_path)}", path.read_bytes())
    out.add("console", caplog.text)
    assert len(error_logs(tmp_path / "logs" / "errors")) >= 2
    assert "Invalid keys: " in out.texts["GET /logs/requests/{id}"]
    assert out.leaks({secret[:8]: secret for secret in keys}) == {}
