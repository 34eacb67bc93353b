"""The log writer's bound: when its thread falls behind, only droppable jobs are dropped.

Every other job (a failure's log) is kept, and the server waits for room instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from first_hop_proxy.logs.writer import WRITER_NICE, LogWriter

from .conftest import wait_until
from .log_helpers import hold


async def test_jobs_beyond_the_bound_are_dropped_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = LogWriter(max_queued_jobs=3, interval=0.01)
    gate = await hold(writer)  # the queue fills up behind it
    ran: list[int] = []
    with caplog.at_level(logging.WARNING, logger="first_hop_proxy"):
        accepted = [
            writer.submit_call(lambda i=i: ran.append(i), droppable=True) for i in range(10)
        ]
        writer.submit_call(lambda: ran.append(99), droppable=True)
    gate.set()
    await writer.close()
    assert accepted.count(False) == 7
    assert writer.dropped == accepted.count(False) + 1
    assert sorted(ran) == [i for i, ok in enumerate(accepted) if ok]
    assert writer.status()["dropped"] == writer.dropped
    assert writer.lost == 0
    warnings = [r.getMessage() for r in caplog.records if "plain successes" in r.getMessage()]
    assert len(warnings) == 1  # one warning per interval, not one per dropped job


async def test_jobs_not_marked_droppable_are_never_dropped() -> None:
    writer = LogWriter(max_queued_jobs=3, max_queued_bytes=100, interval=0.01)
    gate = await hold(writer)
    ran: list[str] = []
    for i in range(20):
        assert writer.submit_call(lambda i=i: ran.append(f"kept{i}"), size=60)
        writer.submit_call(lambda i=i: ran.append(f"plain{i}"), droppable=True)
    assert writer.behind  # 20 kept jobs waiting, bound 3: new requests wait for room
    gate.set()
    await writer.close()
    # Only the first plain job found room; every kept one ran, in order.
    assert ran == ["kept0", "plain0", *(f"kept{i}" for i in range(1, 20))]
    assert writer.dropped == 19
    assert writer.lost == 0
    assert not writer.behind


async def test_wait_for_room_holds_new_work_until_the_kept_logs_are_written() -> None:
    writer = LogWriter(max_queued_jobs=3, interval=0.01)
    assert not writer.behind
    await asyncio.wait_for(writer.wait_for_room(), 1)  # not behind: returns at once
    gate = await hold(writer)  # a kept job too, until it has run
    writer.submit_call(lambda: None)
    assert not writer.behind
    writer.submit_call(lambda: None)
    assert writer.behind
    waiting = asyncio.create_task(writer.wait_for_room())
    await asyncio.sleep(0.3)
    assert not waiting.done()
    gate.set()
    await asyncio.wait_for(waiting, 5)
    assert not writer.behind
    assert writer.status()["waits"] == 1
    await writer.close()


async def test_a_stuck_writer_thread_does_not_stop_the_server() -> None:
    """A hung disk: waiting ends once the thread has finished nothing for stall_seconds."""
    writer = LogWriter(max_queued_jobs=2, interval=0.01, stall_seconds=0.2)
    gate = await hold(writer)
    writer.submit_call(lambda: None)
    assert writer.behind
    started = time.monotonic()
    await asyncio.wait_for(writer.wait_for_room(), 5)
    assert writer.stalled()
    assert 0.15 < time.monotonic() - started < 4
    assert not writer.submit_call(lambda: None)  # nothing reaches the disk anyway
    assert writer.lost == 1
    gate.set()
    await writer.close()
    assert writer.dropped == 0


async def test_byte_budget_counts_queued_data_and_frees_it() -> None:
    writer = LogWriter(max_queued_bytes=100)
    await writer.start()
    gate = threading.Event()
    writer.submit_call(gate.wait)
    assert writer.submit_call(lambda: None, size=60, droppable=True)
    assert not writer.submit_call(lambda: None, size=60, droppable=True)  # 120 > 100: dropped
    gate.set()
    await writer.drain()
    assert writer.submit_call(lambda: None, size=60, droppable=True)  # the first one's freed
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
