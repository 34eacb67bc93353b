"""The resilience engine end to end, non-streaming: each rule, backoff and error shapes.

Everything goes through the real server against the fake upstream, and every
test asserts how many attempts the upstream saw.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body, wait_until
from .fake_upstream import FakeUpstream, Hang, Json, Reset, completion
from .log_helpers import settle

CHAT = "/v1/chat/completions"

OVERLOADED = {"error": {"message": "The model is overloaded. Please try again later."}}
BROKEN_MIDDLEWARE = (
    "googleAIBlockingResponseHandler: TypeError: Cannot read properties of undefined "
    "(reading 'parts')"
)
FIX_MESSAGE = "Your message has formatting that breaks the provider; please rephrase it."


class Answer:
    """What the client got."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        error = self.json["error"]
        assert isinstance(error, dict)
        return error


async def ask(
    client: aiohttp.ClientSession, proxy: RunningServer, *, stream: bool = False
) -> Answer:
    async with client.post(proxy.url + CHAT, json=chat_body(stream=stream)) as resp:
        return Answer(resp.status, dict(resp.headers), await resp.read())


def gaps(upstream: FakeUpstream) -> list[float]:
    times = [r.at for r in upstream.received if r.path.endswith("/chat/completions")]
    return [b - a for a, b in itertools.pairwise(times)]


def assert_error_shape(error: dict[str, Any], error_type: str, attempts: int) -> None:
    """Every error a client gets: a message a person can act on, a type, a code, attempts."""
    assert error["type"] == error_type, error
    assert isinstance(error["message"], str) and len(error["message"]) > 20, error
    assert isinstance(error["code"], str) and error["code"], error
    assert error["attempts"] == attempts, error
    plural = "1 attempt" if attempts == 1 else f"{attempts} attempts"
    if error_type != "circuit_open":
        assert plural in error["message"] or attempts == 1, error


def hard_stop_settings(**rule: Any) -> dict[str, Any]:
    base = {
        "pattern": "googleAIBlockingResponseHandler.*Cannot read properties of undefined",
        "description": "Downstream middleware failure",
        "user_message": FIX_MESSAGE,
    }
    return {"error_handling": {"hard_stop_conditions": {"rules": [{**base, **rule}]}}}


# -- rule 2: hard stops ---------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream_status", "client_status"), [(200, 502), (500, 500), (503, 503), (429, 429)]
)
async def test_hard_stop_in_body_answers_spec_format_at_once(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    upstream_status: int,
    client_status: int,
) -> None:
    """A hard-stop pattern in any body: one attempt (even for a retry code), spec 7.4 body."""
    proxy = await start_proxy(hard_stop_settings())
    body = {"error": {"message": BROKEN_MIDDLEWARE, "code": upstream_status}}
    upstream.default = Json(upstream_status, body)
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    # An upstream error status is passed on, except 429, which clients would retry:
    # the proxy's exhausted-429 status applies to any final 429.
    expected = 503 if upstream_status == 429 else client_status
    assert answer.status == expected
    assert answer.json == {
        "error": {
            "message": FIX_MESSAGE,
            "type": "hard_stop_error",
            "code": "hard_stop_condition_met",
            "original_response": orjson.dumps(body).decode(),
        }
    }


async def test_hard_stop_without_original_response_or_user_message(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        hard_stop_settings(preserve_original_response=False, add_user_message=False)
    )
    upstream.default = Json(200, {"error": {"message": BROKEN_MIDDLEWARE}})
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 502
    error = answer.error
    assert set(error) == {"message", "type", "code"}
    assert error["type"] == "hard_stop_error"
    assert error["code"] == "hard_stop_condition_met"
    assert error["message"] != FIX_MESSAGE
    assert "hard-stop" in error["message"]


