"""The log endpoints through the real proxy, traversal attempts, and config errors at start-up."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import orjson
import pytest

from first_hop_proxy import cli
from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body, raw_request
from .fake_upstream import FakeUpstream, Json
from .log_helpers import error_details, error_logs, request_logs, settle

PASSWD = Path("/etc/passwd")


@pytest.fixture
async def busy_proxy(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> tuple[RunningServer, list[str]]:
    """A proxy that served three requests: 503 then 200, 200, and a bad request."""
    proxy = await start_proxy()
    upstream.queue(Json(503), Json(200))
    ids = []
    for body in (orjson.dumps(chat_body()), orjson.dumps(chat_body()), b"{oops"):
        async with client.post(proxy.url + "/v1/chat/completions", data=body) as resp:
            ids.append(resp.headers["X-Request-ID"])
    await settle(proxy)
    return proxy, ids


async def get_json(client: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with client.get(url) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


def assert_local_time_with_offset(text: str) -> None:
    """An ISO 8601 time that names its UTC offset, so it means one instant (just now)."""
    when = datetime.fromisoformat(text)
    assert when.utcoffset() is not None, text
    assert when.utcoffset() == datetime.now().astimezone().utcoffset()
    assert abs(when - datetime.now(UTC)) < timedelta(minutes=5)


async def test_errors_summary(
    busy_proxy: tuple[RunningServer, list[str]], client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy, _ = busy_proxy
    status, body = await get_json(client, proxy.url + "/logs/errors")
    assert status == 200 and isinstance(body, dict)
    on_disk = error_logs(tmp_path / "logs" / "errors")
    assert body["enabled"] is True
    assert body["since_start"]["errors"] == 2
    assert body["since_start"]["by_code"] == {"503": 1, "bad_request": 1}
    assert (
        sum(body["since_start"]["by_type"].values()) == 2
        and "BadRequest" in body["since_start"]["by_type"]
    )
    assert body["on_disk"]["files"] == 2
    assert body["on_disk"]["size_bytes"] == sum(p.stat().st_size for p in on_disk)
    assert body["on_disk"]["by_code"] == {"503": 1, "bad_request": 1}
    files = body["files"]
    assert {f["name"] for f in files} == {p.name for p in on_disk}
    assert [f["code"] for f in files] == ["bad_request", "503"]  # newest first
    for f in files:
        assert f["size"] == (tmp_path / "logs" / "errors" / f["name"]).stat().st_size
        assert_local_time_with_offset(f["time"])
    status, limited = await get_json(client, proxy.url + "/logs/errors?limit=1")
    assert isinstance(limited, dict) and [f["code"] for f in limited["files"]] == ["bad_request"]
    assert limited["on_disk"]["files"] == 2
    for bad in ("0", "-3", "many"):
        status, error = await get_json(client, proxy.url + f"/logs/errors?limit={bad}")
        assert status == 400 and isinstance(error, dict) and "limit" in error["error"]["message"]


async def test_one_error_file(
    busy_proxy: tuple[RunningServer, list[str]], client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy, ids = busy_proxy
    for path in error_logs(tmp_path / "logs" / "errors"):
        async with client.get(f"{proxy.url}/logs/errors/{path.name}") as resp:
            assert resp.status == 200 and resp.content_type == "text/plain"
            assert await resp.read() == path.read_bytes()
            assert error_details(path.read_text())["request_id"] in ids
    status, body = await get_json(client, proxy.url + "/logs/errors/503_20000101_000000_000.log")
    assert status == 404 and isinstance(body, dict) and body["error"]["code"] == "log_not_found"


async def test_request_list_and_one_request(
    busy_proxy: tuple[RunningServer, list[str]], client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy, ids = busy_proxy
    status, body = await get_json(client, proxy.url + "/logs/requests")
    assert status == 200 and isinstance(body, dict)
    entries = body["requests"]
    assert [e["id"] for e in entries] == ids[::-1]
    first, second, bad = entries[2], entries[1], entries[0]
    assert (first["status"], first["attempts"]) == (200, 2)
    assert (second["status"], second["attempts"]) == (200, 1)
    assert (bad["status"], bad["attempts"]) == (400, 0)
    for e in entries:
        assert isinstance(e["duration"], float) and e["duration"] >= 0
        assert_local_time_with_offset(e["time"])
    status, limited = await get_json(client, proxy.url + "/logs/requests?limit=2")
    assert isinstance(limited, dict) and [e["id"] for e in limited["requests"]] == ids[:0:-1]
    files = request_logs(tmp_path / "logs")
    for rid in ids:
        async with client.get(f"{proxy.url}/logs/requests/{rid}") as resp:
            assert resp.status == 200
            assert await resp.read() == files[rid].read_bytes()
    status, missing = await get_json(client, proxy.url + "/logs/requests/abcdef123456")
    assert status == 404 and isinstance(missing, dict) and "error" in missing


async def test_request_list_survives_restart(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    first = await start_proxy()
    async with client.post(first.url + "/v1/chat/completions", json=chat_body()) as resp:
        rid = resp.headers["X-Request-ID"]
    await settle(first)
    await first.close()
    second = await start_proxy()
    await settle(second)
    status, body = await get_json(client, second.url + "/logs/requests")
    assert status == 200 and isinstance(body, dict)
    assert [e["id"] for e in body["requests"]] == [rid]
    assert body["requests"][0]["status"] == 200
    assert_local_time_with_offset(body["requests"][0]["time"])  # read back from the file name
    async with client.get(f"{second.url}/logs/requests/{rid}") as resp:
        assert resp.status == 200 and f"Request ID: {rid}" in await resp.text()


TRAVERSALS = [
    "/logs/errors/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/logs/errors/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/logs/errors/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/logs/errors/%2Fetc%2Fpasswd",
    "/logs/errors/%2fetc%2fpasswd.log",
    "/logs/errors/..%5C..%5Cetc%5Cpasswd",
    "/logs/errors/....%2F%2F....%2F%2Fetc%2Fpasswd",
    "/logs/errors/..",
    "/logs/errors/%2e%2e",
    "/logs/errors/passwd%00.log",
    "/logs/errors//etc/passwd",
    "/logs/errors/../../../../etc/passwd",
    "/logs/errors/%252e%252e%252fetc%252fpasswd",
    "/logs/requests/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/logs/requests/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/logs/requests/%2Fetc%2Fpasswd",
    "/logs/requests/..",
    "/logs/requests/../../../../etc/passwd",
    "/logs/requests/%2e%2e%2ferrors",
]


@pytest.mark.parametrize("path", TRAVERSALS)
async def test_traversal_refused_with_json(
    busy_proxy: tuple[RunningServer, list[str]], path: str
) -> None:
    proxy, _ = busy_proxy
    resp = await raw_request(proxy.port, "GET", path)
    assert 400 <= resp.status < 500, (path, resp.status)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json
    assert isinstance(body, dict) and set(body) == {"error"}
    assert b"root:" not in resp.body and b"ERROR LOG" not in resp.body


async def test_traversal_to_a_real_log_outside_the_folder_refused(
    busy_proxy: tuple[RunningServer, list[str]], tmp_path: Path
) -> None:
    """The request logs' folder is the parent of the error folder: still out of reach."""
    proxy, ids = busy_proxy
    name = request_logs(tmp_path / "logs")[ids[0]].name
    for path in (f"/logs/errors/..%2F{name}", f"/logs/errors/%2e%2e%2f{name}"):
        resp = await raw_request(proxy.port, "GET", path)
        assert resp.status in (400, 404) and b"UNIFIED REQUEST LOG" not in resp.body


