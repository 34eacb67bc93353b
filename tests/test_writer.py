"""The log writer's bound: when its thread falls behind, new jobs are dropped and counted."""

from __future__ import annotations

import logging
import threading

import pytest

from first_hop_proxy.writer import LogWriter


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