async def test_hard_stop_pattern_is_case_insensitive(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(hard_stop_settings())
    upstream.default = Json(502, {"error": {"message": BROKEN_MIDDLEWARE.upper()}})
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 502
    assert answer.error["type"] == "hard_stop_error"


# -- rule 3: status recategorization ---------------------------------------------

OVERLOAD_RULE = {
    "pattern": "The model is overloaded",
    "original_status": 200,
    "new_status": 429,
    "description": "Google AI overload errors as rate limit",
}


def recategorization(*rules: dict[str, Any], paths: list[str] | None = None) -> dict[str, Any]:
    parsing: dict[str, Any] = {"status_recategorization": {"rules": list(rules)}}
    if paths is not None:
        parsing["json_extraction"] = {"paths": paths}
    return {"response_parsing": parsing}


async def test_recategorized_200_is_retried_then_success_delivered(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(recategorization(OVERLOAD_RULE))
    upstream.queue(Json(200, OVERLOADED), Json(200, OVERLOADED), Json(200, completion("Fine.")))
    answer = await ask(client, proxy)
    assert upstream.calls == 3
    assert answer.status == 200
    assert answer.json["choices"][0]["message"]["content"] == "Fine."


async def test_recategorized_200_counts_as_429_to_the_end(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """Treated as 429: retried as a retry code, then the exhausted-429 status and type."""
    proxy = await start_proxy(
        {**recategorization(OVERLOAD_RULE), "error_handling": {"max_retries": 2}}
    )
    upstream.default = Json(200, OVERLOADED)
    answer = await ask(client, proxy)
    assert upstream.calls == 3
    assert answer.status == 503
    error = answer.error
    assert_error_shape(error, "rate_limited", 3)
    assert "429" in error["message"] and "200" in error["message"]
    assert "The model is overloaded" in error["message"]


async def test_recategorization_without_original_status_matches_any_status(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """400 is a fail code; a rule with no original_status turns it into a retried 429."""
    rule = {"pattern": "quota (is )?exhausted", "new_status": 429}
    proxy = await start_proxy(recategorization(rule))
    upstream.queue(Json(400, {"error": {"message": "Resource quota is exhausted"}}), Json())
    answer = await ask(client, proxy)
    assert upstream.calls == 2
    assert answer.status == 200


async def test_recategorization_with_original_status_ignores_other_statuses(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    rule = {"pattern": "quota", "original_status": 500, "new_status": 429}
    proxy = await start_proxy(recategorization(rule))
    upstream.queue(Json(400, {"error": {"message": "quota exhausted"}}), Json())
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 400


async def test_recategorization_looks_at_json_extraction_paths(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """An anchored pattern matches the value at ``proxy_note``, never the raw body."""
    rule = {"pattern": "^Upstream service unavailable$", "original_status": 200, "new_status": 503}
    note = completion("stale", proxy_note="Upstream service unavailable")
    proxy = await start_proxy(recategorization(rule, paths=["proxy_note"]))
    upstream.queue(Json(200, note), Json(200, completion("fresh")))
    answer = await ask(client, proxy)
    assert upstream.calls == 2
    assert answer.json["choices"][0]["message"]["content"] == "fresh"


async def test_recategorization_paths_not_configured_do_not_match(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    rule = {"pattern": "^Upstream service unavailable$", "original_status": 200, "new_status": 503}
    note = completion("stale", proxy_note="Upstream service unavailable")
    proxy = await start_proxy(recategorization(rule, paths=["error.message"]))
    upstream.queue(Json(200, note), Json(200, completion("fresh")))
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.json["choices"][0]["message"]["content"] == "stale"


async def test_recategorization_is_logged(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Any,
) -> None:
    proxy = await start_proxy(recategorization(OVERLOAD_RULE))
    upstream.queue(Json(200, OVERLOADED), Json())
    answer = await ask(client, proxy)
    assert answer.status == 200 and upstream.calls == 2
    folder = tmp_path / "logs" / "errors"
    await settle(proxy)
    files = list(folder.glob("recategorized_*.log"))
    assert files, list(folder.iterdir()) if folder.exists() else "no error log folder"
    text = files[0].read_text()
    assert "200" in text and "429" in text and "The model is overloaded" in text


# -- rule 4: empty replies -----------------------------------------------------

EMPTY_BODIES = {
    "no choices": completion(choices=[]),
    "whitespace": completion(" \n\t "),
    "safety": completion("Partial text", finish="SAFETY"),
}


@pytest.mark.parametrize("kind", list(EMPTY_BODIES))
async def test_empty_reply_retried_then_empty_response_error(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, kind: str
) -> None:
    proxy = await start_proxy({"error_handling": {"empty_response": {"max_retries": 2}}})
    upstream.default = Json(200, EMPTY_BODIES[kind])
    answer = await ask(client, proxy)
    assert upstream.calls == 3
    assert answer.status == 502
    error = answer.error
    assert_error_shape(error, "empty_response", 3)
    assert error["code"] == "empty_response"
    assert "3 times" in error["message"]
    if kind == "safety":
        assert "SAFETY" in error["message"]


async def test_empty_reply_default_budget_is_three_retries(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.default = Json(200, completion(""))
    answer = await ask(client, proxy)
    assert upstream.calls == 4
    assert answer.status == 502
    assert answer.error["type"] == "empty_response"


async def test_empty_reply_then_good_reply_is_delivered(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Json(200, completion("")), Json(200, completion("Now with words")))
    answer = await ask(client, proxy)
    assert upstream.calls == 2
    assert answer.status == 200
    assert answer.json["choices"][0]["message"]["content"] == "Now with words"


async def test_empty_reply_deliver_last(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"error_handling": {"empty_response": {"max_retries": 1, "deliver_last": True}}}
    )
    first = completion("", finish="SAFETY", id="first")
    last = completion("", finish="SAFETY", id="last")
    upstream.queue(Json(200, first), Json(200, last))
    answer = await ask(client, proxy)
    assert upstream.calls == 2
    assert answer.status == 200
    assert answer.json == last


async def test_empty_reply_check_disabled_delivers_at_once(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"empty_response": {"enabled": False}}})
    body = completion(" ")
    upstream.default = Json(200, body)
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 200
    assert answer.json == body


async def test_tool_call_without_text_is_not_empty(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = completion(None, finish="tool_calls")
    body["choices"][0]["message"]["tool_calls"] = [call]
    upstream.default = Json(200, body)
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 200


# -- rules 5-9: status codes and transport failures -------------------------------


async def test_fail_code_fails_at_once_with_upstream_message(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.default = Json(401, {"error": {"message": "Invalid API key provided: sk-..."}})
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 401
    error = answer.error
    assert_error_shape(error, "upstream_error", 1)
    assert "401" in error["message"]
    assert "Invalid API key provided" in error["message"]


async def test_retry_code_tries_max_retries_plus_one_times(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 3}})
    upstream.default = Json(502, {"error": {"message": "Bad gateway from the provider"}})
    answer = await ask(client, proxy)
    assert upstream.calls == 4
    assert answer.status == 502
    error = answer.error
    assert_error_shape(error, "upstream_error", 4)
    assert error["code"] == "retries_exhausted"
    assert "Bad gateway from the provider" in error["message"]


async def test_retry_code_then_success(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Json(503), Json(504), Json(200, completion("Third time lucky")))
    answer = await ask(client, proxy)
    assert upstream.calls == 3
    assert answer.status == 200
    assert answer.json["choices"][0]["message"]["content"] == "Third time lucky"


async def test_max_retries_zero_means_one_attempt(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 0}})
    upstream.default = Json(503)
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 503


async def test_conditional_code_default_three_calls(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.default = Json(404, {"error": {"message": "model not found"}})
    answer = await ask(client, proxy)
    assert upstream.calls == 3
    assert answer.status == 404
    assert_error_shape(answer.error, "upstream_error", 3)
    assert "model not found" in answer.error["message"]


async def test_conditional_retry_disabled_fails_at_once(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"conditional_retry_enabled": False}})
    upstream.default = Json(404)
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 404


async def test_code_in_fail_and_retry_lists_fails(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"retry_codes": [503], "fail_codes": [503]}})
    upstream.default = Json(503)
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 503


