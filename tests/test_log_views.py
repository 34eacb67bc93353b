"""The /logs endpoints over a real aiohttp server on 127.0.0.1, including traversal attempts."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from first_hop_proxy.config import ErrorLogging, Logging
from first_hop_proxy.logs.error_log import ErrorEvent, ErrorLog
from first_hop_proxy.logs.request_log import RequestLog, RequestRecord
from first_hop_proxy.logs.views import add_log_routes, logging_status
from first_hop_proxy.logs.writer import LogWriter


@dataclass
class Logs:
    client: TestClient[web.Request, web.Application]
    writer: LogWriter
    request_log: RequestLog
    error_log: ErrorLog
    folder: Path


@pytest.fixture
async def logs(tmp_path: Path) -> AsyncIterator[Logs]:
    writer = LogWriter()
    request_log = RequestLog(Logging(folder=str(tmp_path / "logs")), writer)
    error_log = ErrorLog(ErrorLogging(folder=str(tmp_path / "logs" / "errors")), writer)
    app = web.Application()
    add_log_routes(app, lambda: (request_log, error_log))
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    yield Logs(client, writer, request_log, error_log, tmp_path / "logs")
    await client.close()
    await writer.close()


async def raw_get(logs: Logs, target: str) -> tuple[int, bytes]:
    """Send ``GET target`` byte for byte, so no client library normalizes the path."""
    server = logs.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def fill(logs: Logs) -> None:
    for n in range(3):
        record = RequestRecord(request_id=f"req-{n}", endpoint="/chat/completions")
        record.add_attempt(status=200)
        record.finish(200)
        logs.request_log.write(record)
    logs.error_log.log(ErrorEvent(503, "HTTPResponse", "HTTP 503", status_code=503))
    logs.error_log.log(ErrorEvent("timeout", "TimeoutError", "timed out"))
    await logs.writer.drain()


class TestErrors:
    async def test_summary(self, logs: Logs) -> None:
        await fill(logs)
        resp = await logs.client.get("/logs/errors")
        assert resp.status == 200
        data = await resp.json()
        assert data["since_start"]["errors"] == 2
        assert data["since_start"]["by_code"] == {"503": 1, "timeout": 1}
        assert data["since_start"]["by_type"] == {"HTTPResponse": 1, "TimeoutError": 1}
        assert data["on_disk"]["files"] == 2
        assert data["on_disk"]["size_bytes"] == sum(
            p.stat().st_size for p in (logs.folder / "errors").iterdir()
        )
        assert {f["code"] for f in data["files"]} == {"503", "timeout"}
        assert set(data["files"][0]) == {"name", "size", "time", "code"}

    async def test_limit(self, logs: Logs) -> None:
        await fill(logs)
        data = await (await logs.client.get("/logs/errors?limit=1")).json()
        assert len(data["files"]) == 1 and data["on_disk"]["files"] == 2

    @pytest.mark.parametrize("limit", ["abc", "0", "-3", "1.5", ""])
    async def test_bad_limit(self, logs: Logs, limit: str) -> None:
        for path in ("/logs/errors", "/logs/requests"):
            resp = await logs.client.get(f"{path}?limit={limit}")
            assert resp.status == 400
            error = (await resp.json())["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "invalid_limit"
            assert error["message"]

    async def test_one_file(self, logs: Logs) -> None:
        await fill(logs)
        name = next(p.name for p in (logs.folder / "errors").iterdir() if p.name.startswith("503"))
        resp = await logs.client.get(f"/logs/errors/{name}")
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        assert "Error Code: 503" in await resp.text()

    async def test_unknown_file(self, logs: Logs) -> None:
        resp = await logs.client.get("/logs/errors/503_20240101_000000_000.log")
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "log_not_found"


TRAVERSALS = [
    "/logs/errors/..%2F..%2F..%2Fetc%2Fpasswd",
    "/logs/errors/..%2fsecret.log",
    "/logs/errors/%2e%2e%2Fsecret.log",
    "/logs/errors/%2e%2e",
    "/logs/errors/%2Fetc%2Fpasswd",
    "/logs/errors/..%5Csecret.log",
    "/logs/errors/..\\secret.log",
    "/logs/errors/secret.log%00.log",
    "/logs/errors/../secret.log",
    "/logs/errors/../../../../etc/passwd",
    "/logs/errors//etc/passwd",
    "/logs/errors/.hidden.log",
    "/logs/requests/..%2Fsecret",
    "/logs/requests/%2e%2e%2Fsecret",
    "/logs/requests/..",
    "/logs/requests/%2Fetc%2Fpasswd",
]


class TestTraversal:
    @pytest.mark.parametrize("target", TRAVERSALS)
    async def test_refused(self, logs: Logs, target: str) -> None:
        await fill(logs)
        (logs.folder / "secret.log").write_text("SECRET CONTENT")
        (logs.folder / "errors" / ".hidden.log").write_text("SECRET CONTENT")
        status, body = await raw_get(logs, target)
        assert status in (400, 404), (target, status)
        assert b"SECRET CONTENT" not in body and b"root:" not in body

    async def test_symlink_refused(self, logs: Logs, tmp_path: Path) -> None:
        await fill(logs)
        errors = logs.folder / "errors"
        outside = tmp_path / "outside.txt"
        outside.write_text("SECRET CONTENT")
        os.symlink("/etc/passwd", errors / "503_20240101_000000_000.log")
        os.symlink(outside, errors / "503_20240101_000000_001.log")
        os.symlink(outside, errors / "evil.log")
        for name in (
            "503_20240101_000000_000.log",
            "503_20240101_000000_001.log",
            "evil.log",
        ):
            resp = await logs.client.get(f"/logs/errors/{name}")
            assert resp.status == 404
            body = await resp.read()
            assert b"root:" not in body and b"SECRET" not in body
        data = await (await logs.client.get("/logs/errors")).json()
        assert data["on_disk"]["files"] == 2  # symlinks are not listed either

    async def test_directory_refused(self, logs: Logs) -> None:
        (logs.folder / "errors" / "dir.log").mkdir(parents=True)
        resp = await logs.client.get("/logs/errors/dir.log")
        assert resp.status == 404


class TestRequests:
    async def test_list_newest_first(self, logs: Logs) -> None:
        await fill(logs)
        resp = await logs.client.get("/logs/requests")
        assert resp.status == 200
        data = await resp.json()
        assert [r["id"] for r in data["requests"]] == ["req-2", "req-1", "req-0"]
        first = data["requests"][0]
        assert first["status"] == 200 and first["attempts"] == 1
        assert set(first) == {"id", "time", "status", "attempts", "duration", "file"}
        limited = await (await logs.client.get("/logs/requests?limit=2")).json()
        assert limited["count"] == 2

    async def test_one_request(self, logs: Logs) -> None:
        await fill(logs)
        resp = await logs.client.get("/logs/requests/req-1")
        assert resp.status == 200
        text = await resp.text()
        assert "Request ID: req-1" in text and "LOG COMPLETE" in text

    async def test_unknown_request(self, logs: Logs) -> None:
        resp = await logs.client.get("/logs/requests/nope")
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "invalid_request_error"

    async def test_file_deleted_behind_our_back(self, logs: Logs) -> None:
        await fill(logs)
        path = logs.request_log.path_for("req-0")
        assert path is not None
        path.unlink()
        assert (await logs.client.get("/logs/requests/req-0")).status == 404


async def test_logging_status(logs: Logs) -> None:
    await fill(logs)
    status = logging_status(logs.writer, logs.request_log, logs.error_log)
    assert orjson.loads(orjson.dumps(status)) == status
    assert status["writer"]["written"] == 5 and status["writer"]["failures"] == 0
    assert status["error_log"]["total"] == 2
    assert status["request_log"]["files"] == 3
