"""A request log read back into its parts: what the dashboard's request view shows."""

from __future__ import annotations

from pathlib import Path

import orjson

from first_hop_proxy.config import Logging
from first_hop_proxy.logs import request_detail
from first_hop_proxy.logs.request_detail import (
    SECTION_LIMIT,
    parse_request_log,
    read_request_log,
    split_sections,
)
from first_hop_proxy.logs.request_log import RULE, RequestRecord, format_request_log

KEY = "sk-live-0123456789abcdefWXYZ"
HEADING = f"\n\n{RULE}\nREQUEST HEADERS:\n{RULE}\nnot a real section"


def pieces(text: str, size: int = 64) -> list[str]:
    """The text as readline(size) would give it: lines, long ones in several pieces."""
    out = []
    for line in text.splitlines(keepends=True):
        out += [line[i : i + size] for i in range(0, len(line), size)]
    return out


def retried_record() -> RequestRecord:
    rec = RequestRecord(
        "abc123",
        "/v1/chat/completions",
        client="127.0.0.1",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        model="gpt-4o",
    )
    rec.original_body = orjson.dumps({"messages": [{"role": "user", "content": "don't"}]})
    rec.body = orjson.dumps({"messages": [{"role": "user", "content": "do not" + HEADING}]})
    first = rec.add_attempt(
        upstream="community",
        key="wxyz",
        status=503,
        duration=0.5,
        action="retry",
        reason="503 is a retry code: retry 1 of 10 in 1.5 s",
        error="The model is overloaded\nError: try later (really)",
        note="the upstream's own retry hint was ignored",
        reply=b'{"error": {"message": "The model is overloaded"}}',
    )
    first.delay_before_next = 1.5
    rec.add_attempt(
        status=200,
        duration=0.25,
        action="deliver",
        reason="good reply",
        recategorization="200 -> 429 (pattern 'x')",
    )
    rec.response_body = orjson.dumps({"choices": [{"message": {"content": "Hi"}}]})
    rec.response_headers = {"Content-Type": "application/json"}
    rec.finish(200)
    return rec


def test_a_retried_request_round_trips() -> None:
    text = format_request_log(retried_record(), Logging())
    for parts in (text.splitlines(keepends=True), pieces(text)):
        detail = parse_request_log(parts)
        assert detail["id"] == "abc123"
        assert detail["model"] == "gpt-4o" and detail["stream"] is False
        assert detail["status"] == 200
        assert detail["client"] == "127.0.0.1"
        assert ["Authorization", "Bearer sk-…WXYZ"] in detail["request_headers"]
        assert KEY not in orjson.dumps(detail).decode()
        assert detail["attempts"] == [
            {
                "n": 1,
                "upstream": "community",
                "key": "wxyz",
                "status": 503,
                "duration": 0.5,
                "action": "retry",
                "reason": "503 is a retry code: retry 1 of 10 in 1.5 s",
                "recategorized": "",
                "error": "The model is overloaded\nError: try later (really)",
                "note": "the upstream's own retry hint was ignored",
                "delay": 1.5,
                "reply": '{\n  "error": {\n    "message": "The model is overloaded"\n  }\n}',
            },
            {
                "n": 2,
                "upstream": "",
                "key": "",
                "status": 200,
                "duration": 0.25,
                "action": "deliver",
                "reason": "good reply",
                "recategorized": "200 -> 429 (pattern 'x')",
                "error": "",
                "note": "",
                "delay": None,
                "reply": None,
            },
        ]
        assert "don't" in detail["original_body"]
        assert "do not" in detail["request_body"]
        assert '"Hi"' in detail["response"]
        assert detail["response_headers"] == [["Content-Type", "application/json"]]
        assert detail["timing"]["duration"] is not None
        assert detail["error"] == ""
        assert detail["truncated"] == []


def test_a_heading_inside_a_body_is_text() -> None:
    rec = RequestRecord("plain", "/v1/chat/completions")
    rec.body = ("not json" + HEADING + "\nmore").encode()
    rec.finish(400)
    rec.error = "bad request"
    detail = parse_request_log(format_request_log(rec, Logging()).splitlines(keepends=True))
    assert "not a real section" in detail["request_body"]
    assert detail["error"] == "bad request"


def test_a_resumed_stream_shows_each_resume() -> None:
    rec = RequestRecord("r1", "/v1/chat/completions", stream=True)
    rec.add_attempt(status=200, action="deliver", reason="stream has content")
    rec.add_resume(chars=120, events=9, broke="timeout", first_attempt=2, outcome="joined")
    rec.add_attempt(status=200, action="deliver", reason="stream has content")
    rec.add_stream_text(0, "Once upon a time")
    rec.finish(200)
    detail = parse_request_log(format_request_log(rec, Logging()).splitlines(keepends=True))
    assert [a["n"] for a in detail["attempts"]] == [1, 2]
    [resume] = detail["resumes"]
    assert resume["n"] == 1 and "Broke After: 120 characters" in resume["text"]
    assert "Outcome: joined" in resume["text"]
    assert "Once upon a time" in detail["response"]


def test_a_failed_stream_shows_its_error_and_text() -> None:
    rec = RequestRecord("s1", "/v1/chat/completions", stream=True)
    rec.client_status = 200
    rec.outcome = "stream failed after content: timeout"
    rec.add_attempt(status=None, duration=5.0, action="fail", reason="timeout", error="no reply")
    rec.add_stream_text(0, "Once upon")
    rec.error = "The upstream sent nothing for 5 s."
    rec.finish(504)
    detail = parse_request_log(format_request_log(rec, Logging()).splitlines(keepends=True))
    assert detail["stream"] is True
    assert detail["status"] == 504 and detail["status_sent"] == 200
    assert detail["outcome"] == "stream failed after content: timeout"
    assert detail["attempts"][0]["status"] is None
    assert detail["attempts"][0]["action"] == "fail"
    assert detail["error"] == "The upstream sent nothing for 5 s."
    assert "Once upon" in detail["response"]
    assert detail["timing"]["first_content"] is not None


def test_sections_are_cut_at_the_limit(tmp_path: Path) -> None:
    rec = RequestRecord("big", "/v1/chat/completions")
    rec.body = orjson.dumps({"image": "A" * (SECTION_LIMIT * 3)})
    rec.add_attempt(status=200, action="deliver", reason="good reply")
    rec.finish(200)
    path = tmp_path / "big.log"
    path.write_text(format_request_log(rec, Logging()), encoding="utf-8")
    detail = read_request_log(str(path))
    assert detail is not None
    assert len(detail["request_body"]) <= SECTION_LIMIT
    assert detail["truncated"] == ["REQUEST DATA"]
    assert detail["attempts"][0]["action"] == "deliver"  # found after the cut section


def test_an_unreadable_file_is_none(tmp_path: Path) -> None:
    assert read_request_log(str(tmp_path / "missing.log")) is None
    target = tmp_path / "real.log"
    target.write_text("x")
    link = tmp_path / "link.log"
    link.symlink_to(target)
    assert read_request_log(str(link)) is None  # never through a symlink


def test_rule_lines_that_are_not_headings_are_kept() -> None:
    text = f"head\n{RULE}\n{RULE}\nREQUEST DATA:\n{RULE}\nbody\n{RULE}\nnothing\n"
    sections = split_sections(text.splitlines(keepends=True))
    assert [s.title for s in sections] == ["", "REQUEST DATA"]
    assert sections[0].text() == f"head\n{RULE}"
    assert sections[1].text() == f"body\n{RULE}\nnothing"
    assert len(RULE) < request_detail.PIECE