async def test_other_status_passed_on_with_its_message(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.default = Json(402, {"error": {"message": "Out of credits: top up your account"}})
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 402
    error = answer.error
    assert_error_shape(error, "upstream_error", 1)
    assert "Out of credits: top up your account" in error["message"]


async def test_html_error_page_gives_its_title(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 1}})
    title = "502 Bad Gateway &#8211; Tom &amp; Jerry&#39;s proxy"
    page = f"<html><head><title>{title}</title></head><body><h1>nginx</h1></body></html>"
    upstream.default = Json(502, page, headers={"Content-Type": "text/html"})
    answer = await ask(client, proxy)
    assert upstream.calls == 2
    assert answer.status == 502
    assert "502 Bad Gateway – Tom & Jerry's proxy" in answer.error["message"]
    assert "<" not in answer.error["message"] and "&amp;" not in answer.error["message"]


async def test_reset_retried_against_max_retries(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 2}})
    upstream.default = Reset()
    answer = await ask(client, proxy)
    assert upstream.calls == 3
    assert answer.status == 502
    error = answer.error
    assert_error_shape(error, "connection_error", 3)
    assert error["code"] == "connection_error"
    assert "closed the connection" in error["message"]


async def test_reset_then_success(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Reset(), Reset(), Json())
    answer = await ask(client, proxy)
    assert upstream.calls == 3
    assert answer.status == 200


