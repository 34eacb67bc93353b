"""``HEAD /v1/models`` is answered from what the proxy knows, without an upstream call."""

from __future__ import annotations

import aiohttp
import pytest

from .conftest import StartProxy
from .fake_upstream import FakeUpstream


@pytest.mark.parametrize("path", ["/v1/models", "/models", "/v1//models"])
async def test_head_models_makes_no_upstream_call(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, path: str
) -> None:
    proxy = await start_proxy()
    async with client.head(proxy.url + path) as resp:
        assert resp.status == 200
        assert resp.headers["X-Models-Source"] == "default"
        assert resp.content_type == "application/json"
        assert await resp.read() == b""
    assert upstream.received == []
    async with client.get(proxy.url + path) as resp:
        assert resp.headers["X-Models-Source"] == "upstream"
        listed = await resp.read()
    async with client.head(proxy.url + path) as resp:
        assert resp.status == 200
        assert resp.headers["X-Models-Source"] == "cache"
        assert int(resp.headers["Content-Length"]) == len(listed)
    assert [r.path for r in upstream.received] == ["/v1/models"]
