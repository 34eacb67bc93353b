"""A client cannot avoid its request log by nesting its body deeply."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from .conftest import StartProxy
from .keys import assert_no_leak, random_key
from .log_helpers import request_logs, section, settle


@pytest.mark.parametrize("depth", [300, 1000])
async def test_deeply_nested_body_is_logged_masked(
    start_proxy: StartProxy, client: aiohttp.ClientSession, tmp_path: Path, depth: int
) -> None:
    """Beyond 255 levels orjson cannot re-encode it; near 1,000 the masking walk
    would exceed Python's recursion limit: logged as sent, masked."""
    proxy = await start_proxy()
    key = random_key("sk-test-")
    nested = "[" * depth + "]" * depth
    messages = f'[{{"role": "user", "content": "key {key}"}}]'
    body = f'{{"model": "fake-model", "messages": {messages}, "api_key": "{key}", "x": {nested}}}'
    async with client.post(
        proxy.url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 200
        request_id = resp.headers["X-Request-ID"]
    await settle(proxy)
    logs = request_logs(tmp_path / "logs")
    assert request_id in logs
    text = logs[request_id].read_text()
    data = section(text, "REQUEST DATA:")
    assert '"messages": [{"role": "user", "content": "key sk-…' in data
    assert nested in data
    assert_no_leak(text, key)


async def test_deeply_nested_body_changed_by_a_rule_gets_a_clear_400(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    rule = {"pattern": "a", "replacement": "b"}
    proxy = await start_proxy({"regex_replacement": {"rules": [rule]}})
    nested = "[" * 300 + "]" * 300
    body = '{"model": "m", "messages": [{"role": "user", "content": "a"}], "x": ' + nested + "}"
    async with client.post(proxy.url + "/v1/chat/completions", data=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "body_too_deep"
    assert "nests more than 255 levels" in error["message"]
