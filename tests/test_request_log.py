"""Request logs (one file per request) and the background writer behind every log."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from first_hop_proxy.config import Logging
from first_hop_proxy.logs.request_log import (
    BANNER,
    RULE,
    RequestLog,
    RequestRecord,
    format_request_log,
    log_file_name,
)
from first_hop_proxy.logs.writer import LogWriter, write_new_file

from .conftest import wait_until
from .keys import assert_no_leak, random_key

NAME_RE = re.compile(r"^\d{8}_\d{6}_\d{3}_[A-Za-z0-9-]+\.log$")
DAY = 86400


@pytest.fixture
async def writer() -> AsyncIterator[LogWriter]:
    w = LogWriter()
    await w.start()
    yield w
    await w.close()


def cfg(tmp_path: Path, **kw: object) -> Logging:
    return Logging(folder=str(tmp_path / "logs"), **kw)


def full_record(
    key: str = "sk-test-0123456789abcdefghij", request_id: str = "a1b2c3d4"
) -> RequestRecord:
    record = RequestRecord(
        request_id=request_id,
        endpoint="/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        body=orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        original_body=orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hí"}]}),
        model="m",
        stream=True,
        client="127.0.0.1",
    )
    record.add_attempt(status=503, duration=0.2, action="retry", reason="503 in retry_codes")
    record.attempts[-1].delay_before_next = 1.5
    record.add_attempt(status=None, duration=0.1, action="retry", error="connection reset")
    record.add_attempt(status=200, duration=0.3, action="deliver")
    record.add_stream_text(0, "Hello")
    record.add_stream_text(0, " world")
    record.finish_reasons[0] = "stop"
    record.stream_events = 4
    record.response_headers = {"Content-Type": "text/event-stream"}
    record.finish(200)
    return record


async def full_folder(tmp_path: Path, max_files: int) -> tuple[LogWriter, RequestLog]:
    """A request log whose folder is full: ``max_files`` logs, r0 the oldest."""
    w = LogWriter()
    log = RequestLog(cfg(tmp_path, max_files=max_files), w)
    for n in range(max_files):
        log.write(full_record(request_id=f"r{n}"))
    await w.drain()
    return w, log


SECTIONS = {
    "include_headers": ["REQUEST HEADERS:", "RESPONSE HEADERS:"],
    "include_request_data": ["REQUEST DATA:", "ORIGINAL REQUEST DATA (before rewrite rules):"],
    "include_response_data": ["FINAL RESPONSE DATA:"],
    "include_timing": ["TIMING INFORMATION:"],
}


class TestFormat:
    def test_file_name(self) -> None:
        record = RequestRecord(request_id="abc/../x y", endpoint="/chat/completions")
        name = log_file_name(record)
        assert NAME_RE.match(name), name
        assert name.endswith("_abc----x-y.log")

    def test_every_section(self, tmp_path: Path) -> None:
        text = format_request_log(full_record(), cfg(tmp_path))
        lines = text.splitlines()
        assert lines[0] == BANNER and lines[1].startswith("UNIFIED REQUEST LOG - ")
        for line in ("Request ID: a1b2c3d4", "Endpoint: /chat/completions", "Stream: true"):
            assert line in lines
        assert any(line.startswith("Timestamp: ") for line in lines)
        assert any(line.startswith("Start Time: ") for line in lines)
        assert re.search(r"^Final Status: 200  Attempts: 3  Duration: \d+\.\d{3} s$", text, re.M)
        for titles in SECTIONS.values():
            for title in titles:
                assert f"{RULE}\n{title}\n{RULE}" in text
        for n in (1, 2, 3):
            assert f"UPSTREAM ATTEMPT #{n}:" in text
        assert "Decision: retry (503 in retry_codes)" in text
        assert "Delay Before Next Attempt: 1.50 seconds" in text
        assert "Status: no response" in text and "Error: connection reset" in text
        assert "Choice 0 (finish reason: stop):\nHello world" in text
        assert "Stream Events: 4" in text and "Time To First Content:" in text
        assert "Total Duration:" in text and "End Time:" in text
        assert lines[-3] == BANNER and lines[-2].startswith("LOG COMPLETE - ")

    def test_request_data_pretty_json(self, tmp_path: Path) -> None:
        text = format_request_log(full_record(), cfg(tmp_path))
        assert '{\n  "model": "m",\n  "messages": [' in text

    def test_unchanged_body_has_no_original_section(self, tmp_path: Path) -> None:
        record = full_record()
        record.original_body = record.body
        assert "ORIGINAL REQUEST DATA" not in format_request_log(record, cfg(tmp_path))

    def test_non_json_bodies(self, tmp_path: Path) -> None:
        record = RequestRecord("r1", "/chat/completions", body=b"not json \xff")
        record.response_body = b"<html>bad gateway</html>"
        record.finish(502)
        text = format_request_log(record, cfg(tmp_path))
        assert "not json \ufffd" in text and "<html>bad gateway</html>" in text

    @pytest.mark.parametrize("switch", sorted(SECTIONS))
    def test_switch_removes_section(self, tmp_path: Path, switch: str) -> None:
        text = format_request_log(full_record(), cfg(tmp_path, **{switch: False}))
        for title in SECTIONS[switch]:
            assert f"\n{title}\n" not in text
        for other, titles in SECTIONS.items():
            if other != switch:
                assert all(f"\n{t}\n" in text for t in titles)

    def test_secrets_redacted_everywhere(self, tmp_path: Path) -> None:
        key = random_key()
        record = RequestRecord(
            request_id="r2",
            endpoint=f"/chat/completions?key={key}",
            headers={"Authorization": f"Bearer {key}"},
            body=orjson.dumps({"messages": [{"role": "user", "content": f"use {key} please"}]}),
            original_body=f"raw {key}".encode(),
        )
        record.add_attempt(status=401, error=f"401 from https://u/?api_key={key}: bad {key}")
        record.error = f"upstream rejected {key}"
        record.response_body = f'{{"error": "invalid key {key}"}}'.encode()
        record.finish(401)
        assert_no_leak(format_request_log(record, cfg(tmp_path)), key)

    def test_known_secret_masked_in_body(self, tmp_path: Path) -> None:
        record = RequestRecord("r3", "/chat/completions", headers={"X-Api-Key": "plainpassword99"})
        record.body = b'{"note": "plainpassword99"}'
        record.secrets.append("another-known-one")
        record.error = "another-known-one"
        text = format_request_log(record, cfg(tmp_path))
        assert "plainpassword99" not in text and "another-known-one" not in text


class TestRequestLog:
    async def test_write_and_index(self, tmp_path: Path, writer: LogWriter) -> None:
        log = RequestLog(cfg(tmp_path), writer)
        log.write(full_record())
        await writer.drain()
        files = list((tmp_path / "logs").iterdir())
        assert len(files) == 1 and NAME_RE.match(files[0].name)
        assert "UNIFIED REQUEST LOG" in files[0].read_text()
        [entry] = log.entries(10)
        assert (entry.request_id, entry.status, entry.attempts) == ("a1b2c3d4", 200, 3)
        assert log.path_for("a1b2c3d4") == files[0]

    async def test_a_followed_stream_is_parsed_while_it_flows(self, tmp_path: Path) -> None:
        writer = LogWriter(interval=0.01)
        await writer.start()
        try:
            log = RequestLog(cfg(tmp_path), writer)
            record = RequestRecord(request_id="s1", endpoint="/chat/completions", stream=True)
            log.follow(record)

            def event(text: str, finish: str | None = None) -> bytes:
                choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
                return orjson.dumps({"object": "chat.completion.chunk", "choices": [choice]})

            for word in ("Once", " upon", " a"):
                record.keep_stream_data(event(word))
            # Parsed on the writer thread while the stream goes on: the raw events go.
            await wait_until(lambda: not record.stream_data, 5)
            assert record.stream_text == {0: ["Once upon a"]}
            record.keep_stream_data(event(" time", "stop"))
            record.keep_stream_data(b"not json")  # kept, and skipped when parsed
            record.finish(200)
            log.write(record)  # the rest is parsed with the log; no longer followed
            await writer.drain()
            (path,) = (tmp_path / "logs").iterdir()
            assert "Once upon a time" in path.read_text()
            sent = [event(w) for w in ("Once", " upon", " a")] + [event(" time", "stop")]
            assert record.stream_bytes == sum(map(len, sent)) + len(b"not json")
            assert record.finish_reasons == {0: "stop"}
            assert not writer._tended
        finally:
            await writer.close()

    async def test_disabled_writes_nothing(self, tmp_path: Path, writer: LogWriter) -> None:
        log = RequestLog(cfg(tmp_path, enabled=False), writer)
        log.write(full_record())
        await writer.drain()
        assert not (tmp_path / "logs").exists()
        assert log.entries(10) == []

    async def test_index_seeded_from_folder(self, tmp_path: Path) -> None:
        first = LogWriter()
        log = RequestLog(cfg(tmp_path), first)
        for n in range(3):
            record = full_record(request_id=f"req-{n}")
            record.started_wall += n
            log.write(record)
        await first.close()
        second = LogWriter()
        seeded = RequestLog(cfg(tmp_path), second)
        await second.drain()
        entries = seeded.entries(10)
        assert [e.request_id for e in entries] == ["req-2", "req-1", "req-0"]
        assert entries[0].status == 200 and entries[0].attempts == 3
        assert entries[0].duration is not None
        await second.close()

    async def test_prune_by_count_at_start_and_on_write(self, tmp_path: Path) -> None:
        folder = tmp_path / "logs"
        folder.mkdir()
        for n in range(10):
            (folder / f"20240101_0000{n:02d}_000_old{n}.log").write_text("x")
        (folder / "notes.txt").write_text("not a log")
        w = LogWriter()
        log = RequestLog(cfg(tmp_path, max_files=4), w)
        await w.drain()
        assert sorted(p.name for p in folder.glob("*.log")) == [
            f"20240101_0000{n:02d}_000_old{n}.log" for n in range(6, 10)
        ]
        for n in range(3):
            log.write(full_record(request_id=f"new{n}"))
        await w.close()
        names = sorted(p.name for p in folder.glob("*.log"))
        assert len(names) == 4
        assert [n for n in names if "new" in n] == sorted(n for n in names if "new" in n)
        assert sum("new" in n for n in names) == 3
        assert (folder / "notes.txt").exists()
        assert [e.request_id for e in log.entries(10)][:3] == ["new2", "new1", "new0"]

    async def test_prune_by_age(self, tmp_path: Path) -> None:
        folder = tmp_path / "logs"
        folder.mkdir()
        now = time.time()
        for n, age_days in enumerate([40, 31, 29, 1]):
            path = folder / f"20240101_00000{n}_000_r{n}.log"
            path.write_text("x")
            os.utime(path, (now - age_days * DAY, now - age_days * DAY))
        w = LogWriter()
        log = RequestLog(cfg(tmp_path, max_age_days=30), w)
        await w.drain()
        assert sorted(p.name for p in folder.iterdir()) == [
            "20240101_000002_000_r2.log",
            "20240101_000003_000_r3.log",
        ]
        assert {e.request_id for e in log.entries(10)} == {"r2", "r3"}
        await w.close()

    async def test_full_folder_reuses_the_oldest_file(self, tmp_path: Path) -> None:
        folder = tmp_path / "logs"
        w, log = await full_folder(tmp_path, 3)
        oldest = next(p for p in folder.glob("*.log") if "_r0" in p.name)
        inode = oldest.stat().st_ino
        log.write(full_record(request_id="r3"))
        await w.close()
        names = sorted(p.name for p in folder.glob("*.log"))
        assert len(names) == 3 and not any("_r0" in n for n in names)
        newest = next(folder.glob("*_r3.log"))
        assert "Request ID: r3" in newest.read_text()
        assert newest.read_text().rstrip().endswith("=" * 80)
        if os.name != "nt":
            assert newest.stat().st_ino == inode
        assert [e.request_id for e in log.entries(10)] == ["r3", "r2", "r1"]
        assert log.status()["pruned"] == 1 and log.status()["files"] == 3

    async def test_a_failed_write_still_prunes_what_it_forgot(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        folder = tmp_path / "logs"
        w, log = await full_folder(tmp_path, 2)

        def broken(*args: object, **kwargs: object) -> Path:
            raise OSError("disk full")

        monkeypatch.setattr(w, "write_file", broken)
        log.write(full_record(request_id="r2"))
        await w.close()
        names = sorted(p.name for p in folder.glob("*.log"))
        assert len(names) == 1 and "_r1" in names[0]  # r0 was due: removed, not orphaned
        assert log.status()["files"] == 1 and w.failures == 1
        assert [e.request_id for e in log.entries(10)] == ["r1"]


class TestWriter:
    async def test_concurrent_submits_all_written(self, tmp_path: Path) -> None:
        w = LogWriter()
        await w.start()

        async def one(n: int) -> None:
            w.submit(tmp_path / "out" / f"f{n}.log", f"file {n}")

        await asyncio.gather(*(one(n) for n in range(200)))
        await w.close()
        files = list((tmp_path / "out").iterdir())
        assert len(files) == 200
        assert (tmp_path / "out" / "f7.log").read_text() == "file 7"
        assert w.status()["written"] == 200 and w.status()["queued"] == 0

    async def test_same_name_never_overwrites(self, tmp_path: Path) -> None:
        w = LogWriter()
        for n in range(5):
            w.submit(tmp_path / "same.log", str(n))
        await w.close()
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == ["same.log", "same_2.log", "same_3.log", "same_4.log", "same_5.log"]

    async def test_close_drains_slow_jobs(self, tmp_path: Path) -> None:
        w = LogWriter()
        for n in range(20):
            w.submit_call(lambda: time.sleep(0.005))
            w.submit(tmp_path / f"{n}.log", "x")
        await w.close()
        assert len(list(tmp_path.iterdir())) == 20

    async def test_submit_does_not_block_loop(self, tmp_path: Path) -> None:
        w = LogWriter()
        w.submit_call(lambda: time.sleep(0.3))
        start = time.perf_counter()
        for n in range(50):
            w.submit(tmp_path / f"{n}.log", "x")
        assert time.perf_counter() - start < 0.1
        await w.close()

    async def test_unwritable_folder(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        blocker = tmp_path / "afile"
        blocker.write_text("a regular file where a folder should be")
        key = random_key()
        w = LogWriter()
        log = RequestLog(cfg(tmp_path / "afile"), w)
        with caplog.at_level(logging.WARNING, logger="first_hop_proxy"):
            for _ in range(5):
                w.submit(blocker / "logs" / f"x_{key}.log", "x")
                log.write(full_record())
            await w.close()
        status = w.status()
        assert status["failures"] == 10 and status["written"] == 0
        assert status["last_error"]
        assert_no_leak(status["last_error"], key)
        warnings = [r for r in caplog.records if r.name == "first_hop_proxy"]
        assert len(warnings) == 1
        assert_no_leak(warnings[0].getMessage(), key)

    async def test_failing_job_does_not_stop_worker(self, tmp_path: Path) -> None:
        w = LogWriter(warn_interval=0)

        def boom() -> None:
            raise ValueError("bug")

        w.submit_call(boom)
        w.submit(tmp_path / "after.log", "ok")
        await w.close()
        assert (tmp_path / "after.log").read_text() == "ok"
        assert w.failures == 1 and w.last_error == "ValueError: bug"

    async def test_submit_after_close_is_counted(self, tmp_path: Path) -> None:
        w = LogWriter()
        await w.start()
        await w.close()
        w.submit(tmp_path / "late.log", "x")
        assert not (tmp_path / "late.log").exists()
        assert w.failures == 1
        await w.close()

    def test_write_new_file_with_name_function(self, tmp_path: Path) -> None:
        first = write_new_file(tmp_path / "e.log", lambda name: f"File: {name}")
        second = write_new_file(tmp_path / "e.log", lambda name: f"File: {name}")
        assert first.read_text() == "File: e.log"
        assert second.read_text() == "File: e_2.log"

    def test_write_new_file_removes_partial_file(self, tmp_path: Path) -> None:
        def render(name: str) -> str:
            raise RuntimeError("render failed")

        with pytest.raises(RuntimeError):
            write_new_file(tmp_path / "e.log", render)
        assert list(tmp_path.iterdir()) == []

    def test_write_new_file_reuses_a_doomed_file(self, tmp_path: Path) -> None:
        old = tmp_path / "old.log"
        old.write_text("a long old text that must not survive")
        inode = old.stat().st_ino
        new = write_new_file(tmp_path / "new.log", "short", reuse=old)
        assert new == tmp_path / "new.log"
        assert new.read_text() == "short"
        assert not old.exists()
        if os.name != "nt":
            assert new.stat().st_ino == inode

    def test_write_new_file_reuse_of_a_missing_file_creates(self, tmp_path: Path) -> None:
        new = write_new_file(tmp_path / "new.log", "text", reuse=tmp_path / "gone.log")
        assert new.read_text() == "text"

    def test_write_new_file_reuse_keeps_names_exclusive(self, tmp_path: Path) -> None:
        (tmp_path / "new.log").write_text("taken")
        old = tmp_path / "old.log"
        old.write_text("old")
        new = write_new_file(tmp_path / "new.log", "text", reuse=old)
        assert new.name == "new_2.log" and new.read_text() == "text"
        assert (tmp_path / "new.log").read_text() == "taken"
        assert not old.exists()

    def test_write_new_file_reuse_failure_leaves_nothing(self, tmp_path: Path) -> None:
        old = tmp_path / "old.log"
        old.write_text("old")

        def render(name: str) -> str:
            raise RuntimeError("render failed")

        with pytest.raises(RuntimeError):
            write_new_file(tmp_path / "new.log", render, reuse=old)
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("response_data", [True, False])
def test_stream_resume_section(tmp_path: Path, response_data: bool) -> None:
    """Where the stream broke, the prefill, the cut, the outcome; the reply's text only
    where the config lets the log show it."""
    key = "sk-test-0123456789abcdefghij"
    record = full_record(key)
    record.add_resume(
        broke=f"connection_error: reset by peer ({key})",
        chars=27,
        events=7,
        first_attempt=3,
        messages=orjson.dumps([{"role": "assistant", "content": "Once upon a time, there"}]),
        cut=" a time,",
        outcome="joined",
    )
    record.finish(200)
    text = format_request_log(record, cfg(tmp_path, include_response_data=response_data))
    head = f"{RULE}\nSTREAM RESUME #1:\n{RULE}\n"
    resume = text[text.index(head) + len(head) :].split(f"\n\n{RULE}")[0]
    assert resume.startswith("Broke After: 27 characters of text, 7 events: connection_error")
    assert "Upstream Attempts: from #3" in resume
    assert "Outcome: joined" in resume
    assert ("Once upon a time, there" in resume) is response_data
    assert ("Overlap Cut: ' a time,' (8 characters)" in resume) is response_data
    assert "Overlap Cut: (8 characters)" in resume or response_data
    assert_no_leak(text, key)
