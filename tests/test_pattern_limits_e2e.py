"""A catastrophic hard-stop or recategorization pattern never freezes the proxy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from .conftest import StartProxy, chat_body, wait_until
from .fake_upstream import FakeUpstream, Json, Sse, chunk
from .log_helpers import error_details, error_logs, settle
from .test_cli import run, write_config

# Without a limit (x|xx)+$ takes about 2.6 s on this text, on 2 cores: far more
# than the 0.3 s each rule is given, and than /health may take.
NEARLY = "x" * 32 + "!"


async def test_health_answers_while_patterns_run_into_their_limit(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await start_proxy(
        {
            "error_handling": {
                "max_retries": 0,
                "hard_stop_conditions": {
                    "timeout_ms": 300,
                    "rules": [{"pattern": "(x|xx)+$", "description": "runaway stop"}],
                },
            },
            "response_parsing": {
                "status_recategorization": {
                    "timeout_ms": 300,
                    "rules": [{"pattern": "(x|xx)+$", "new_status": 429}],
                }
            },
            "circuit_breaker": {"enabled": False},
        }
    )
    upstream.queue(Json(500, NEARLY))
    started = time.monotonic()
    chat = asyncio.ensure_future(client.post(proxy.url + "/v1/chat/completions", json=chat_body()))
    await wait_until(lambda: upstream.calls, 5)
    waits = []
    while not chat.done() and time.monotonic() - started < 5:
        began = time.monotonic()
        async with client.get(proxy.url + "/health") as resp:
            assert resp.status == 200
        waits.append(time.monotonic() - began)
        await asyncio.sleep(0.05)
    resp = await chat
    took = time.monotonic() - started
    # both rules skipped after their limit: the 500 is passed on as it came
    assert resp.status == 500
    assert "xxxxxxxx" in (await resp.json())["error"]["message"]
    assert 0.5 < took < 3
    assert len(waits) >= 5 and max(waits) < 0.25, waits
    await settle(proxy)
    logged = sorted(
        error_details(path.read_text())["error_message"]
        for path in error_logs(tmp_path / "logs" / "errors", "rule_timeout")
    )
    assert logged == [
        "error_handling.hard_stop_conditions.rules[0] (runaway stop) timed out; skipped",
        "response_parsing.status_recategorization.rules[0] timed out; skipped",
    ]


async def test_stream_error_event_after_content_judged_off_the_event_loop(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    """An error event after content meets the hard-stop rules too, under their limit."""
    proxy = await start_proxy(
        {
            "error_handling": {
                "hard_stop_conditions": {"timeout_ms": 200, "rules": [{"pattern": "(x|xx)+$"}]}
            }
        }
    )
    events = [chunk(role=True, text=""), chunk("Hi"), {"error": {"message": NEARLY}}]
    upstream.queue(Sse(events))
    started = time.monotonic()
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body(stream=True)) as resp:
        text = await resp.text()
    assert time.monotonic() - started < 2
    assert "stream_interrupted" in text and text.rstrip().endswith("data: [DONE]")


def test_check_config_warns_about_nested_repetition(tmp_path: Path) -> None:
    write_config(
        tmp_path / "config.yaml",
        "error_handling:\n  hard_stop_conditions:\n    rules:\n"
        '      - pattern: "(x|xx)+$"\n        user_message: "Stopped."\n',
    )
    result = run(["check-config"], tmp_path)
    assert result.returncode == 0
    assert (
        "warning: error_handling.hard_stop_conditions.rules[0].pattern: '(x|xx)+$' repeats "
        "a group that itself repeats or has alternatives"
    ) in result.stderr
