"""The log writer's bound: when its thread falls behind, new jobs are dropped and counted."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from first_hop_proxy.writer import WRITER_NICE, LogWriter

from .conftest import wait_until


async def test_jobs_beyond_the_bound_are_dropped_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = LogWriter(max_queued_jobs=3)
    await writer.start()
    gate = threading.Event()
    ran: list[int] = []
    writer.submit_call(gate.wait)  # holds the thread so the queue fills up
    accepted = [writer.submit_call(lambda i=i: ran.append(i)) for i in range(10)]
    with caplog.at_level(logging.WARNING, logger="first_hop_proxy"):
        writer.submit_call(lambda: ran.append(99))
    gate.set()
    await writer.close()
    assert writer.dropped == accepted.count(False) + 1
    assert sorted(ran) == [i for i, ok in enumerate(accepted) if ok]
    assert writer.status()["dropped"] == writer.dropped
    assert sum("dropping new log files" in r.getMessage() for r in caplog.records) <= 1


async def test_byte_budget_counts_queued_data_and_frees_it() -> None:
    writer = LogWriter(max_queued_bytes=100)
    await writer.start()
    gate = threading.Event()
    writer.submit_call(gate.wait)
    assert writer.submit_call(lambda: None, size=60)
    assert not writer.submit_call(lambda: None, size=60)  # 120 > 100: dropped
    gate.set()
    await writer.drain()
    assert writer.submit_call(lambda: None, size=60)  # the first one's bytes are freed
    await writer.close()
    assert writer.dropped == 1


async def test_jobs_run_without_drain_within_the_batch_interval(tmp_path: Path) -> None:
    writer = LogWriter(interval=0.05)
    await writer.start()
    writer.submit(tmp_path / "a.log", "text")
    await wait_until((tmp_path / "a.log").exists, 5)
    assert (tmp_path / "a.log").read_text() == "text"
    await writer.close()


async def test_drain_does_not_wait_for_the_batch_interval(tmp_path: Path) -> None:
    writer = LogWriter(interval=30)
    await writer.start()
    await asyncio.sleep(0.05)  # the thread is now asleep for up to 30 s
    writer.submit(tmp_path / "a.log", "text")
    started = time.monotonic()
    await writer.drain()
    assert (tmp_path / "a.log").read_text() == "text"
    writer.submit(tmp_path / "b.log", "last")
    await writer.close()
    assert (tmp_path / "b.log").read_text() == "last"
    assert time.monotonic() - started < 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread nice values are Linux's")
async def test_writer_thread_runs_at_a_lower_priority() -> None:
    seen: list[int] = []
    writer = LogWriter()
    writer.submit_call(
        lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    )
    await writer.close()
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [min(19, base + WRITER_NICE)]
