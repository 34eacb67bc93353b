"""``HEAD /v1/models`` is answered from what the proxy knows, without an upstream call."""

from __future__ import annotations

import aiohttp
import pytest

from .conftest import StartProxy
from .fake_upstream import FakeUpstream, Json


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


async def test_head_models_with_several_upstreams_asks_none_of_them(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    second = await FakeUpstream().start()
    try:
        second.models = Json(body={"object": "list", "data": [{"id": "other-model"}]})
        proxy = await start_proxy(
            {
                "target_proxy": {"url": ""},
                "upstreams": [
                    {"name": "a", "url": upstream.chat_url},
                    {"name": "b", "url": second.chat_url},
                ],
            }
        )
        async with client.head(proxy.url + "/v1/models") as resp:
            assert resp.headers["X-Models-Source"] == "default"
        async with client.get(proxy.url + "/v1/models") as resp:
            listed = await resp.read()
            assert resp.headers["X-Models-Source"] == "upstream"
        async with client.head(proxy.url + "/v1/models") as resp:
            assert resp.headers["X-Models-Source"] == "cache"
            assert int(resp.headers["Content-Length"]) == len(listed)
        assert len(upstream.received) == len(second.received) == 1
    finally:
        await second.close()
