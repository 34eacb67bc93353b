"""No log of a failure is ever dropped: only request logs of plain successes may be.

A forced backlog (the writer's thread held busy) stands in for a writer that has
fallen behind under load; the logs go to a real folder through the real thread.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy.config import ErrorLogging, Logging
from first_hop_proxy.logs.error_log import ErrorEvent, ErrorLog
from first_hop_proxy.logs.request_log import RequestLog, RequestRecord
from first_hop_proxy.logs.writer import LogWriter
from first_hop_proxy.server import RunningServer

from .conftest import StartProxy, chat_body
from .fake_upstream import FakeUpstream, Json
from .log_helpers import error_details, error_logs, hold, request_logs, state_of

NO_BREAKER = {"circuit_breaker": {"enabled": False}}


def record(request_id: str, status: int | None, *attempts: dict[str, Any], **fields: Any) -> Any:
    rec = RequestRecord(request_id, "/v1/chat/completions", **fields)
    for attempt in attempts:
        rec.add_attempt(**attempt)
    rec.finish(status)
    return rec


def error_log_ids(folder: Path) -> set[str]:
    """The request ids the error logs in ``folder`` are about."""
    return {error_details(path.read_text())["request_id"] for path in error_logs(folder)}


DELIVER = {"status": 200, "action": "deliver"}
RETRY = {"status": 503, "action": "retry", "error": "overloaded"}


@pytest.mark.parametrize(
    ("rec", "plain"),
    [
        (record("a", 200, DELIVER), True),
        (record("b", 201, DELIVER), True),
        (record("c", 200, RETRY, DELIVER), False),  # a retry
        (record("d", 200, {**DELIVER, "recategorization": "200 -> 200 (x)"}), False),
        (record("e", 200, DELIVER, error_events=1), False),  # e.g. a rule timeout
        (record("f", 200, DELIVER, error="stream failed after content"), False),
        (record("g", 502, {"status": 502, "action": "fail"}), False),
        (record("h", 400, {"status": 200, "action": "hard_stop"}), False),
        (record("i", 499, DELIVER), False),  # the client went away
        (record("j", 400), False),  # a bad request: no attempt at all
        (record("k", None), False),
    ],
    ids=lambda v: v.request_id if isinstance(v, RequestRecord) else str(v),
)
def test_only_a_first_try_2xx_with_nothing_wrong_is_a_plain_success(
    rec: RequestRecord, plain: bool
) -> None:
    assert rec.plain_success is plain


async def test_a_backlog_drops_only_plain_success_logs(tmp_path: Path) -> None:
    writer = LogWriter(max_queued_jobs=8, interval=0.01)
    requests = RequestLog(Logging(folder=str(tmp_path / "logs")), writer)
    errors = ErrorLog(ErrorLogging(folder=str(tmp_path / "errors")), writer)
    gate = await hold(writer)
    failed: set[str] = set()
    for i in range(60):
        request_id = f"req-{i}"
        kind = i % 4
        if kind == 0:
            requests.write(record(request_id, 200, DELIVER))
            continue
        failed.add(request_id)
        if kind == 1:
            rec = record(request_id, 502, {"status": 502, "action": "fail"}, error="bad gateway")
        elif kind == 2:
            rec = record(request_id, 200, RETRY, DELIVER)
        else:
            rec = record(request_id, 200, DELIVER, error_events=1)
        errors.log(ErrorEvent(502, "UpstreamError", f"{request_id} failed", request_id=request_id))
        requests.write(rec)
    assert writer.behind  # 45 kept jobs waiting; the server would now wait for room
    gate.set()
    await writer.drain()
    await writer.close()
    on_disk = request_logs(tmp_path / "logs")
    assert failed <= set(on_disk)  # every failure's request log
    assert error_log_ids(tmp_path / "errors") == failed  # and every error log
    plain_written = len(set(on_disk) - failed)
    assert writer.dropped == 15 - plain_written > 0  # only plain successes were dropped
    assert writer.lost == 0
    assert writer.failures == 0


async def post(client: aiohttp.ClientSession, proxy: RunningServer) -> tuple[int, str]:
    async with client.post(proxy.url + "/v1/chat/completions", data=orjson.dumps(chat_body())) as r:
        await r.read()
        return r.status, r.headers["X-Request-ID"]


async def test_through_the_proxy_a_backlog_never_loses_a_failure_log(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await start_proxy(NO_BREAKER)
    writer = state_of(proxy).writer
    writer.max_queued_jobs = 40  # above the 33 kept jobs, so no request waits for room
    gate = await hold(writer)
    answers: list[tuple[int, str]] = []
    for i in range(40):
        if i % 5 == 0:
            upstream.queue(Json(400, {"error": {"message": "bad request"}}))
        elif i % 5 == 1:
            upstream.queue(Json(503), Json(200))  # a success after a retry
        else:
            upstream.queue(Json(200))
        answers.append(await post(client, proxy))
    gate.set()
    await writer.drain()
    failed = {rid for status, rid in answers if status != 200}
    retried = {rid for i, (_, rid) in enumerate(answers) if i % 5 == 1}
    assert len(failed) == 8
    on_disk = request_logs(tmp_path / "logs")
    assert failed | retried <= set(on_disk)
    # The error logs: of the 400s, and of the 503s before a retry.
    assert error_log_ids(tmp_path / "logs" / "errors") == failed | retried
    plain = len(answers) - len(failed) - len(retried)
    assert writer.dropped == plain - len(set(on_disk) - failed - retried) > 0
    assert writer.status()["lost"] == 0


async def test_a_failure_backlog_makes_new_requests_wait_for_the_writer(
    start_proxy: StartProxy, upstream: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await start_proxy(NO_BREAKER)
    writer = state_of(proxy).writer
    writer.max_queued_jobs = 3
    writer.interval = 0.01
    gate = await hold(writer)
    upstream.queue(Json(400, {"error": {"message": "bad request"}}))
    status, failed_id = await post(client, proxy)  # its request log and error log: 3 kept jobs
    assert status == 400
    assert writer.behind
    waiting = asyncio.create_task(post(client, proxy))
    await asyncio.sleep(0.5)
    assert not waiting.done()  # held until the failure's logs are written
    assert len(upstream.received) == 1
    gate.set()
    status, _ = await asyncio.wait_for(waiting, 10)
    assert status == 200
    await writer.drain()
    assert failed_id in request_logs(tmp_path / "logs")
    assert writer.status()["waits"] == 1
