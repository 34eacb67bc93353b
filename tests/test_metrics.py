"""GET /metrics: the Prometheus text format, with what the proxy did in it."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .conftest import StartProxy, chat_body
from .fake_upstream import FakeUpstream, Json, Sse, completion, text_chunks
from .log_helpers import settle

OVERLOADED = {"error": {"message": "The model is overloaded"}}


async def scrape(
    client: aiohttp.ClientSession, url: str
) -> dict[tuple[str, tuple[str, ...]], float]:
    """Every sample as {(name, sorted label pairs): value}."""
    async with client.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[sample.name, labels] = sample.value
    return samples


async def test_metrics_count_requests_attempts_retries_and_breaker(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {
            "circuit_breaker": {"failure_threshold": 2, "recovery_timeout": 60},
            "error_handling": {"max_retries": 1},
            "response_parsing": {
                "status_recategorization": {
                    "rules": [{"pattern": "overloaded", "original_status": 200, "new_status": 429}]
                }
            },
        }
    )
    chat = proxy.url + "/v1/chat/completions"
    upstream.queue(Json(503), Json(200))  # retried once, then delivered
    async with client.post(chat, json=chat_body()) as resp:
        assert resp.status == 200
    upstream.queue(Sse(text_chunks("Hi", " there")))
    async with client.post(chat, json=chat_body(stream=True)) as resp:
        assert resp.status == 200
        await resp.read()
    upstream.queue(Json(200, body=OVERLOADED), Json(200, body=completion("", finish="stop")))
    upstream.queue(Json(200))  # recategorized 429, then an empty reply, then delivered
    async with client.post(chat, json=chat_body()) as resp:
        assert resp.status == 200
    upstream.queue(Json(503), Json(503))  # retries exhausted; the breaker opens at 2 failures
    async with client.post(chat, json=chat_body()) as resp:
        assert resp.status == 503
    await settle(proxy)

    m = await scrape(client, proxy.url)
    up = "upstream=default"
    assert m["first_hop_proxy_requests_total", ("status=200", up)] == 3
    assert m["first_hop_proxy_requests_total", ("status=503", up)] == 1
    assert m["first_hop_proxy_upstream_attempts_total", ("outcome=deliver", up)] == 3
    assert m["first_hop_proxy_upstream_attempts_total", ("outcome=retry", up)] == 4
    assert m["first_hop_proxy_upstream_attempts_total", ("outcome=fail", up)] == 1
    assert m["first_hop_proxy_retries_total", ("reason=503",)] == 2
    assert m["first_hop_proxy_retries_total", ("reason=429",)] == 1
    assert m["first_hop_proxy_retries_total", ("reason=empty_response",)] == 1
    assert m["first_hop_proxy_recategorizations_total", ()] == 1
    assert m["first_hop_proxy_empty_replies_total", ()] == 1
    assert m["first_hop_proxy_hard_stops_total", ()] == 0
    assert m["first_hop_proxy_circuit_breaker_state", ("state=open", up)] == 1
    assert m["first_hop_proxy_circuit_breaker_state", ("state=closed", up)] == 0
    assert m["first_hop_proxy_upstream_latency_seconds_count", (up,)] == 8
    assert m["first_hop_proxy_upstream_latency_seconds_bucket", ("le=+Inf", up)] == 8
    assert m["first_hop_proxy_time_to_first_token_seconds_count", (up,)] == 1
    assert m["first_hop_proxy_log_files_written_total", ()] >= 4
    assert m["first_hop_proxy_log_files_dropped_total", ()] == 0
    assert m["first_hop_proxy_requests_in_flight", ()] == 0


async def test_metrics_speak_openmetrics_when_asked(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with client.get(proxy.url + "/metrics", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await resp.text()).endswith("# EOF\n")


async def test_client_aborts_and_hard_stops_are_counted(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    rule = {"pattern": "FATAL", "user_message": "Stopped."}
    proxy = await start_proxy({"error_handling": {"hard_stop_conditions": {"rules": [rule]}}})
    upstream.queue(Json(500, body={"error": {"message": "FATAL thing"}}))
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        await resp.read()
    m = await scrape(client, proxy.url)
    assert m["first_hop_proxy_hard_stops_total", ()] == 1
    assert (
        m["first_hop_proxy_upstream_attempts_total", ("outcome=hard_stop", "upstream=default")] == 1
    )
