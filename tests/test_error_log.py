"""Error logs: one capped, redacted file per error event, rotated to max_files."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from first_hop_proxy.config import ErrorLogging
from first_hop_proxy.logs.error_log import (
    BANNER,
    RULE,
    ErrorEvent,
    ErrorLog,
    error_file_name,
    format_error_log,
    log_config_error,
    scan_error_files,
)
from first_hop_proxy.logs.writer import LogWriter

from .keys import assert_no_leak, random_key
from .log_helpers import SPEC_DETAIL_KEYS

NAME_RE = re.compile(r"^(?P<code>[a-z0-9_]+)_\d{8}_\d{6}_\d{3}(?:_\d+)?\.log$")


def cfg(tmp_path: Path, **kw: object) -> ErrorLogging:
    return ErrorLogging(folder=str(tmp_path / "errors"), **kw)


def http_event(**kw: Any) -> ErrorEvent:
    fields: dict[str, Any] = {
        "error_code": 503,
        "error_type": "HTTPResponse",
        "error_message": "HTTP 503",
        "status_code": 503,
        "url": "https://target.example/chat/completions",
        "headers": {"Content-Type": "application/json", "Server": "nginx"},
        "response_text": "The model is overloaded.",
        "context": {"request_type": "forward_request"},
        "retry_attempt": 2,
        "retry_delay": 4.0,
        "request_id": "a1b2c3d4",
        "method": "POST",
        "path": "/chat/completions",
        "model": "m",
        "stream": False,
        "client": "127.0.0.1",
        "elapsed": 1.25,
    }
    fields.update(kw)
    return ErrorEvent(**fields)


def details_of(text: str) -> dict[str, object]:
    start = text.index("ERROR DETAILS:\n" + RULE + "\n") + len("ERROR DETAILS:\n" + RULE + "\n")
    end = text.index("\n}\n", start) + 2
    result: dict[str, object] = orjson.loads(text[start:end])
    return result


@pytest.fixture
async def writer() -> AsyncIterator[LogWriter]:
    w = LogWriter()
    yield w
    await w.close()


class TestFormat:
    def test_file_names(self) -> None:
        assert NAME_RE.match(error_file_name(http_event()))
        assert error_file_name(http_event()).startswith("503_")
        name = error_file_name(ErrorEvent("connection_error", "ClientError", "reset"))
        assert NAME_RE.match(name) and name.startswith("connection_error_")
        assert error_file_name(ErrorEvent("../../etc", "X", "y")).startswith("etc_")

    def test_every_section(self, tmp_path: Path) -> None:
        try:
            raise ConnectionResetError("peer went away")
        except ConnectionResetError as exc:
            event = ErrorEvent.from_exception(
                "connection_error", exc, retry_attempt=2, retry_delay=4, method="POST"
            )
        text = format_error_log(event, cfg(tmp_path), "connection_error_x.log")
        lines = text.splitlines()
        assert lines[:3] == [BANNER, lines[1], BANNER] and lines[1].startswith("ERROR LOG - ")
        assert "Error Code: connection_error" in lines
        assert "File: connection_error_x.log" in lines
        assert f"{RULE}\nRETRY ATTEMPT #2\nRetry Delay: 4.00 seconds\n{RULE}" in text
        details = details_of(text)
        assert list(details) == list(SPEC_DETAIL_KEYS)
        assert details["error_type"] == "ConnectionResetError"
        assert details["error_message"] == "peer went away"
        assert "STACK TRACE:" in text and "raise ConnectionResetError" in text
        assert "REQUEST CONTEXT:" in text and '"method": "POST"' in text
        assert "TIMING INFORMATION:" in text

    def test_http_details(self, tmp_path: Path) -> None:
        details = details_of(format_error_log(http_event(), cfg(tmp_path), "503_x.log"))
        assert details["status_code"] == 503
        assert details["status_text"] == "Service Unavailable"
        assert details["response_text"] == "The model is overloaded."
        assert details["retry_delay"] == 4.0 and details["request_id"] == "a1b2c3d4"

    def test_no_retry_block_when_not_a_retry(self, tmp_path: Path) -> None:
        text = format_error_log(http_event(retry_attempt=None), cfg(tmp_path), "x.log")
        assert "RETRY ATTEMPT" not in text

    @pytest.mark.parametrize(
        ("switch", "title"),
        [
            ("include_stack_traces", "STACK TRACE:"),
            ("include_request_context", "REQUEST CONTEXT:"),
            ("include_timing", "TIMING INFORMATION:"),
        ],
    )
    def test_switches(self, tmp_path: Path, switch: str, title: str) -> None:
        event = http_event(traceback="Traceback (most recent call last):\n  boom\n")
        assert title in format_error_log(event, cfg(tmp_path), "x.log")
        assert title not in format_error_log(event, cfg(tmp_path, **{switch: False}), "x.log")

    def test_truncated_to_max_file_size(self, tmp_path: Path) -> None:
        small = cfg(tmp_path, max_file_size_mb=0.001)
        limit = int(0.001 * 1024 * 1024)
        event = http_event(response_text="é\n" * 5000)
        text = format_error_log(event, small, "503_x.log")
        assert limit * 0.8 < len(text.encode()) <= limit
        assert re.search(r"\[\.\.\. truncated \d+ bytes \.\.\.\]", text)
        assert details_of(text)["status_code"] == 503  # still valid JSON

    def test_huge_context_hard_capped(self, tmp_path: Path) -> None:
        small = cfg(tmp_path, max_file_size_mb=0.001)
        event = http_event(context={"big": "x" * 50_000}, response_text=None)
        text = format_error_log(event, small, "503_x.log")
        assert len(text.encode()) <= int(0.001 * 1024 * 1024)
        assert "truncated" in text

    def test_secrets_redacted(self, tmp_path: Path) -> None:
        key = random_key()
        event = http_event(
            error_message=f"401 for Bearer {key}",
            url=f"https://target.example/v1?key={key}",
            headers={"Authorization": f"Bearer {key}", "X-Echo": key},
            response_text=f'{{"error": {{"message": "bad key {key}"}}}}'.encode(),
            context={"api_key": key, "note": f"sent {key}"},
            traceback=f"ValueError: {key}",
        )
        assert_no_leak(format_error_log(event, cfg(tmp_path), "x.log"), key)


class TestErrorLog:
    async def test_writes_file(self, tmp_path: Path, writer: LogWriter) -> None:
        log = ErrorLog(cfg(tmp_path), writer)
        log.log(http_event())
        await writer.drain()
        [path] = list((tmp_path / "errors").iterdir())
        assert NAME_RE.match(path.name) and path.name.startswith("503_")
        assert f"File: {path.name}" in path.read_text()

    async def test_counters(self, tmp_path: Path, writer: LogWriter) -> None:
        log = ErrorLog(cfg(tmp_path), writer)
        log.log(http_event())
        log.log(http_event())
        log.log(ErrorEvent("timeout", "TimeoutError", "read timed out"))
        status = log.status()
        assert status["total"] == 3
        assert status["by_code"] == {"503": 2, "timeout": 1}
        assert status["by_type"] == {"HTTPResponse": 2, "TimeoutError": 1}

    async def test_disabled_writes_nothing_but_counts(
        self, tmp_path: Path, writer: LogWriter
    ) -> None:
        log = ErrorLog(cfg(tmp_path, enabled=False), writer)
        log.log(http_event())
        await writer.drain()
        assert not (tmp_path / "errors").exists()
        assert log.status()["total"] == 1

    async def test_same_millisecond_events_all_kept(
        self, tmp_path: Path, writer: LogWriter
    ) -> None:
        log = ErrorLog(cfg(tmp_path), writer)
        now = time.time()
        for n in range(100):
            log.log(http_event(timestamp=now, request_id=f"r{n}"))
        await writer.drain()
        files = list((tmp_path / "errors").iterdir())
        assert len(files) == 100
        assert all(NAME_RE.match(f.name) for f in files)
        ids = {details_of(f.read_text())["request_id"] for f in files}
        assert len(ids) == 100
        for f in files:
            assert f"File: {f.name}" in f.read_text()

    async def test_rotation_keeps_newest(self, tmp_path: Path, writer: LogWriter) -> None:
        log = ErrorLog(cfg(tmp_path, max_files=5), writer)
        start = time.time()
        for n in range(12):
            log.log(http_event(timestamp=start + n, request_id=f"r{n}"))
        await writer.drain()
        files = scan_error_files(tmp_path / "errors")
        assert len(files) == 5
        kept = [details_of((tmp_path / "errors" / f.name).read_text()) for f in files]
        assert [d["request_id"] for d in kept] == [f"r{n}" for n in range(7, 12)]

    async def test_rotation_at_start_up(self, tmp_path: Path) -> None:
        folder = tmp_path / "errors"
        folder.mkdir()
        for n in range(8):
            (folder / f"503_20240101_0000{n:02d}_000.log").write_text("old")
        (folder / "README.txt").write_text("keep")
        w = LogWriter()
        ErrorLog(cfg(tmp_path, max_files=3), w)
        await w.close()
        assert sorted(p.name for p in folder.iterdir()) == [
            "503_20240101_000005_000.log",
            "503_20240101_000006_000.log",
            "503_20240101_000007_000.log",
            "README.txt",
        ]

    async def test_unwritable_folder_never_raises(self, tmp_path: Path) -> None:
        (tmp_path / "afile").write_text("not a folder")
        w = LogWriter()
        log = ErrorLog(ErrorLogging(folder=str(tmp_path / "afile" / "errors")), w)
        for _ in range(3):
            log.log(http_event())
        await w.close()
        assert w.failures == 3 and log.status()["total"] == 3

    async def test_write_failures_become_events(self, tmp_path: Path) -> None:
        w = LogWriter(warn_interval=3600)
        log = ErrorLog(cfg(tmp_path), w)
        w.on_failure = lambda message: log.log(ErrorEvent("log_write_error", "OSError", message))
        (tmp_path / "afile").write_text("x")
        for n in range(3):
            w.submit(tmp_path / "afile" / "logs" / f"{n}.log", "x")
        await w.close()
        assert log.status()["by_code"] == {"log_write_error": 1}  # rate-limited
        [path] = list((tmp_path / "errors").iterdir())
        assert path.name.startswith("log_write_error_")
        assert "NotADirectoryError" in path.read_text()


class TestConfigError:
    def test_written_synchronously(self, tmp_path: Path) -> None:
        path = log_config_error(tmp_path / "errors", ["server.port: bad", "x: unknown"])
        assert path is not None and path.name.startswith("config_error_")
        text = path.read_text()
        assert "Error Code: config_error" in text
        assert details_of(text)["context"] == {
            "source": "config",
            "problems": ["server.port: bad", "x: unknown"],
        }

    def test_never_raises(self, tmp_path: Path) -> None:
        (tmp_path / "afile").write_text("x")
        assert log_config_error(tmp_path / "afile" / "errors", ["p"]) is None
