"""The upstream's limits: retry delays and quotas as upstreams say them, key pools,
and JSON replies slower than a CDN allows, assembled from a stream.

Pure parts first (quotas, keys, assemble, the decision core), then the real proxy
against fake upstreams that answer by the key presented, speak Google's 429s and
imitate a CDN's 524.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy.assemble import Assembler
from first_hop_proxy.config import ConfigError, parse_config
from first_hop_proxy.decisions import Action, History, Outcome, decide, error_body
from first_hop_proxy.keys import INVALID_KEY, KeyPool, Step, label_of
from first_hop_proxy.quotas import (
    body_retry_delay,
    daily_quota,
    next_pacific_midnight,
    pacific,
    provider_detail,
    unwrap,
)
from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body
from .fake_upstream import (
    Cdn,
    Choose,
    FakeUpstream,
    Json,
    Sse,
    chunk,
    completion,
    google_429,
    key_of,
    text_chunks,
)
from .log_helpers import error_logs, settle, state_of
from .test_decisions import make_policy

CHAT = "/v1/chat/completions"
KEYS = [f"AIzaSyFAKE{'x' * 24}k{n:03d}" for n in range(1, 4)]
LABELS = ["...k001", "...k002", "...k003"]


# -- quotas and delays, as upstreams say them ---------------------------------------------


def test_google_retry_info_and_messages() -> None:
    assert body_retry_delay(google_429(delay="26s"), "") == 26.0
    assert body_retry_delay(google_429(delay="1.5s"), "") == 1.5
    seconds = {
        "error": {
            "details": [
                {
                    "@type": "x/google.rpc.RetryInfo",
                    "retryDelay": {"seconds": 3, "nanos": 500000000},
                }
            ]
        }
    }
    assert body_retry_delay(seconds, "") == 3.5
    assert body_retry_delay({}, "Rate limited. Please retry in 51.2s.") == 51.2
    assert body_retry_delay({}, "try again in 2 minutes") == 120.0
    assert body_retry_delay({}, "retry after 250ms") == 0.25
    assert body_retry_delay({}, "Rate limited, slow down.") is None


def test_daily_quota_is_told_from_a_per_minute_one() -> None:
    assert daily_quota(google_429(per_day=True), "") == (
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
    )
    assert daily_quota(google_429(per_day=False), "") is None
    assert daily_quota({}, "You have used up your daily quota of requests.") == "daily quota"
    assert daily_quota({}, "Rate limit exceeded: free-models-per-day") is not None
    assert daily_quota({}, "Too many requests per minute") is None


def test_wrapped_in_a_list_and_openrouter_words() -> None:
    assert unwrap([{"error": {"message": "x"}}]) == {"error": {"message": "x"}}
    assert unwrap([1, 2]) == [1, 2]
    raw = orjson.dumps({"error": {"message": "Resource has been exhausted"}}).decode()
    body = {
        "error": {
            "message": "Provider returned error",
            "metadata": {"raw": raw, "provider_name": "Google"},
        }
    }
    assert provider_detail(body) == "Google: Resource has been exhausted"


def test_next_pacific_midnight() -> None:
    now = datetime(2026, 12, 3, 20, 30, tzinfo=pacific()).timestamp()
    midnight = datetime.fromtimestamp(next_pacific_midnight(now), pacific())
    assert (midnight.day, midnight.hour, midnight.minute) == (4, 0, 0)
    assert next_pacific_midnight(now) - now == 3.5 * 3600


def judge(body: Any, status: int = 429, now: float = 1_800_000_000.0) -> Any:
    return decide(
        Outcome(status, body=orjson.dumps(body).decode()), History(), make_policy(), now=now
    )


def test_decisions_use_the_body_delay_and_fail_fast_on_a_daily_quota() -> None:
    minute = judge(google_429(delay="0.5s", wrapped=True))
    assert (minute.action, minute.delay) == (Action.RETRY, 0.5)
    assert minute.upstream_message.startswith("You exceeded your current quota")
    day = judge(google_429(per_day=True, wrapped=True))
    assert (day.action, day.error_type, day.counts_as_failure) == (
        Action.FAIL,
        "quota_exhausted",
        False,
    )
    assert day.retry_after == next_pacific_midnight(1_800_000_000.0) - 1_800_000_000.0
    message = error_body(day, 1, 0.2)["error"]["message"]
    assert message.startswith("The upstream says its daily quota is used up (GenerateRequests")
    assert "retrying cannot help until it resets, in about" in message
    unknown = judge({"error": {"message": "Your daily limit is reached"}})
    assert unknown.retry_after == 3600.0  # quota_cooldown_seconds


def test_a_delay_longer_than_max_delay_fails_at_once() -> None:
    d = judge(google_429(delay="120s"))
    assert (d.action, d.gave_up) == (Action.FAIL, "retry_after_too_long")


# -- keys -----------------------------------------------------------------------------------


def decision(status: int, body: Any = None, retry_after: str | None = None) -> Any:
    headers = {"retry-after": retry_after} if retry_after else {}
    text = orjson.dumps(body or {"error": {"message": "x"}}).decode()
    return decide(Outcome(status, headers=headers, body=text), History(), make_policy(), now=0.0)


def test_labels_show_only_the_last_four() -> None:
    assert label_of("AIzaSyA-0123456789abcdefx7Qa", 0) == "...x7Qa"
    assert label_of("short-key", 2) == "key #3"


@pytest.mark.parametrize(
    "text",
    [
        "API key not valid. Please pass a valid API key.",
        "Incorrect API key provided",
        "API_KEY_INVALID",
    ],
)
def test_invalid_key_words(text: str) -> None:
    assert INVALID_KEY.search(text)


def test_round_robin_and_fill_first() -> None:
    pool = KeyPool(KEYS, "Authorization", "round_robin")
    assert [pool.pick(0.0).label for _ in range(4)] == [*LABELS, LABELS[0]]  # type: ignore[union-attr]
    fill = KeyPool(KEYS, "x-goog-api-key", "fill_first")
    assert [fill.pick(0.0).label for _ in range(2)] == [LABELS[0], LABELS[0]]  # type: ignore[union-attr]
    assert fill.headers(fill.keys[0])[1:] == ("x-goog-api-key", KEYS[0])
    assert pool.headers(pool.keys[0])[1:] == ("Authorization", f"Bearer {KEYS[0]}")


def test_key_states() -> None:
    pool = KeyPool(KEYS, "Authorization", "fill_first")
    a, b, c = pool.keys
    assert pool.record(a, decision(401), 0.0) is Step.NEXT_KEY
    assert pool.record(b, decision(429, retry_after="30"), 0.0) is Step.NEXT_KEY
    assert pool.pick(1.0) is c
    assert pool.record(c, decision(429, google_429(per_day=True)), 1.0) is Step.NEXT_KEY
    assert pool.pick(2.0) is None
    blocked = pool.blocked(2.0)
    assert blocked.kind == "cooling" and blocked.wait == 28.0
    assert pool.pick(30.0) is b  # cooled down
    states = {k["key"]: k["state"] for k in pool.snapshot(30.0)}
    assert states == dict(zip(LABELS, ["retired", "ready", "out"], strict=True))


def test_every_key_out_for_the_day() -> None:
    pool = KeyPool(KEYS[:2], "Authorization", "round_robin")
    for key in pool.keys:
        pool.record(key, decision(429, google_429(per_day=True)), 0.0)
    blocked = pool.blocked(10.0)
    assert blocked.kind == "out"
    assert "Every key's daily quota is used up" in blocked.message


def test_plain_429s_on_every_key_are_the_address() -> None:
    pool = KeyPool(KEYS[:2], "Authorization", "round_robin")
    a, b = pool.keys
    assert pool.record(a, decision(429), 0.0) is Step.NEXT_KEY  # a cools for the backoff
    assert pool.record(b, decision(429), 0.5) is Step.BACK_OFF  # both: the address
    assert all(k.state == "ready" for k in pool.keys)


def test_a_reload_keeps_limits_and_forgives_refusals() -> None:
    old = KeyPool(KEYS[:2], "Authorization", "round_robin")
    old.record(old.keys[0], decision(403), 0.0)
    old.record(old.keys[1], decision(429, google_429(per_day=True)), 0.0)
    new = KeyPool(KEYS[:2], "Authorization", "round_robin")
    new.adopt(old)
    assert [k.state for k in new.keys] == ["ready", "out"]


def test_keys_and_a_key_in_headers_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "target_proxy": {
                    "url": "https://a/x",
                    "keys": KEYS,
                    "headers": {"Authorization": "Bearer k"},
                }
            },
            base_dir=Path("/srv"),
            env={},
        )
    assert caught.value.problems[0].startswith(
        "target_proxy.keys: a key pool and a key in target_proxy.headers (Authorization)"
    )


# -- assembling a stream into one JSON reply ---------------------------------------------------


def test_assembler_puts_a_reply_back_together() -> None:
    assembler = Assembler()
    tool = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "roll", "arguments": '{"d"'},
    }
    for part in [
        {
            "id": "chatcmpl-1",
            "model": "m",
            "created": 5,
            "choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": "Think"}}],
        },
        {
            "id": "chatcmpl-2",
            "choices": [{"index": 0, "delta": {"reasoning_content": "ing.", "content": "Hel"}}],
        },
        {"choices": [{"index": 0, "delta": {"content": "lo", "tool_calls": [tool]}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 20}"}}]},
                    "finish_reason": "tool_calls",
                }
            ]
        },
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    ]:
        assembler.feed(part)
    reply = assembler.result()
    assert (reply["id"], reply["model"], reply["created"], reply["object"]) == (
        "chatcmpl-1",
        "m",
        5,
        "chat.completion",
    )
    (choice,) = reply["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert (message["content"], message["reasoning_content"]) == ("Hello", "Thinking.")
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "roll", "arguments": '{"d": 20}'}}
    ]
    assert reply["usage"]["total_tokens"] == 7


# -- through the real proxy ---------------------------------------------------------------------


async def ask(proxy: RunningServer, stream: bool = False) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + CHAT, json=chat_body(stream=stream)) as resp,
    ):
        raw = await resp.read()
        return resp.status, orjson.loads(raw) if resp.content_type == "application/json" else raw


def by_key(answers: dict[str, Any]) -> Choose:
    return Choose(lambda body, headers: answers.get(key_of(headers), Json()))


async def pool_proxy(start_proxy: StartProxy, **target: Any) -> RunningServer:
    return await start_proxy({"target_proxy": {"keys": KEYS, **target}})


async def test_the_pool_replaces_the_clients_key(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await pool_proxy(start_proxy, key_header="x-goog-api-key")
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            headers = {"Authorization": "Bearer client-own-key-123456"}
            async with session.post(proxy.url + CHAT, json=chat_body(), headers=headers) as r:
                assert r.status == 200
    seen = [r.headers.get("x-goog-api-key") for r in upstream.received]
    assert seen == KEYS
    assert all("Authorization" not in r.headers for r in upstream.received)


async def test_a_refused_key_is_retired_and_the_request_goes_on_at_once(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.default = by_key({KEYS[0]: Json(401, {"error": {"message": "API key not valid."}})})
    proxy = await pool_proxy(start_proxy)
    status, _ = await ask(proxy)
    assert status == 200
    assert [key_of(r.headers) for r in upstream.received] == KEYS[:2]
    for _ in range(3):
        assert (await ask(proxy))[0] == 200
    assert KEYS[0] not in [key_of(r.headers) for r in upstream.received[2:]]
    await settle(proxy)
    (logged,) = error_logs(tmp_path / "logs" / "errors", "401")
    text = logged.read_text()
    assert KEYS[0] not in text and LABELS[0] in text


async def test_every_key_refused_is_what_the_person_hears(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = Json(403, {"error": {"message": "forbidden"}})
    proxy = await pool_proxy(start_proxy)
    status, body = await ask(proxy)
    assert status == 401 and upstream.calls == 3
    assert body["error"]["code"] == "keys_refused"
    assert "refused every key" in body["error"]["message"]
    for key in KEYS:
        assert key not in orjson.dumps(body).decode()


async def test_a_rate_limited_key_cools_and_the_request_does_not_wait(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = by_key({KEYS[0]: Json(429, google_429(delay="20s"))})
    proxy = await pool_proxy(start_proxy)
    began = time.monotonic()
    assert (await ask(proxy))[0] == 200
    assert time.monotonic() - began < 1
    keys = state_of(proxy).upstreams[0].keys
    assert keys is not None and keys.keys[0].state == "cooling"


async def test_every_key_out_for_the_day_fails_at_once_without_calling_the_upstream(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = Json(429, google_429(per_day=True, wrapped=True))
    proxy = await pool_proxy(start_proxy)
    status, body = await ask(proxy)
    assert status == 503 and upstream.calls == 3
    assert body["error"]["code"] == "daily_quota_exhausted"
    assert "Every key's daily quota is used up" in body["error"]["message"]
    began = time.monotonic()
    status, body = await ask(proxy)
    assert status == 503 and upstream.calls == 3  # no call at all
    assert time.monotonic() - began < 0.5
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/health/detailed") as r:
        listed = (await r.json())["upstreams"][0]["keys"]
    assert [k["key"] for k in listed] == LABELS
    assert all(k["state"] == "out" and k["until"] for k in listed)
    assert not any(key in str(listed) for key in KEYS)


async def test_a_single_key_daily_quota_fails_fast(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = Json(429, google_429(per_day=True))
    proxy = await start_proxy()
    status, body = await ask(proxy)
    assert status == 503 and upstream.calls == 1
    assert body["error"]["code"] == "daily_quota_exhausted"


async def test_plain_429_on_every_key_backs_off(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.queue(Json(429), Json(429), Json(429), Json())
    proxy = await pool_proxy(start_proxy)
    assert (await ask(proxy))[0] == 200
    keys = state_of(proxy).upstreams[0].keys
    assert keys is not None and [k.state for k in keys.keys].count("cooling") <= 1


async def test_wrapped_errors_reach_the_person_as_words(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = Json(
        400, [{"error": {"code": 400, "message": "Invalid value at 'contents'"}}]
    )
    proxy = await start_proxy()
    status, body = await ask(proxy)
    assert status == 400
    assert "Upstream said: Invalid value at 'contents'" in body["error"]["message"]
    assert "[{" not in body["error"]["message"]


async def test_a_cdn_timeout_switches_json_requests_to_streams(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = Cdn(limit=0.2, slow=1.0)
    proxy = await start_proxy()
    status, body = await ask(proxy)
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "Streamed reply."
    assert body["id"] == "chatcmpl-fake" and body["created"] == 1700000000
    assert [r.json.get("stream") for r in upstream.received] == [False, True]
    assert upstream.received[1].json["stream_options"] == {"include_usage": True}
    status, body = await ask(proxy)  # from now on: streamed at once
    assert status == 200 and upstream.received[-1].json["stream"] is True
    assert upstream.calls == 3


async def test_always_and_never(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    upstream.default = Cdn(limit=0.2, slow=1.0)
    never = await start_proxy({"target_proxy": {"stream_upstream": "never"}})
    status, body = await ask(never)
    assert status == 524 and "524: A timeout occurred" in body["error"]["message"]
    assert all(r.json.get("stream") is False for r in upstream.received)
    upstream.received.clear()
    always = await start_proxy({"target_proxy": {"stream_upstream": "always"}})
    status, body = await ask(always)
    assert status == 200 and upstream.received[0].json["stream"] is True


async def test_a_model_that_refuses_streams_gets_json_again(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    refuse = Json(400, {"error": {"message": "stream is not supported for this model"}})
    upstream.default = Choose(lambda body, headers: refuse if body.get("stream") else Json())
    proxy = await start_proxy({"target_proxy": {"stream_upstream": "always"}})
    assert (await ask(proxy))[0] == 200
    assert [r.json.get("stream") for r in upstream.received] == [True, False]
    assert (await ask(proxy))[0] == 200
    assert upstream.received[-1].json.get("stream") is False  # remembered: no second refusal
    assert upstream.calls == 3


async def test_an_assembled_stream_that_breaks_is_retried_unseen(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.queue(Sse([chunk("Half", role=True)], end="reset"), Sse(text_chunks("Whole.")))
    proxy = await start_proxy({"target_proxy": {"stream_upstream": "always"}})
    status, body = await ask(proxy)
    assert status == 200 and body["choices"][0]["message"]["content"] == "Whole."
    assert upstream.calls == 2


async def test_the_keys_never_leave(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    echo = {"error": {"message": f"bad key {KEYS[1]} for this project"}}
    upstream.default = by_key({KEYS[0]: Json(401, echo), KEYS[1]: Json(401, echo)})
    proxy = await pool_proxy(start_proxy)
    status, body = await ask(proxy)
    assert status == 200
    await settle(proxy)
    everything = "".join(p.read_text() for p in (tmp_path / "logs").rglob("*.log"))
    for key in KEYS:
        assert key not in everything and key[8:20] not in everything
    assert (
        completion()["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]
    )


async def test_a_pool_with_no_key_left_fails_over(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    from .test_upstreams import entry

    spare = FakeUpstream()
    await spare.start()
    try:
        upstream.default = Json(429, google_429(per_day=True))
        proxy = await start_proxy(
            {
                "target_proxy": {"url": ""},
                "upstreams": [
                    entry("free", upstream.chat_url, keys=KEYS[:2]),
                    entry("paid", spare.chat_url),
                ],
            }
        )
        status, _ = await ask(proxy)
        assert status == 200 and (upstream.calls, spare.calls) == (2, 1)
        status, _ = await ask(proxy)  # free's keys are out: straight to paid
        assert status == 200 and (upstream.calls, spare.calls) == (2, 2)
    finally:
        await spare.close()
