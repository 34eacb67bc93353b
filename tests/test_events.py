"""The live feed's hub: cheap when nobody watches, bounded when someone watches slowly."""

from __future__ import annotations

import orjson
import pytest

from first_hop_proxy import events
from first_hop_proxy.events import MAX_SUBSCRIBERS, EventHub, LazyRedact
from first_hop_proxy.logs.request_log import RequestRecord
from first_hop_proxy.redact import Redactor

KEY = "sk-live-0123456789abcdefWXYZ"


def record(request_id: str = "r1", *, failed: bool = False) -> RequestRecord:
    rec = RequestRecord(request_id, "/v1/chat/completions", model="m", stream=True)
    if failed:
        rec.add_attempt(status=503, action="retry", reason="503 is a retry code", code="503")
        rec.add_attempt(
            status=503, action="fail", reason=f"upstream said {KEY}", error=f"bad key {KEY}"
        )
        rec.error = f"gave up: {KEY}"
        rec.finish(503)
    else:
        rec.add_attempt(status=200, action="deliver", reason="good reply", duration=0.25)
        rec.first_content = 0.1
        rec.finish(200)
    return rec


def decode(data: bytes) -> tuple[str, dict[str, object]]:
    head, _, body = data.partition(b"\ndata: ")
    return head.removeprefix(b"event: ").decode(), orjson.loads(body)


def never_called() -> Redactor:
    raise AssertionError("a delivered request needs no redactor")


def test_nobody_watching_keeps_summaries_and_serializes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = EventHub()
    monkeypatch.setattr(events.orjson, "dumps", lambda *_: pytest.fail("serialized"))
    rec = record()
    hub.started(rec, never_called)
    assert hub.running["r1"].record is rec
    hub.attempted(rec)
    hub.finished(rec, "default", 123, never_called)
    assert not hub.running
    [done] = hub.recent
    assert done["status"] == 200 and done["size"] == 123 and done["first_token"] == 0.1
    assert done["attempts"][0]["action"] == "deliver"  # filled in from the record
    assert hub.knows("r1") and not hub.knows("r2")


def test_a_watcher_gets_start_attempt_and_end() -> None:
    hub = EventHub()
    sub = hub.subscribe()
    assert sub is not None
    rec = record(failed=True)
    hub.started(rec, lambda: Redactor([KEY]))
    hub.attempted(rec)
    hub.finished(rec, "default", 0, lambda: Redactor([KEY]))
    items = sub.take()
    assert [decode(i)[0] for i in items] == ["request"] * 3
    states = [decode(i)[1]["state"] for i in items]
    assert states == ["running", "running", "done"]
    assert KEY not in b"".join(items).decode()
    final = decode(items[-1])[1]
    assert final["status"] == 503
    assert [a["code"] for a in final["attempts"]] == ["503", ""]  # type: ignore[index]
    assert KEY not in items[-1].decode()  # upstream texts are masked


def test_a_slow_watcher_is_bounded_and_told_to_start_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "QUEUE_SIZE", 5)
    hub = EventHub()
    sub = hub.subscribe()
    assert sub is not None
    for i in range(50):
        hub.started(record(f"r{i}"), Redactor)
    assert sub.behind
    assert len(sub.queue) <= 5
    sub.behind = False
    assert sub.take() == []


def test_a_snapshot_sums_up_running_requests_from_their_records() -> None:
    hub = EventHub()
    rec = RequestRecord("run1", "/v1/chat/completions", model="m", stream=True)
    hub.started(rec, lambda: Redactor([KEY]))
    rec.add_attempt(status=429, action="retry", reason="429", error=f"slow down {KEY}", code="429")
    [running] = hub.snapshot()["running"]
    assert running["state"] == "running" and running["model"] == "m"
    assert [a["code"] for a in running["attempts"]] == ["429"]
    assert KEY not in orjson.dumps(running).decode()


def test_the_number_of_watchers_is_capped() -> None:
    hub = EventHub()
    subs = [hub.subscribe() for _ in range(MAX_SUBSCRIBERS)]
    assert all(subs)
    assert hub.subscribe() is None
    first = subs[0]
    assert first is not None
    hub.unsubscribe(first)
    assert hub.subscribe() is not None


def test_recent_requests_are_bounded() -> None:
    hub = EventHub(recent=10)
    for i in range(25):
        rec = record(f"r{i}")
        hub.started(rec, never_called)
        hub.finished(rec, "default", 0, never_called)
    assert len(hub.recent) == 10
    assert [s["id"] for s in hub.snapshot()["recent"]] == [f"r{i}" for i in range(15, 25)]


def test_close_wakes_every_watcher() -> None:
    hub = EventHub()
    sub = hub.subscribe()
    assert sub is not None
    hub.close()
    assert sub.closed and sub.ready.is_set()


def test_long_texts_are_clipped() -> None:
    redact = LazyRedact(Redactor)
    assert len(redact("x" * 5000)) == events.TEXT_LIMIT
    assert redact("") == ""