async def test_hang_times_out_and_is_retried(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"target_proxy": {"timeout": 0.2}, "error_handling": {"max_retries": 1}}
    )
    upstream.default = Hang()
    began = time.monotonic()
    answer = await ask(client, proxy)
    assert time.monotonic() - began < 2
    assert upstream.calls == 2
    assert answer.status == 504
    error = answer.error
    assert_error_shape(error, "timeout", 2)
    assert "0.2 s" in error["message"]


async def test_hang_then_success(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"target_proxy": {"timeout": 0.2}})
    upstream.queue(Hang(), Json(200, completion("Awake")))
    answer = await ask(client, proxy)
    assert upstream.calls == 2
    assert answer.status == 200
    assert answer.json["choices"][0]["message"]["content"] == "Awake"


async def test_refused_connection_is_connection_error(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    from .conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/v1/chat/completions"
    proxy = await start_proxy({"target_proxy": {"url": url}, "error_handling": {"max_retries": 2}})
    answer = await ask(client, proxy)
    assert upstream.calls == 0
    assert answer.status == 502
    assert_error_shape(answer.error, "connection_error", 3)
    assert "Could not connect" in answer.error["message"]


async def test_invalid_json_2xx_retried(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 2}})
    upstream.default = Json(200, '{"choices": [ truncated')
    answer = await ask(client, proxy)
    assert upstream.calls == 3
    assert answer.status == 502
    error = answer.error
    assert error["attempts"] == 3
    assert error["type"] in ("connection_error", "upstream_error")
    assert "not valid JSON" in error["message"]


async def test_invalid_json_then_success(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.queue(Json(200, "<html>oops</html>"), Json())
    answer = await ask(client, proxy)
    assert upstream.calls == 2
    assert answer.status == 200


# -- backoff and Retry-After -----------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value", "seconds"), [("Retry-After", "0.3", 0.3), ("retry-after-ms", "250", 0.25)]
)
async def test_retry_after_is_obeyed(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    header: str,
    value: str,
    seconds: float,
) -> None:
    proxy = await start_proxy({"error_handling": {"max_delay": 1}})
    upstream.queue(Json(429, headers={header: value}), Json())
    answer = await ask(client, proxy)
    assert answer.status == 200
    assert upstream.calls == 2
    (gap,) = gaps(upstream)
    assert seconds <= gap < seconds + 0.2, gap


