"""Rewrite rules through the real proxy: what the upstream receives, what the client gets."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import aiohttp
import orjson

from first_hop_proxy.server import RunningServer

from .conftest import LEGACY_CONFIG, StartProxy, chat_body
from .fake_upstream import FakeUpstream, Json, Sse, chunk, completion

CHAT = "/v1/chat/completions"


def rules(*triples: tuple[str, str, Any]) -> list[dict[str, Any]]:
    return [{"pattern": p, "replacement": r, "apply_to": a} for p, r, a in triples]


async def post(client: aiohttp.ClientSession, proxy: RunningServer, body: Any) -> Any:
    async with client.post(proxy.url + CHAT, data=orjson.dumps(body)) as resp:
        assert resp.status == 200
        if body.get("stream"):
            return await resp.text()
        return await resp.json()


def stream_text(sse: str) -> str:
    text = []
    for block in sse.split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            for choice in orjson.loads(block[6:]).get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


async def test_outgoing_rules_apply_per_role_in_order(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {
            "regex_replacement": {
                "rules": rules(
                    ("cat", "dog", "user"),
                    ("dog", "wolf", ["user", "system"]),
                    (r"(\w+)@(\w+)", r"\2 at \1", "all"),
                )
            }
        }
    )
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,catcat="}}
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "dog a@b"},
            {"role": "user", "content": [{"type": "text", "text": "cat"}, image]},
            {"role": "assistant", "content": "cat"},
        ],
    }
    await post(client, proxy, body)
    sent = upstream.received[-1].json["messages"]
    assert sent[0]["content"] == "wolf b at a"
    assert sent[1]["content"] == [{"type": "text", "text": "wolf"}, image]
    assert sent[2]["content"] == "cat"


async def test_body_is_forwarded_byte_for_byte_when_no_rule_matches(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"regex_replacement": {"rules": rules(("zebra", "x", "all"))}})
    raw = b'{"messages":[{"role":"user","content":"caf\\u00e9"}], "temperature":0.70,"n":1e0}'
    async with client.post(proxy.url + CHAT, data=raw) as resp:
        assert resp.status == 200
    assert upstream.received[-1].body == raw


async def test_non_streaming_reply_rules(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"response_processing": {"rules": [{"pattern": r"\\u2014", "replacement": "—"}]}}
    )
    upstream.queue(Json(body=completion("a \\u2014 b")))
    reply = await post(client, proxy, chat_body())
    assert reply["choices"][0]["message"]["content"] == "a — b"


async def test_stream_rule_replaces_a_match_split_across_events(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    settings = {"response_processing": {"rules": [{"pattern": "overload", "replacement": "OK"}]}}
    proxy = await start_proxy(settings)
    full = "no overload here, overload there"
    for pieces in (["no over", "load here, overl", "oad there"], [*full[:10], full[10:]]):
        upstream.queue(
            Sse([chunk(role=True, text=""), *(chunk(p) for p in pieces), chunk(finish="stop")])
        )
        sse = await post(client, proxy, chat_body(stream=True))
        assert stream_text(sse) == "no OK here, OK there"
        assert sse.endswith("data: [DONE]\n\n")
    upstream.queue(Json(body=completion(full)))
    reply = await post(client, proxy, chat_body())
    assert reply["choices"][0]["message"]["content"] == "no OK here, OK there"


async def test_runaway_rule_is_cut_off_and_the_proxy_keeps_answering(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"regex_replacement": {"timeout_ms": 200, "rules": rules(("(a|aa)+$", "x", "user"))}}
    )
    slow = asyncio.create_task(post(client, proxy, chat_body(text="a" * 40 + "b")))
    await asyncio.sleep(0.02)
    began = time.monotonic()
    async with client.get(proxy.url + "/health") as resp:
        assert resp.status == 200
    assert time.monotonic() - began < 0.15
    await slow
    assert upstream.received[-1].json["messages"][0]["content"] == "a" * 40 + "b"


def test_rewrite_command_reports_counts() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "first_hop_proxy", "rewrite", "--config", str(LEGACY_CONFIG), "a-b"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Escape hyphen as" in out
    assert "1 replacement" in out
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "first_hop_proxy",
            "rewrite",
            "--config",
            str(LEGACY_CONFIG),
            "--response",
            "it\\u2019s",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "it's" in out
