"""The dashboard's error list: each error log summed up from its start and its end."""

from __future__ import annotations

from pathlib import Path

import pytest

from first_hop_proxy.config import ErrorLogging
from first_hop_proxy.dashboard import errors
from first_hop_proxy.dashboard.errors import ErrorIndex, read_summary
from first_hop_proxy.logs.error_log import ErrorEvent, error_file_name, format_error_log

URL = "http://127.0.0.1:9/v1/chat/completions"


def write(folder: Path, event: ErrorEvent) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = error_file_name(event)
    path = folder / name
    path.write_text(format_error_log(event, ErrorLogging(), name), encoding="utf-8")
    return path


def test_a_big_error_log_is_read_at_both_ends(tmp_path: Path) -> None:
    """The request id comes after the (huge) upstream reply: it is found in the tail."""
    event = ErrorEvent(
        503,
        "upstream_error",
        "x" * 1000,
        status_code=503,
        url=URL,
        request_id="req123",
        model="gpt-4o",
        response_text="<html>" + "y" * (errors.HEAD_BYTES * 2) + "</html>",
    )
    summary = read_summary(write(tmp_path, event))
    assert summary["request_id"] == "req123"
    assert summary["status_code"] == 503 and summary["url"] == URL
    assert len(summary["error_message"]) == errors.MESSAGE_LIMIT
    assert read_summary(tmp_path / "missing.log") == {}


def test_the_listing_is_limited_and_cached(tmp_path: Path) -> None:
    for i in range(5):
        write(tmp_path, ErrorEvent("bad_request", "BadRequest", f"n{i}", timestamp=1e9 + i))
    index = ErrorIndex()
    listing = index.listing(tmp_path, {URL: "default"}, limit=2)
    assert listing["total"] == 5 and listing["codes"] == {"bad_request": 5}
    assert [r["message"] for r in listing["files"]] == ["n4", "n3"]
    again = index.listing(tmp_path, {URL: "default"}, limit=2)
    assert again["files"] == listing["files"]  # from the cache: same summaries


def test_the_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(errors, "CACHE_SIZE", 2)
    for i in range(4):
        write(tmp_path, ErrorEvent("timeout", "Timeout", f"t{i}", timestamp=1e9 + i))
    index = ErrorIndex()
    assert len(index.listing(tmp_path, {})["files"]) == 4
    assert len(index._cache) == 2