async def test_retry_after_beyond_max_delay_ends_retries(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    upstream.default = Json(
        429, {"error": {"message": "Rate limit reached"}}, headers={"Retry-After": "120"}
    )
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 503
    assert answer.headers["Retry-After"] == "120"
    error = answer.error
    assert_error_shape(error, "rate_limited", 1)
    assert error["retry_after"] == 120
    assert "120 s" in error["message"]
    assert "Rate limit reached" in error["message"]


async def test_retry_after_as_http_date_beyond_max_delay(
    proxy: RunningServer, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    from email.utils import formatdate

    upstream.default = Json(
        503, headers={"Retry-After": formatdate(time.time() + 600, usegmt=True)}
    )
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 503
    assert 590 <= answer.error["retry_after"] <= 601
    assert 590 <= int(answer.headers["Retry-After"]) <= 601


async def test_backoff_doubles_and_is_capped(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"error_handling": {"base_delay": 0.04, "max_delay": 0.2, "max_retries": 4}}
    )
    upstream.default = Json(503)
    answer = await ask(client, proxy)
    assert answer.status == 503
    assert upstream.calls == 5
    waits = gaps(upstream)
    # 0.04, 0.08, 0.16, 0.32 -> capped at 0.2; each +/-25 %, the cap applied last.
    for n, gap in enumerate(waits, start=1):
        nominal = min(0.04 * 2 ** (n - 1), 0.2)
        assert gap >= min(nominal * 0.75, 0.2) - 0.005, waits
        assert gap <= min(nominal * 1.25, 0.2) + 0.1, waits


async def test_max_total_seconds_bounds_the_retries(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {
            "error_handling": {
                "base_delay": 0.1,
                "max_delay": 0.1,
                "max_retries": 50,
                "max_total_seconds": 0.35,
            }
        }
    )
    upstream.default = Json(503, {"error": {"message": "busy"}})
    began = time.monotonic()
    answer = await ask(client, proxy)
    assert time.monotonic() - began < 0.6
    assert 2 <= upstream.calls <= 4
    assert answer.status == 503
    error = answer.error
    assert_error_shape(error, "upstream_error", upstream.calls)
    assert error["code"] == "time_budget_exhausted"
    assert "max_total_seconds" in error["message"]


# -- 429 at the end ------------------------------------------------------------


async def test_exhausted_429_answers_503(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 2}})
    upstream.default = Json(429, {"error": {"message": "Too many requests, slow down"}})
    answer = await ask(client, proxy)
    assert upstream.calls == 3
    assert answer.status == 503
    error = answer.error
    assert_error_shape(error, "rate_limited", 3)
    assert error["code"] == "retries_exhausted"
    assert "429" in error["message"]
    assert "Too many requests, slow down" in error["message"]


async def test_exhausted_429_status_is_configurable(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 1, "exhausted_429_status": 429}})
    upstream.default = Json(429)
    answer = await ask(client, proxy)
    assert upstream.calls == 2
    assert answer.status == 429
    assert answer.error["type"] == "rate_limited"


# -- the client leaving --------------------------------------------------------