@pytest.mark.skipif(not PASSWD.is_file(), reason="needs /etc/passwd")
async def test_symlinks_inside_the_folders_never_followed(
    start_proxy: StartProxy, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    errors = tmp_path / "logs" / "errors"
    errors.mkdir(parents=True)
    (errors / "503_20240101_000000_000.log").symlink_to(PASSWD)
    os.symlink(PASSWD, tmp_path / "logs" / "20240101_000000_000_evil.log")
    proxy = await start_proxy()
    await settle(proxy)
    async with client.get(proxy.url + "/logs/errors/503_20240101_000000_000.log") as resp:
        assert resp.status == 404 and resp.content_type == "application/json"
        assert b"root:" not in await resp.read()
    async with client.get(proxy.url + "/logs/requests/evil") as resp:
        assert resp.status == 404 and resp.content_type == "application/json"
        assert b"root:" not in await resp.read()
    status, summary = await get_json(client, proxy.url + "/logs/errors")
    assert isinstance(summary, dict) and summary["on_disk"]["files"] == 0
    status, listing = await get_json(client, proxy.url + "/logs/requests")
    assert status == 200 and isinstance(listing, dict) and listing["requests"] == []
    assert PASSWD.is_file()  # never pruned or rotated through the link


# --- config errors at start-up --------------------------------------------------------------


def test_broken_config_logged_at_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-test-" + "Ab3" * 14
    config = tmp_path / "config.yaml"
    config.write_text(
        "target_proxy:\n"
        "  url: http://127.0.0.1:9/v1/chat/completions\n"
        f"  headers: 'Bearer {key}'\n"
        "error_handling:\n"
        "  max_retries: lots\n"
    )
    monkeypatch.chdir(tmp_path.parent)  # not the config's folder
    assert cli.main(["--config", str(config)]) == 1
    [path] = error_logs(tmp_path / "logs" / "errors", "config_error")
    text = path.read_text()
    details = error_details(text)
    assert details["error_type"] == "ConfigError"
    problems = details["context"]["problems"]
    assert any("max_retries" in p for p in problems)
    assert any("target_proxy.headers" in p for p in problems)
    err = capsys.readouterr().err
    assert "max_retries" in err and str(path) in err
    for output in (text, err):
        assert key[:12] not in output and key[-12:] not in output


def test_missing_config_file_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--config", str(tmp_path / "nope.yaml")]) == 1
    assert not (tmp_path / "logs").exists()
    assert "nope.yaml" in capsys.readouterr().err


def test_check_config_does_not_write_error_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("error_handling:\n  max_retries: lots\n")
    assert cli.main(["check-config", "--config", str(config)]) == 1
    assert not (tmp_path / "logs").exists()
