"""Mask first, cut after: a text shortened for the client, a log or the console never
keeps a stump of a key.

Each upstream text below puts a key just where a cut falls (the 100-character
snippet of a reply that is not JSON, the 300-character upstream message, the
60-character error in a keep-alive comment, the console's debug line), so a
text cut before it was masked would keep 12 or more characters of the key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy.config import ErrorLogging
from first_hop_proxy.logs.error_log import ErrorEvent, format_error_log

from .conftest import StartProxy, chat_body
from .fake_upstream import FakeUpstream, Json, Sse
from .keys import assert_no_leak, random_key
from .leak_helpers import Outputs
from .log_helpers import error_logs


@pytest.mark.timeout(60)
async def test_cut_texts_keep_no_stump_of_a_key(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    key = random_key("sk-test-")
    client_key = random_key("cl-", 45)  # not key-shaped: only exact masking knows it
    proxy = await start_proxy(
        {
            "target_proxy": {"headers": {"Authorization": f"Bearer {key}"}},
            "server": {"debug": True},
            "error_handling": {
                "max_retries": 1,
                "base_delay": 0.4,
                "max_delay": 0.4,
                "stream_keepalive_seconds": 0.1,
            },
            "circuit_breaker": {"enabled": False},
        }
    )
    out = Outputs()

    async def chat(body: dict[str, Any]) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                proxy.url + "/v1/chat/completions",
                data=orjson.dumps(body),
                headers={"Content-Type": "application/json", "X-Api-Key": client_key},
            ) as resp,
        ):
            out.add(f"client body {resp.status}", await resp.read())
            return resp.status

    # A 200 text/html reply of 84 characters and then the key: the quoted snippet is 100.
    html = Json(200, "x" * 84 + key, headers={"Content-Type": "text/html"})
    upstream.queue(html, html)
    assert await chat(chat_body()) == 502
    # The client's own key where the 300-character upstream message is cut.
    said = Json(503, {"error": {"message": "y" * 270 + client_key}})
    upstream.queue(said, said)
    assert await chat(chat_body()) == 503
    # A stream whose retry waits long enough for a keep-alive comment quoting the
    # last error, cut at 60 characters: the client's key begins at 40.
    upstream.queue(Json(503, {"error": {"message": "z" * 40 + client_key}}), Sse())
    assert await chat(chat_body(stream=True)) == 200

    stream_text = out.texts["client body 200"]
    assert ": retrying, attempt 2 of at most 2, last error 503 (zzzz" in stream_text
    assert upstream.calls == 6
    await out.gather([proxy], tmp_path, caplog, capsys)
    # The texts are there, masked: nothing was dropped to hide the key.
    assert "not valid JSON: " + "x" * 84 + "sk-…" in out.texts["client body 502"]
    assert "Upstream said: " + "y" * 270 + "cl-…" in out.texts["client body 503"]
    assert error_logs(tmp_path / "logs" / "errors", "invalid_json")
    assert out.leaks({"upstream key": key, "client key": client_key}) == {}


def test_error_log_cut_to_its_size_limit_keeps_no_stump() -> None:
    """An error log over max_file_size_mb is cut after its texts were masked."""
    key = random_key("sk-test-")
    cfg = ErrorLogging(max_file_size_mb=0.002, include_stack_traces=False)
    for at in range(0, 2600, 13):  # the key at every place a cut can fall
        event = ErrorEvent(503, "UpstreamError", "x" * (at % 300) + key, secrets=[key])
        event.response_text = "y" * at + key + "z" * 3000
        text = format_error_log(event, cfg, "503_x.log")
        assert len(text.encode()) <= 0.002 * 1024 * 1024
        assert_no_leak(text, key)
