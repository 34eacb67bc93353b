"""Helpers for the end-to-end logging tests: wait for the log writer, find and parse logs."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path
from typing import Any

from first_hop_proxy.logs.writer import LogWriter
from first_hop_proxy.server import RunningServer
from first_hop_proxy.state import STATE, State

REQUEST_NAME = re.compile(r"^(\d{8})_(\d{6})_(\d{3})_([A-Za-z0-9-]+)\.log$")
ERROR_NAME = re.compile(r"^(?P<code>[A-Za-z0-9_-]+?)_(\d{8})_(\d{6})_(\d{3})(?:_\d+)?\.log$")
SPEC_DETAIL_KEYS = (  # in the order the error log writes them
    "timestamp",
    "error_type",
    "error_message",
    "status_code",
    "status_text",
    "url",
    "headers",
    "response_text",
    "context",
    "retry_attempt",
    "retry_delay",
    "request_id",
)
RULE = "-" * 40


def state_of(proxy: RunningServer) -> State:
    return proxy.runner.app[STATE]


async def settle(proxy: RunningServer) -> None:
    """Wait until the log writer has written everything queued so far."""
    await state_of(proxy).writer.drain()


def request_logs(folder: Path) -> dict[str, Path]:
    """Request log files in ``folder`` by request id."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in folder.iterdir():
        match = REQUEST_NAME.match(path.name)
        if match and path.is_file():
            assert match[4] not in found, f"two request logs for {match[4]}"
            found[match[4]] = path
    return found


def error_logs(folder: Path, code: str | None = None) -> list[Path]:
    """Error log files in ``folder`` (optionally of one code), in name order."""
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.iterdir()):
        match = ERROR_NAME.match(path.name)
        if match and path.is_file() and (code is None or match["code"] == code):
            out.append(path)
    return out


def error_details(text: str) -> dict[str, Any]:
    """The ERROR DETAILS JSON object of an error log."""
    marker = f"ERROR DETAILS:\n{RULE}\n"
    start = text.index(marker) + len(marker)
    details, _ = json.JSONDecoder().raw_decode(text, start)
    assert isinstance(details, dict)
    return details


def section(text: str, title: str) -> str:
    """The body of the section ``title`` (up to the next section rule or the end banner)."""
    head = f"{RULE}\n{title}\n{RULE}\n"
    start = text.index(head) + len(head)
    ends = [i for i in (text.find(f"\n\n{RULE}\n", start), text.find("\n\n====", start)) if i >= 0]
    return text[start : min(ends)] if ends else text[start:]


async def hold(writer: LogWriter) -> threading.Event:
    """Keep the writer's thread busy until the returned event is set: a forced backlog.

    Returns once the thread is inside the holding job, so every job queued after
    this waits (the holding job itself is no longer in the queue).
    """
    gate, running = threading.Event(), threading.Event()

    def job() -> None:
        running.set()
        gate.wait(30)

    writer.submit_call(job)
    await writer.start()
    assert await asyncio.to_thread(running.wait, 10), "the writer thread never ran the job"
    return gate
