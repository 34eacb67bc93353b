"""Several upstreams: failover, breakers per upstream, round robin, models, over real sockets.

Three fake upstreams play the parts: one down (a closed port), one rate-limited or
failing on command, one good; one may serve only some models.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy.config import ConfigError, parse_config
from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body, free_port
from .fake_upstream import FakeUpstream, Json, Reset, Sse, chunk, completion, text_chunks
from .log_helpers import error_logs, request_logs, settle, state_of

CHAT = "/v1/chat/completions"


@pytest.fixture
async def second() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream().start()
    yield fake
    await fake.close()


@pytest.fixture
async def third() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream().start()
    yield fake
    await fake.close()


def entry(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, **extra}


def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1/chat/completions"


async def several(
    start_proxy: StartProxy, entries: list[dict[str, Any]], **settings: Any
) -> RunningServer:
    base: dict[str, Any] = {"target_proxy": {"url": ""}, "upstreams": entries}
    return await start_proxy({**base, **settings})


async def post(
    proxy: RunningServer, stream: bool = False, model: str = "fake-model"
) -> tuple[int, Any]:
    body = chat_body(stream=stream, model=model)
    async with aiohttp.ClientSession() as session, session.post(proxy.url + CHAT, json=body) as r:
        raw = await r.read()
        return r.status, (orjson.loads(raw) if r.content_type == "application/json" else raw)


def text_of(raw: bytes) -> str:
    out = ""
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: {"):
            for choice in orjson.loads(event[6:]).get("choices", []):
                out += choice.get("delta", {}).get("content") or ""
    return out


# -- the config ---------------------------------------------------------------------------


def parse(data: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    return parse_config(data, base_dir=Path("/srv"), env=env or {})


def test_target_proxy_alone_is_a_list_of_one() -> None:
    config = parse({"target_proxy": {"url": "https://a.example/v1/chat/completions"}}).config
    (only,) = config.upstreams
    assert (only.name, only.url, only.timeout, only.connect_timeout) == (
        "default",
        "https://a.example/v1/chat/completions",
        30,
        10,
    )


def test_entries_take_their_missing_timeouts_from_target_proxy() -> None:
    config = parse(
        {
            "target_proxy": {"timeout": 90, "connect_timeout": 5},
            "upstreams": [entry("a", "https://a/x", timeout=20), entry("b", "https://b/x")],
        }
    ).config
    assert [(u.timeout, u.connect_timeout) for u in config.upstreams] == [(20, 5), (90, 5)]


def test_both_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"target_proxy": {"url": "https://a/x"}, "upstreams": [entry("b", "https://b")]})
    (problem,) = caught.value.problems
    assert problem.startswith("target_proxy.url: both target_proxy.url and upstreams are set")


def test_env_overrides_apply_to_the_first_upstream() -> None:
    env = {"FHP_TARGET_URL": "https://over.example/x", "FHP_TARGET_API_KEY": "k-123456789"}
    config = parse(
        {"upstreams": [entry("a", "https://a/x"), entry("b", "https://b/x")]}, env
    ).config
    assert config.upstreams[0].url == "https://over.example/x"
    assert config.upstreams[0].headers == {"Authorization": "Bearer k-123456789"}
    assert config.upstreams[1].url == "https://b/x" and config.upstreams[1].headers == {}


def test_warnings_about_names_and_models() -> None:
    warnings = parse(
        {
            "upstreams": [
                entry("a", "https://a/x", models=["claude-*", "gpt-4o"]),
                entry("a", "https://b/x", models=["gemini-*"], model_map={"opus": "claude-opus"}),
            ]
        }
    ).warnings
    assert any(
        w.startswith("upstreams[1].name: 'a' is also the name of upstreams[0]") for w in warnings
    )
    assert any(w.startswith("upstreams[1].model_map: 'opus' is mapped but not") for w in warnings)
    assert "upstreams: no upstream serves the model 'opus'" in warnings
    assert not any("'gpt-4o'" in w for w in warnings)


def test_bad_entries_name_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(
            {
                "upstreams": [{"url": "https://a/x"}, entry("b c", "https://b")],
                "routing": {"strategy": "random", "failover_on": ["weather"]},
            }
        )
    problems = "\n".join(caught.value.problems)
    assert "upstreams[0].name: required key is missing" in problems
    assert "upstreams[1].name:" in problems
    assert "routing.strategy:" in problems and "routing.failover_on[0]:" in problems


# -- failover ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_down_upstream_fails_over_to_the_next(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path, stream: bool
) -> None:
    proxy = await several(
        start_proxy, [entry("down", down_url()), entry("good", upstream.chat_url)]
    )
    upstream.default = (
        Sse(text_chunks("from", " good")) if stream else Json(200, completion("good"))
    )
    status, body = await post(proxy, stream)
    assert status == 200
    assert (text_of(body) if stream else body["choices"][0]["message"]["content"]) in (
        "from good",
        "good",
    )
    assert upstream.calls == 1
    await settle(proxy)
    (log,) = request_logs(tmp_path / "logs").values()
    text = log.read_text()
    assert "Upstream: down" in text and "Upstream: good" in text
    (error,) = error_logs(tmp_path / "logs" / "errors", "connection_error")
    assert '"upstream": "down"' in error.read_text()


async def test_rate_limited_moves_on_after_retries_per_upstream(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    proxy = await several(
        start_proxy,
        [entry("limited", upstream.chat_url), entry("spare", second.chat_url)],
        routing={"retries_per_upstream": 2},
    )
    upstream.default = Json(429, {"error": {"message": "slow down"}})
    second.default = Json(200, completion("from spare"))
    status, body = await post(proxy)
    assert status == 200 and body["choices"][0]["message"]["content"] == "from spare"
    assert (upstream.calls, second.calls) == (2, 1)


async def test_streams_fail_over_only_before_their_first_content(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    proxy = await several(start_proxy, [entry("a", upstream.chat_url), entry("b", second.chat_url)])
    upstream.default = Sse([chunk("Once", role=True), chunk(" upon")], end="reset")
    status, raw = await post(proxy, stream=True)
    assert status == 200
    assert text_of(raw) == "Once upon"
    assert b'"stream_interrupted"' in raw
    assert second.calls == 0


async def test_fail_codes_and_hard_stops_do_not_fail_over_by_default(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    upstream.default = Json(401, {"error": {"message": "bad key"}})
    second.default = Json(200, completion("b"))
    proxy = await several(start_proxy, [entry("a", upstream.chat_url), entry("b", second.chat_url)])
    status, body = await post(proxy)
    assert status == 401 and second.calls == 0
    assert "Upstreams tried: a (401 Unauthorized: bad key)" in body["error"]["message"]


async def test_failover_on_lists_what_else_moves_on(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    upstream.default = Json(401, {"error": {"message": "bad key"}})
    second.default = Json(200, completion("b"))
    proxy = await several(
        start_proxy,
        [entry("a", upstream.chat_url), entry("b", second.chat_url)],
        routing={"failover_on": ["fail_code"]},
    )
    status, body = await post(proxy)
    assert status == 200 and body["choices"][0]["message"]["content"] == "b"
    assert (upstream.calls, second.calls) == (1, 1)


async def test_a_round_of_fail_codes_does_not_repeat(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    upstream.default = second.default = Json(403, {"error": {"message": "forbidden"}})
    proxy = await several(
        start_proxy,
        [entry("a", upstream.chat_url), entry("b", second.chat_url)],
        routing={"failover_on": ["fail_code"]},
    )
    status, _ = await post(proxy)
    assert status == 403
    assert (upstream.calls, second.calls) == (1, 1)


async def test_rotation_starts_again_after_every_upstream_was_tried(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    upstream.queue(Json(503), Json(200, completion("a, second round")))
    second.default = Json(503)
    proxy = await several(
        start_proxy,
        [entry("a", upstream.chat_url), entry("b", second.chat_url)],
        error_handling={"base_delay": 0.2, "max_delay": 0.2},
    )
    status, body = await post(proxy)
    assert status == 200 and body["choices"][0]["message"]["content"] == "a, second round"
    assert (upstream.calls, second.calls) == (2, 1)
    # a -> b at once; b -> a (a new round) after the backoff delay
    b_at = second.received[0].at
    assert b_at - upstream.received[0].at < 0.15
    assert upstream.received[1].at - b_at >= 0.14


async def test_every_upstream_failing_names_each_one(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    upstream.default = Json(503, {"error": {"message": "overloaded"}})
    proxy = await several(
        start_proxy,
        [entry("community", upstream.chat_url), entry("backup", down_url())],
        error_handling={"max_retries": 3},
    )
    status, body = await post(proxy)
    assert status == 502
    message = body["error"]["message"]
    assert "Upstreams tried: community (503 Service Unavailable: overloaded); backup (" in message
    assert "connect" in message.split("backup (")[1]


async def test_each_upstream_has_its_own_breaker(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    upstream.default = Json(503)
    second.default = Json(200, completion("b"))
    proxy = await several(
        start_proxy,
        [entry("a", upstream.chat_url), entry("b", second.chat_url)],
        circuit_breaker={"failure_threshold": 2, "recovery_timeout": 30},
    )
    for _ in range(2):
        assert (await post(proxy))[0] == 200
    assert upstream.calls == 2
    # a's breaker is open: the next request goes straight to b, no attempt at a
    assert (await post(proxy))[0] == 200
    assert (upstream.calls, second.calls) == (2, 3)
    a, b = state_of(proxy).upstreams
    assert (a.breaker.state, b.breaker.state) == ("open", "closed")
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/health/detailed") as r:
        health = await r.json()
    listed = {u["name"]: u for u in health["upstreams"]}
    assert listed["a"]["circuit_breaker"]["state"] == "open"
    assert listed["a"]["last_error"].startswith("503 Service Unavailable")
    assert listed["a"]["last_5_minutes"]["success_rate"] == 0.0
    assert listed["b"]["last_5_minutes"]["success_rate"] == 1.0
    assert listed["b"]["last_5_minutes"]["p50_ms"] > 0
    assert health["status"] == "degraded" and "a: " in health["reason"]


async def test_round_robin_takes_turns_among_healthy_upstreams(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    proxy = await several(
        start_proxy,
        [entry("a", upstream.chat_url), entry("b", second.chat_url)],
        routing={"strategy": "round_robin"},
    )
    for _ in range(4):
        assert (await post(proxy))[0] == 200
    assert (upstream.calls, second.calls) == (2, 2)
    calls = sorted(
        [(r.at, "a") for r in upstream.received] + [(r.at, "b") for r in second.received]
    )
    assert [name for _, name in calls] == ["a", "b", "a", "b"]


# -- models --------------------------------------------------------------------------------


async def test_only_upstreams_serving_the_model_are_tried(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    proxy = await several(
        start_proxy,
        [
            entry("claude", upstream.chat_url, models=["claude-*"]),
            entry("openai", second.chat_url, models=["gpt-*"]),
        ],
    )
    assert (await post(proxy, model="gpt-4o"))[0] == 200
    assert (await post(proxy, model="claude-3-haiku"))[0] == 200
    assert (upstream.calls, second.calls) == (1, 1)
    status, body = await post(proxy, model="gemini-pro")
    assert status == 404
    assert body["error"]["code"] == "model_not_served"
    assert "claude: claude-*" in body["error"]["message"]


async def test_model_map_sends_the_upstreams_own_name(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await several(
        start_proxy,
        [entry("a", upstream.chat_url, model_map={"opus": "claude-3-opus-20240229"})],
    )
    assert (await post(proxy, model="opus"))[0] == 200
    assert upstream.received[-1].json["model"] == "claude-3-opus-20240229"
    assert (await post(proxy, model="other"))[0] == 200
    assert upstream.received[-1].json["model"] == "other"


@pytest.mark.parametrize("stream", [False, True])
async def test_the_next_upstream_gets_its_own_model_name_and_the_whole_chat(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream, stream: bool
) -> None:
    # The first upstream's body is made from the parsed chat, which is then let go;
    # the second's model name needs the chat parsed again from the bytes.
    proxy = await several(
        start_proxy,
        [
            entry("a", upstream.chat_url),
            entry("b", second.chat_url, model_map={"opus": "claude-3-opus-20240229"}),
        ],
    )
    upstream.default = Json(503, {"error": {"message": "down"}})
    second.default = Sse(text_chunks("from", " b")) if stream else Json(200, completion("b"))
    assert (await post(proxy, stream, model="opus"))[0] == 200
    first, then = upstream.received[-1].json, second.received[-1].json
    assert first["model"] == "opus" and then["model"] == "claude-3-opus-20240229"
    assert then["messages"] == first["messages"] and then["messages"]
    assert {k: v for k, v in then.items() if k != "model"} == {
        k: v for k, v in first.items() if k != "model"
    }


async def test_a_404_for_the_model_moves_on(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    upstream.default = Json(404, {"error": {"message": "model not found"}})
    proxy = await several(start_proxy, [entry("a", upstream.chat_url), entry("b", second.chat_url)])
    assert (await post(proxy))[0] == 200
    assert (upstream.calls, second.calls) == (1, 1)


def model_list(*ids: str) -> Json:
    return Json(body={"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})


async def test_models_are_merged_from_the_healthy_upstreams(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream, third: FakeUpstream
) -> None:
    upstream.models = model_list("claude-3-opus-20240229", "claude-3-haiku", "gpt-4o")
    second.models = model_list("gpt-4o", "gpt-4o-mini")
    third.models = model_list("never-listed")
    proxy = await several(
        start_proxy,
        [
            entry(
                "a",
                upstream.chat_url,
                models=["claude-*", "opus"],
                model_map={"opus": "claude-3-opus-20240229"},
            ),
            entry("b", second.chat_url, models=["gpt-*"]),
            entry("c", third.chat_url, models=["never-*"]),
        ],
        circuit_breaker={"failure_threshold": 1, "recovery_timeout": 30},
    )
    third.default = Json(503)
    await post(proxy, model="never-listed")  # opens c's breaker: c is left out of the list
    assert third.calls >= 1
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/v1/models") as r:
        assert r.status == 200
        ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == ["opus", "claude-3-haiku", "gpt-4o", "gpt-4o-mini"]


async def test_a_failing_list_falls_back_to_its_cache(
    start_proxy: StartProxy, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    upstream.models = model_list("a-1")
    second.models = model_list("b-1")
    proxy = await several(start_proxy, [entry("a", upstream.chat_url), entry("b", second.chat_url)])
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/v1/models") as r:
            assert r.headers["X-Models-Source"] == "upstream"
        second.models = Reset()
        async with session.get(proxy.url + "/v1/models") as r:
            assert r.headers["X-Models-Source"] == "cache"
            assert [m["id"] for m in (await r.json())["data"]] == ["a-1", "b-1"]


async def test_one_upstream_costs_nothing_new(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """A single target_proxy behaves as before: no upstream names in errors or logs."""
    proxy = await start_proxy()
    upstream.default = Json(503, {"error": {"message": "busy"}})
    status, body = await post(proxy)
    assert status == 503
    assert "Upstreams tried" not in body["error"]["message"]
    assert "Upstream said: busy" in body["error"]["message"]
