"""No web page the person visits can use the proxy: Host, Origin and CORS, over real HTTP.

Requests are written byte for byte (``raw_request``) so that the Host header is
exactly what a browser under DNS rebinding, or a hostile page, would send.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from first_hop_proxy.config import parse_config
from first_hop_proxy.guard import Guard, host_name

from .conftest import RawResponse, StartProxy, chat_body, raw_request
from .fake_upstream import FakeUpstream
from .log_helpers import error_logs, settle, state_of

CHAT = orjson.dumps(chat_body())
JSON = {"Content-Type": "application/json"}
PROTECTED = [
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/logs/requests"),
    ("GET", "/logs/requests/abc"),
    ("GET", "/logs/errors"),
    ("GET", "/health/detailed"),
]


async def ask(port: int, method: str, path: str, **headers: str) -> RawResponse:
    body = CHAT if method == "POST" else b""
    return await raw_request(port, method, path, body, {**JSON, **headers})


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_foreign_page_is_refused(
    start_proxy: StartProxy, upstream: FakeUpstream, method: str, path: str
) -> None:
    proxy = await start_proxy()
    answer = await ask(proxy.port, method, path, Origin="https://evil.example")
    assert answer.status == 403
    error = answer.json["error"]
    assert error["code"] == "origin_not_allowed"
    assert "server.cors_origins" in error["message"]
    assert "access-control-allow-origin" not in answer.headers
    assert upstream.calls == 0 and not upstream.received


async def test_simple_form_post_is_refused_too(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """A "simple" request needs no preflight, so the refusal must come before the handler."""
    proxy = await start_proxy()
    headers = {"Origin": "null", "Content-Type": "text/plain"}
    answer = await raw_request(proxy.port, "POST", "/v1/chat/completions", CHAT, headers)
    assert answer.status == 403
    assert upstream.calls == 0


async def test_cross_site_get_without_origin_is_refused(start_proxy: StartProxy) -> None:
    """Browsers send no Origin on a plain GET (an <img> or <script> tag): Sec-Fetch-Site tells."""
    proxy = await start_proxy()
    answer = await ask(proxy.port, "GET", "/logs/requests", **{"Sec-Fetch-Site": "cross-site"})
    assert answer.status == 403
    typed = await ask(proxy.port, "GET", "/logs/requests", **{"Sec-Fetch-Site": "none"})
    assert typed.status == 200


async def test_clients_without_origin_and_the_proxys_own_pages_pass(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy()
    for method, path in PROTECTED[:3]:
        assert (await ask(proxy.port, method, path)).status == 200
    own = f"http://127.0.0.1:{proxy.port}"
    answer = await ask(proxy.port, "GET", "/logs/requests", Origin=own)
    assert answer.status == 200
    assert "access-control-allow-origin" not in answer.headers
    assert (await ask(proxy.port, "GET", "/health", Origin="https://evil.example")).status == 200


async def test_no_cors_headers_by_default(start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    own = f"http://127.0.0.1:{proxy.port}"
    answer = await ask(proxy.port, "POST", "/v1/chat/completions", Origin=own)
    assert answer.status == 200
    assert "access-control-allow-origin" not in answer.headers


async def test_preflight_from_a_foreign_page_is_refused(start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    answer = await raw_request(proxy.port, "OPTIONS", "/v1/chat/completions", b"", headers)
    assert answer.status == 403
    assert "access-control-allow-origin" not in answer.headers


async def test_listed_origin_gets_cors_but_never_on_admin_pages(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"server": {"cors_origins": ["https://my.tool/"]}})
    origin = {"Origin": "https://my.tool"}
    chat = await ask(proxy.port, "POST", "/v1/chat/completions", **origin)
    assert chat.status == 200
    assert chat.headers["access-control-allow-origin"] == "https://my.tool"
    assert "X-Request-ID" in chat.headers["access-control-expose-headers"]
    headers = {**origin, "Access-Control-Request-Method": "POST"}
    pre = await raw_request(proxy.port, "OPTIONS", "/v1/chat/completions", b"", headers)
    assert pre.status == 204
    assert pre.headers["access-control-allow-origin"] == "https://my.tool"
    for path in ("/logs/requests", "/logs/errors", "/health/detailed"):
        answer = await ask(proxy.port, "GET", path, **origin)
        assert answer.status == 200
        assert "access-control-allow-origin" not in answer.headers, path
    other = await ask(proxy.port, "POST", "/v1/chat/completions", Origin="https://other.tool")
    assert other.status == 403


async def test_star_allows_any_page_but_not_the_admin_pages(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"server": {"cors_origins": ["*"]}})
    chat = await ask(proxy.port, "POST", "/v1/chat/completions", Origin="https://any.where")
    assert chat.headers["access-control-allow-origin"] == "*"
    logs = await ask(proxy.port, "GET", "/logs/requests", Origin="https://any.where")
    assert "access-control-allow-origin" not in logs.headers


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.nip.io"])
async def test_foreign_host_is_refused(
    start_proxy: StartProxy, upstream: FakeUpstream, host: str
) -> None:
    """DNS rebinding: a hostile name resolving to 127.0.0.1 arrives with its own Host."""
    proxy = await start_proxy()
    for method, path in [*PROTECTED, ("GET", "/health")]:
        answer = await ask(proxy.port, method, path, Host=host)
        assert answer.status == 421, path
        assert answer.json["error"]["code"] == "host_not_allowed"
        assert "server.allowed_hosts" in answer.json["error"]["message"]
    assert upstream.calls == 0


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:1", "127.0.0.1", "[::1]:80", "a.localhost"]
)
async def test_own_hosts_pass(start_proxy: StartProxy, host: str) -> None:
    proxy = await start_proxy()
    assert (await ask(proxy.port, "GET", "/health", Host=host)).status == 200


async def test_allowed_hosts_extend_the_list(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"server": {"allowed_hosts": ["proxy.home.arpa"]}})
    answer = await ask(proxy.port, "GET", "/v1/models", Host="proxy.home.arpa:8765")
    assert answer.status == 200
    assert (await ask(proxy.port, "GET", "/v1/models", Host="other.home.arpa")).status == 421


async def test_refusals_are_error_logged(start_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = await start_proxy()
    await ask(proxy.port, "GET", "/logs/errors", Origin="https://evil.example")
    await ask(proxy.port, "GET", "/health", Host="evil.example")
    await settle(proxy)
    folder = tmp_path / "logs" / "errors"
    assert len(error_logs(folder, "origin_not_allowed")) == 1
    assert len(error_logs(folder, "host_not_allowed")) == 1
    assert state_of(proxy).error_log.status()["by_code"]["origin_not_allowed"] == 1


def test_check_config_warns_about_star() -> None:
    loaded = parse_config({"server": {"cors_origins": ["*"]}}, base_dir=Path.cwd(), env={})
    assert any(w.startswith("server.cors_origins: '*'") for w in loaded.warnings)
    assert parse_config({}, base_dir=Path.cwd(), env={}).config.server.cors_origins == []


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:8765", "127.0.0.1"),
        ("[::1]:8765", "::1"),
        ("[::1]", "::1"),
        ("LocalHost.", "localhost"),
        ("::1", "::1"),
        ("Example.COM:443", "example.com"),
    ],
)
def test_host_name(header: str, name: str) -> None:
    assert host_name(header) == name


def test_listening_beyond_loopback_admits_the_machine_name() -> None:
    import socket

    config = parse_config({"server": {"host": "0.0.0.0"}}, base_dir=Path.cwd(), env={}).config
    guard = Guard.from_config(config.server)
    name = socket.gethostname()
    assert guard.host_allowed(f"{name}:8765")
    assert guard.host_allowed("192.168.1.20:8765")
    assert not guard.host_allowed("evil.example")


def test_host_check_is_remembered_per_host_and_still_exact() -> None:
    guard = Guard(frozenset({"my-pc"}), frozenset())
    for _ in range(3):
        assert guard.host_allowed("127.0.0.1:5000")
        assert guard.host_allowed("[::1]:5000")
        assert guard.host_allowed("LocalHost.")
        assert guard.host_allowed("my-pc:5000")
        assert not guard.host_allowed("evil.example:5000")
    for n in range(500):  # many hosts: answers stay right, the memory bounded
        assert not guard.host_allowed(f"rebind{n}.example")
