"""``streaming.keep_alive`` on its own: the branches a real client cannot reach on cue.

A client that leaves is seen by aiohttp first (the handler is cancelled; see
test_stream_resilience.py). Here the response's ``write`` fails or is slow on
purpose, which only a stand-in response can do at a chosen moment.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from first_hop_proxy.streaming import keep_alive


def exchange(interval: float) -> Any:
    config = SimpleNamespace(error_handling=SimpleNamespace(stream_keepalive_seconds=interval))
    return SimpleNamespace(settings=SimpleNamespace(config=config))


class Out:
    """A committed stream response that records its writes, each taking ``delay`` s."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.delay, self.fail = delay, fail
        self.writes: list[bytes] = []
        self.busy = False

    async def write(self, data: bytes) -> None:
        assert not self.busy, "two writes interleaved"
        self.busy = True
        try:
            await asyncio.sleep(self.delay)
            if self.fail:
                raise ConnectionResetError("Cannot write to closing transport")
            self.writes.append(data)
        finally:
            self.busy = False


async def test_comments_while_the_job_runs_then_its_result() -> None:
    out = Out()
    result, same = await keep_alive(exchange(0.02), out, asyncio.sleep(0.11, "done"), lambda: "x")  # type: ignore[arg-type]
    assert (result, same) == ("done", out)
    assert 3 <= len(out.writes) <= 6
    assert set(out.writes) == {b": x\n\n"}


async def test_a_job_done_in_time_writes_nothing() -> None:
    out = Out()
    result, _ = await keep_alive(exchange(0.5), out, asyncio.sleep(0, 7), lambda: "x")  # type: ignore[arg-type]
    assert result == 7
    await asyncio.sleep(0.6)  # the timer was cancelled: nothing comes later either
    assert out.writes == []


async def test_a_failed_comment_cancels_the_job_and_says_why() -> None:
    cancelled = asyncio.Event()

    async def job() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(ConnectionResetError):
        await keep_alive(exchange(0.02), Out(fail=True), job(), lambda: "x")  # type: ignore[arg-type]
    assert cancelled.is_set()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # not left half-cancelled


async def test_a_job_ending_during_a_comment_waits_for_it() -> None:
    out = Out(delay=0.1)  # the comment at 0.02 s is still being written at 0.05 s
    result, _ = await keep_alive(exchange(0.02), out, asyncio.sleep(0.05, "r"), lambda: "x")  # type: ignore[arg-type]
    assert result == "r"
    assert not out.busy and out.writes == [b": x\n\n"]
    await asyncio.sleep(0.1)
    assert out.writes == [b": x\n\n"]  # no comment after the job ended


async def test_a_job_failing_during_a_comment_waits_for_it_then_raises() -> None:
    out = Out(delay=0.1)

    async def job() -> None:
        await asyncio.sleep(0.05)
        raise ValueError("upstream")

    with pytest.raises(ValueError, match="upstream"):
        await keep_alive(exchange(0.02), out, job(), lambda: "x")  # type: ignore[arg-type]
    assert not out.busy and out.writes == [b": x\n\n"]


async def test_a_comment_failing_after_the_job_ended_is_raised() -> None:
    out = Out(delay=0.08, fail=True)
    with pytest.raises(ConnectionResetError):
        await keep_alive(exchange(0.02), out, asyncio.sleep(0.05), lambda: "x")  # type: ignore[arg-type]
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_job_that_swallows_the_cancel_still_hears_why() -> None:
    async def job() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "cleaned up"  # e.g. an attempt that closes its upstream and returns
        return "never"

    with pytest.raises(ConnectionResetError):
        await keep_alive(exchange(0.02), Out(fail=True), job(), lambda: "x")  # type: ignore[arg-type]
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_cancelled_handler_does_not_wait_for_a_stuck_comment() -> None:
    out = Out(delay=30)  # a client that reads nothing: the comment never finishes
    started = asyncio.get_running_loop().time()
    handler = asyncio.create_task(
        keep_alive(exchange(0.02), out, asyncio.sleep(30), lambda: "x")  # type: ignore[arg-type]
    )
    await asyncio.sleep(0.1)  # the comment is being written
    assert out.busy
    handler.cancel()  # e.g. the shutdown ending what is still in progress
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert asyncio.get_running_loop().time() - started < 1
    assert not out.busy  # the comment's write was cancelled with it
