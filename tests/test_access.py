"""The admin side is locked and the chat side keeps working: real HTTP against the real proxy.

The dashboard's routes and /metrics are admin routes like /logs: the guard (Host,
Origin, no CORS) covers them, and they need the admin token once one is in force
(configured, or generated when the proxy listens beyond loopback). server.api_keys
locks the chat endpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest

from first_hop_proxy import access
from first_hop_proxy.config import parse_config
from first_hop_proxy.guard import is_admin_path
from first_hop_proxy.server import RunningServer, start

from .conftest import StartProxy, chat_body, raw_request
from .fake_upstream import FakeUpstream
from .log_helpers import error_logs, settle, state_of

TOKEN = "admin-token-0123456789abcdef"
WRONG = "wrong-token-9876543210zyxwvu"
CLIENT_KEY = "client-key-0123456789abcdef"
ADMIN_DATA = ["/dashboard/api/health", "/dashboard/api/config", "/metrics", "/logs/requests"]
ADMIN_DATA += ["/logs/errors", "/dashboard/api/errors", "/health/detailed", "/usage"]
DASHBOARD = ["/", "/dashboard", "/dashboard/static/app.js", "/dashboard/api/events"]
DASHBOARD += ["/dashboard/api/health", "/dashboard/api/config", "/dashboard/api/errors"]
DASHBOARD += ["/dashboard/api/requests/abc", "/metrics"]
FOREIGN = "http://evil.example"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def status_of(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, object] | None]:
    async with client.get(url, headers=headers or {}) as resp:
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, dict(resp.headers), body


def test_every_dashboard_route_is_an_admin_route(proxy: RunningServer) -> None:
    """Whatever reads logs, figures or the config is registered under an admin path."""
    public = {"/health"}
    for resource in proxy.runner.app.router.resources():
        path = resource.canonical
        if path.startswith("/__demo__") or path.endswith(("/chat/completions", "/models")):
            continue
        assert path in public or is_admin_path(path), path
    assert all(is_admin_path(path) for path in DASHBOARD)


@pytest.mark.parametrize("path", [p for p in DASHBOARD if p != "/dashboard/api/events"])
async def test_the_guard_covers_the_dashboard(start_proxy: StartProxy, path: str) -> None:
    star = await start_proxy({"server": {"cors_origins": ["*"]}})
    foreign_host = await raw_request(star.port, "GET", path, headers={"Host": "evil.example"})
    assert foreign_host.status == 421
    # '*' lets any page send chats, but never gives an admin page CORS headers.
    answer = await raw_request(star.port, "GET", path, headers={"Origin": FOREIGN})
    assert answer.status != 403
    assert "access-control-allow-origin" not in answer.headers
    strict = await start_proxy()
    for headers in ({"Origin": FOREIGN}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        refused = await raw_request(strict.port, "GET", path, headers=headers)
        assert refused.status == 403, (path, headers)
        assert refused.json["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in refused.headers


async def test_the_guard_covers_the_event_stream(
    proxy: RunningServer, client: aiohttp.ClientSession
) -> None:
    url = proxy.url + "/dashboard/api/events"
    for headers in (
        {"Origin": FOREIGN},
        {"Sec-Fetch-Site": "cross-site"},
        {"Host": "evil.example"},
    ):
        async with client.get(url, headers=headers) as resp:
            assert resp.status in (403, 421), headers
            assert "Access-Control-Allow-Origin" not in resp.headers


async def test_loopback_without_token_is_open_to_the_proxys_own_page(
    proxy: RunningServer, client: aiohttp.ClientSession
) -> None:
    for path in ADMIN_DATA:
        for headers in ({}, {"Origin": proxy.url}, {"Sec-Fetch-Site": "same-origin"}):
            status, answer, _ = await status_of(client, proxy.url + path, headers)
            assert status == 200, (path, headers)
            assert "Access-Control-Allow-Origin" not in answer


async def test_configured_token_is_required_and_refusals_are_logged(
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await start_proxy({"server": {"admin_token": TOKEN}})
    caplog.set_level(logging.WARNING, logger="first_hop_proxy")
    for path in ADMIN_DATA:
        status, headers, body = await status_of(client, proxy.url + path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert body is not None
        error = body["error"]
        assert error["code"] == "admin_token_missing"  # type: ignore[index]
        assert "server.admin_token" in error["message"]  # type: ignore[index]
        status, _, body = await status_of(client, proxy.url + path, bearer(WRONG))
        assert status == 401
        assert body is not None and body["error"]["code"] == "admin_token_wrong"  # type: ignore[index]
        status, _, _ = await status_of(client, proxy.url + path, bearer(TOKEN))
        assert status == 200, path
    # The page shell and its files hold no data: they load, then ask for the token.
    for path in ["/", "/dashboard", "/dashboard/static/app.js", "/dashboard/static/style.css"]:
        status, headers, _ = await status_of(client, proxy.url + path)
        assert status == 200, path
        assert "default-src 'none'" in headers["Content-Security-Policy"]
    async with client.get(proxy.url + "/dashboard/api/events") as resp:
        assert resp.status == 401
    # Chat on loopback is not affected by the admin token.
    async with client.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200

    await settle(proxy)
    folder = tmp_path / "logs" / "errors"
    data_routes = len(ADMIN_DATA)
    assert len(error_logs(folder, "admin_token_missing")) == data_routes + 1  # and the stream
    wrong = error_logs(folder, "admin_token_wrong")
    assert len(wrong) == data_routes
    assert "/metrics" in "".join(p.read_text() for p in wrong)
    everything = "".join(p.read_text() for p in folder.iterdir()) + caplog.text
    assert WRONG not in everything and TOKEN not in everything
    assert "refused GET /metrics" in caplog.text
    assert state_of(proxy).stats.refusals["admin_token_wrong"] == data_routes


async def test_token_from_the_environment(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(env={"FHP_ADMIN_TOKEN": TOKEN})
    assert (await status_of(client, proxy.url + "/metrics"))[0] == 401
    assert (await status_of(client, proxy.url + "/metrics", bearer(TOKEN)))[0] == 200


async def test_beyond_loopback_a_token_is_generated(
    start_proxy: StartProxy, client: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy({"server": {"host": "0.0.0.0"}})
    assert proxy.host == "127.0.0.1"  # the fixture binds loopback: the decision is per host
    assert not state_of(proxy).access.generated
    loaded = parse_config(
        {"target_proxy": {"url": upstream.chat_url}, "logging": {"enabled": False}},
        base_dir=Path.cwd(),
        env={},
    )
    wide = await start(loaded, "0.0.0.0", 0)
    try:
        url = f"http://127.0.0.1:{wide.port}"
        found = state_of(wide).access
        assert found.generated and found.admin_token and len(found.admin_token) >= 32
        assert (await status_of(client, url + "/metrics"))[0] == 401
        assert (await status_of(client, url + "/logs/requests"))[0] == 401
        assert (await status_of(client, url + "/metrics", bearer(found.admin_token)))[0] == 200
        # SillyTavern, without any key, chats exactly as before.
        headers = {"Authorization": "Bearer undefined"}
        async with client.post(
            url + "/v1/chat/completions", json=chat_body(), headers=headers
        ) as r:
            assert r.status == 200
        async with client.get(url + "/v1/models") as resp:
            assert resp.status == 200
    finally:
        await wide.close()


def test_a_config_reload_keeps_a_generated_token() -> None:
    """The person was told the generated token once: a reload must not change it."""
    wide = parse_config({}, base_dir=Path.cwd(), env={}).config.server
    first = access.Access.from_config(wide, "0.0.0.0")
    assert first.generated and first.admin_token
    again = access.Access.from_config(wide, "0.0.0.0", first)
    assert again.admin_token == first.admin_token
    configured = parse_config({"server": {"admin_token": TOKEN}}, base_dir=Path.cwd(), env={})
    chosen = access.Access.from_config(configured.config.server, "0.0.0.0", first)
    assert chosen.admin_token == TOKEN and not chosen.generated
    assert access.Access.from_config(wide, "127.0.0.1").admin_token is None


async def test_api_keys_lock_the_chat_endpoints(
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    upstream: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await start_proxy(
        {
            "server": {"api_keys": [CLIENT_KEY]},
            "target_proxy": {"headers": {"Authorization": "Bearer sk-upstream-0123456789abcd"}},
        }
    )
    url = proxy.url + "/v1/chat/completions"
    for headers, code in [
        ({}, "api_key_missing"),
        ({"Authorization": "Bearer undefined"}, "api_key_missing"),  # SillyTavern, no key
        ({"Authorization": "Bearer "}, "api_key_missing"),
        (bearer(WRONG), "api_key_wrong"),
    ]:
        async with client.post(url, json=chat_body(), headers=headers) as resp:
            assert resp.status == 401
            body = await resp.json()
            assert body["error"]["code"] == code
            assert "server.api_keys" in body["error"]["message"]
    async with client.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 401
    assert upstream.calls == 0

    async with client.post(url, json=chat_body(), headers=bearer(CLIENT_KEY)) as resp:
        assert resp.status == 200
    async with client.post(url, json=chat_body(), headers={"X-API-Key": CLIENT_KEY}) as resp:
        assert resp.status == 200
    async with client.get(proxy.url + "/v1/models", headers=bearer(CLIENT_KEY)) as resp:
        assert resp.status == 200
    # The client key is the proxy's: the upstream gets the configured key, never the client's.
    for received in upstream.received:
        assert CLIENT_KEY not in str(received.headers)
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-upstream-0123456789abcd"

    await settle(proxy)
    folder = tmp_path / "logs"
    written = "".join(p.read_text() for p in folder.rglob("*.log")) + caplog.text
    assert WRONG not in written and CLIENT_KEY not in written
    assert len(error_logs(folder / "errors", "api_key_wrong")) == 1


async def test_api_keys_without_an_upstream_key_forward_nothing(
    start_proxy: StartProxy, client: aiohttp.ClientSession, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy({"server": {"api_keys": [CLIENT_KEY]}})
    url = proxy.url + "/v1/chat/completions"
    async with client.post(url, json=chat_body(), headers=bearer(CLIENT_KEY)) as resp:
        assert resp.status == 200
    assert "Authorization" not in upstream.received[0].headers


async def test_without_api_keys_the_client_key_still_goes_upstream(
    proxy: RunningServer, upstream: FakeUpstream
) -> None:
    """On loopback, with nothing configured, chat works exactly as before."""
    body = b'{"model": "m", "messages": []}'
    headers = {"Authorization": "Bearer sk-client-0123456789abcd"}
    resp = await raw_request(proxy.port, "POST", "/v1/chat/completions", body, headers)
    assert resp.status == 200
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-client-0123456789abcd"


async def test_a_flood_of_refusals_cannot_flush_the_error_log(
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1_800_000_000.0]
    monkeypatch.setattr(access.time, "time", lambda: now[0])
    proxy = await start_proxy({"server": {"admin_token": TOKEN}})
    for _ in range(access.REFUSAL_LOGS_PER_MINUTE + 15):
        assert (await status_of(client, proxy.url + "/metrics", bearer(WRONG)))[0] == 401
    now[0] += 60
    assert (await status_of(client, proxy.url + "/metrics", bearer(WRONG)))[0] == 401
    await settle(proxy)
    folder = tmp_path / "logs" / "errors"
    assert len(error_logs(folder, "admin_token_wrong")) == access.REFUSAL_LOGS_PER_MINUTE + 1
    [summary] = error_logs(folder, "refused")
    assert "15 more refused requests" in summary.read_text()
    assert (
        state_of(proxy).stats.refusals["admin_token_wrong"] == access.REFUSAL_LOGS_PER_MINUTE + 16
    )