async def test_no_attempts_after_the_client_leaves(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy({"error_handling": {"base_delay": 0.1, "max_delay": 0.1}})
    upstream.default = Json(503)
    timeout = aiohttp.ClientTimeout(total=0.25)
    async with aiohttp.ClientSession(timeout=timeout) as short:
        with pytest.raises(asyncio.TimeoutError):
            async with short.post(proxy.url + CHAT, json=chat_body()) as resp:
                await resp.read()
    seen = upstream.calls
    assert 1 <= seen <= 4
    await asyncio.sleep(0.4)
    assert upstream.calls == seen


async def test_client_leaving_cancels_the_upstream_attempt(
    proxy: RunningServer, upstream: FakeUpstream
) -> None:
    upstream.default = Hang(5)
    timeout = aiohttp.ClientTimeout(total=0.2)
    async with aiohttp.ClientSession(timeout=timeout) as short:
        with pytest.raises(asyncio.TimeoutError):
            async with short.post(proxy.url + CHAT, json=chat_body()) as resp:
                await resp.read()
    await wait_until(lambda: upstream.disconnects, 1)
    assert upstream.disconnects
    await asyncio.sleep(0.2)
    assert upstream.calls == 1


# -- a legacy config -------------------------------------------------------------


async def spec_proxy(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Any, **extra: Any
) -> RunningServer:
    import yaml

    from .conftest import LEGACY_CONFIG, merge

    spec = yaml.safe_load(LEGACY_CONFIG.read_text())
    fast = {
        "target_proxy": {"url": upstream.chat_url, "headers": {}},
        "error_handling": {"base_delay": 0.01, "max_delay": 0.05},
        "logging": {"folder": str(tmp_path / "logs")},
        "error_logging": {"folder": str(tmp_path / "logs" / "errors")},
    }
    return await start_proxy(merge(merge(spec, fast), extra))


async def test_spec_config_retries_overloaded_200(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Any
) -> None:
    proxy = await spec_proxy(start_proxy, upstream, tmp_path)
    upstream.queue(Json(200, OVERLOADED), Json(200, completion("Recovered")))
    answer = await ask(client, proxy)
    assert upstream.calls == 2
    assert answer.status == 200


async def test_spec_config_hard_stop(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Any
) -> None:
    proxy = await spec_proxy(start_proxy, upstream, tmp_path)
    body = {"error": {"message": BROKEN_MIDDLEWARE}}
    upstream.default = Json(500, body)
    answer = await ask(client, proxy)
    assert upstream.calls == 1
    assert answer.status == 500
    error = answer.error
    assert error["type"] == "hard_stop_error"
    assert error["code"] == "hard_stop_condition_met"
    assert error["message"].startswith("The upstream could not process your last message")
    assert error["original_response"] == orjson.dumps(body).decode()


@pytest.mark.parametrize(("status", "calls"), [(404, 3), (400, 1), (401, 1), (503, 11), (418, 1)])
async def test_spec_config_status_lists(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Any,
    status: int,
    calls: int,
) -> None:
    """The spec lists 418 as both fail and conditional: fail wins. (The breaker is off:
    its default threshold of 5 would stop a lone request's retries; see test_breaker_e2e.)"""
    proxy = await spec_proxy(start_proxy, upstream, tmp_path, circuit_breaker={"enabled": False})
    upstream.default = Json(status)
    answer = await ask(client, proxy)
    assert upstream.calls == calls
    assert answer.status == status


# -- the time budget ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_persisting_429_ends_within_the_time_budget(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, stream: bool
) -> None:
    """The shipped backoff shape, scaled down 10x: the person hears within the budget."""
    proxy = await start_proxy(
        {"error_handling": {"base_delay": 0.1, "max_delay": 6, "max_total_seconds": 1.5}}
    )
    upstream.default = Json(429, {"error": {"message": "Rate limit reached"}})
    began = time.monotonic()
    answer = await ask(client, proxy, stream=stream)
    took = time.monotonic() - began
    assert took < 2.0, took  # 1.5 s of budget; unbounded, the waits would go on past 6 s
    assert answer.status == 503
    error = answer.error
    assert error["code"] == "time_budget_exhausted"
    assert "Rate limit reached" in error["message"]
    assert upstream.calls >= 4


async def test_a_silent_upstream_ends_within_about_the_budget(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {"target_proxy": {"timeout": 0.3}, "error_handling": {"max_total_seconds": 0.5}}
    )
    upstream.default = Hang()
    began = time.monotonic()
    answer = await ask(client, proxy)
    assert time.monotonic() - began < 1.2
    assert answer.status == 504
    assert "did not answer in time" in answer.error["message"]
    assert upstream.calls == 2
