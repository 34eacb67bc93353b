"""A request log file read back into its parts, for the dashboard's request view.

The request log (:mod:`request_log`) is the one record of what happened to a
request, already redacted; this turns its sections back into JSON: the
request's headers and body, each upstream attempt (status, decision, delay,
error), the rewrite, the final reply or error, and the timing. The file is read
in pieces and every section is cut at :data:`SECTION_LIMIT` characters, so a
log holding a 50 MB image costs no more memory than a small one.

Sections and attempt fields come in a fixed order, so a heading or field name
out of order is read as text. Bodies are JSON with their newlines escaped;
only a raw text (a non-JSON body, a streamed reply) could hold a line that
looks like a later heading, and then the view splits there; the raw file link
shows it as written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from .request_log import BANNER, RULE

#: Characters kept per section; the page links to the raw file for the rest.
SECTION_LIMIT = 256 * 1024
#: A file is read in pieces of at most this many characters (a line may be longer).
PIECE = 64 * 1024

_TITLE = re.compile(
    r"(REQUEST HEADERS|REQUEST DATA|ORIGINAL REQUEST DATA \(before rewrite rules\)"
    r"|UPSTREAM ATTEMPT #(?P<n>\d+)|STREAM RESUME #(?P<resume>\d+)|ERROR|RESPONSE HEADERS"
    r"|FINAL RESPONSE DATA"
    r"|TIMING INFORMATION):\n"
)
_ORDER = {
    "REQUEST HEADERS": 0,
    "REQUEST DATA": 1,
    "ORIGINAL REQUEST DATA (before rewrite rules)": 2,
    "UPSTREAM ATTEMPT": 3,
    "STREAM RESUME": 4,
    "ERROR": 5,
    "RESPONSE HEADERS": 6,
    "FINAL RESPONSE DATA": 7,
    "TIMING INFORMATION": 8,
}
_RULE_LINE = RULE + "\n"
_SECONDS = re.compile(r"^(-?[0-9.]+) seconds?$")
_ATTEMPT_FIELDS = {
    "Upstream": "upstream",
    "Status": "status",
    "Duration": "duration",
    "Decision": "decision",
    "Recategorized": "recategorized",
    "Error": "error",
    "Note": "note",
    "Delay Before Next Attempt": "delay",
}
#: The line after which the rest of an attempt's section is what the upstream replied.
_REPLY_LINE = "Upstream Reply:"
_FIELD_ORDER = list(_ATTEMPT_FIELDS.values())


def _rank(title: str) -> tuple[int, int]:
    """Where a section comes in the log: a heading out of order is text, not a section."""
    if not title:
        return (-1, 0)
    name, _, number = title.partition(" #")
    return (_ORDER[name], int(number or 0))


class _Section:
    __slots__ = ("parts", "rank", "size", "title", "truncated")

    def __init__(self, title: str) -> None:
        self.title = title
        self.rank = _rank(title)
        self.parts: list[str] = []
        self.size = 0
        self.truncated = False

    def add(self, piece: str) -> None:
        room = SECTION_LIMIT - self.size
        if room <= 0:
            self.truncated = True
            return
        if len(piece) > room:
            piece, self.truncated = piece[:room], True
        self.parts.append(piece)
        self.size += len(piece)

    def text(self) -> str:
        text = "".join(self.parts)
        return text[:-1] if text.endswith("\n") else text


def split_sections(pieces: Iterable[str]) -> list[_Section]:
    """The head (title ``""``) and each ``RULE / TITLE: / RULE`` section, in order.

    ``pieces`` are line pieces as ``readline(n)`` gives them: a piece that does
    not end in a newline is continued by the next one.
    """
    sections = [_Section("")]
    pending: list[str] = []  # the start of what may be a section heading
    line_start = True
    for piece in pieces:
        whole_rule = line_start and piece == _RULE_LINE
        if pending:
            pending.append(piece)
            if (
                len(pending) == 2
                and line_start
                and _TITLE.fullmatch(piece)
                and _rank(piece[:-2]) > sections[-1].rank
            ):
                line_start = piece.endswith("\n")
                continue
            if len(pending) == 3 and whole_rule:
                current = sections[-1]
                if current.parts and current.parts[-1] == "\n":  # the blank line before it
                    current.parts.pop()
                    current.size -= 1
                sections.append(_Section(pending[1][:-2]))  # without ":\n"
                pending = []
                line_start = True
                continue
            # Not a heading after all: the held pieces are text (a rule may start another).
            held, pending = pending, []
            if whole_rule:
                held, pending = held[:-1], [piece]
            for text in held:
                sections[-1].add(text)
        elif whole_rule:
            pending = [piece]
        else:
            sections[-1].add(piece)
        line_start = piece.endswith("\n")
    for text in pending:
        sections[-1].add(text)
    return sections


def _strip_trailer(text: str) -> str:
    end = text.rfind(f"\n{BANNER}\nLOG COMPLETE")
    return text[:end].rstrip("\n") if end >= 0 else text


def _fields(text: str) -> Iterator[tuple[str, str]]:
    """``Name: value`` lines; a line without a known name continues the previous value."""
    for line in text.split("\n"):
        name, sep, value = line.partition(": ")
        yield (name, value) if sep else ("", line)


def _seconds(value: str) -> float | None:
    match = _SECONDS.match(value.strip())
    return float(match[1]) if match else None


def _status(value: str) -> int | None:
    return int(value) if value.strip().isdigit() else None


def _attempt(number: int, text: str) -> dict[str, Any]:
    attempt: dict[str, Any] = {
        "n": number,
        "upstream": "",
        "key": "",
        "status": None,
        "duration": None,
        "action": "",
        "reason": "",
        "recategorized": "",
        "error": "",
        "note": "",
        "delay": None,
        "reply": None,
    }
    text, found, reply = text.partition("\n" + _REPLY_LINE + "\n")
    if found:
        attempt["reply"] = reply
    last, position = "", -1
    for name, value in _fields(text):
        key = _ATTEMPT_FIELDS.get(name)
        # The fields come in a fixed order: anything else continues a multi-line value
        # (an upstream's error text may well have an "Error: ..." line of its own).
        if key is None or _FIELD_ORDER.index(key) <= position:
            if last in ("error", "note", "reason", "recategorized"):
                attempt[last] += "\n" + (f"{name}: {value}" if name else value)
            continue
        last, position = key, _FIELD_ORDER.index(key)
        if key == "status":
            attempt["status"] = _status(value)
        elif key in ("duration", "delay"):
            attempt[key] = _seconds(value)
        elif key == "upstream":  # "name" or "name (key abcd)"
            name, _, pool_key = value.partition(" (key ")
            attempt["upstream"], attempt["key"] = name, pool_key.removesuffix(")")
        elif key == "decision":
            action, _, reason = value.partition(" (")
            attempt["action"] = action
            attempt["reason"] = reason.removesuffix(")")
            last = "reason"
        else:
            attempt[key] = value
    return attempt


def _headers(text: str) -> list[list[str]]:
    return [[name, value] for name, value in _fields(text) if name]


def parse_request_log(pieces: Iterable[str]) -> dict[str, Any]:
    """The parts of one request log, as the dashboard shows them."""
    sections = split_sections(pieces)
    if sections[-1].title:
        last = sections[-1]
        text = _strip_trailer(last.text())
        last.parts, last.size = [text], len(text)
    head = dict(_fields(sections[0].text()))
    summary = re.match(
        r"(?P<status>\S+)\s+Attempts: (?P<attempts>\d+)(?:\s+Duration: (?P<duration>[0-9.]+) s)?",
        head.get("Final Status", ""),
    )
    out: dict[str, Any] = {
        "id": head.get("Request ID", ""),
        "endpoint": head.get("Endpoint", ""),
        "method": head.get("Method", ""),
        "client": head.get("Client"),
        "model": head.get("Model"),
        "stream": head.get("Stream") == "true",
        "time": head.get("Timestamp", ""),
        "status": _status(summary["status"]) if summary else None,
        "status_sent": _status(head.get("HTTP Status Sent", "").partition(" ")[0]),
        "outcome": head.get("Outcome", ""),
        "duration": float(summary["duration"]) if summary and summary["duration"] else None,
        "request_headers": [],
        "request_body": None,
        "original_body": None,
        "attempts": [],
        "resumes": [],
        "error": "",
        "response_headers": [],
        "response": None,
        "timing": {},
        "truncated": [],
    }
    for section in sections[1:]:
        text = section.text()
        if section.truncated:
            out["truncated"].append(section.title)
        title = _TITLE.fullmatch(section.title + ":\n")
        if title is not None and title["n"]:
            out["attempts"].append(_attempt(int(title["n"]), text))
        elif title is not None and title["resume"]:
            out["resumes"].append({"n": int(title["resume"]), "text": text})
        elif section.title == "REQUEST HEADERS":
            out["request_headers"] = _headers(text)
        elif section.title == "RESPONSE HEADERS":
            out["response_headers"] = _headers(text)
        elif section.title == "REQUEST DATA":
            out["request_body"] = text
        elif section.title.startswith("ORIGINAL REQUEST DATA"):
            out["original_body"] = text
        elif section.title == "ERROR":
            out["error"] = text
        elif section.title == "FINAL RESPONSE DATA":
            out["response"] = text
        elif section.title == "TIMING INFORMATION":
            timing = dict(_fields(text))
            out["timing"] = {
                "duration": _seconds(timing.get("Total Duration", "")),
                "first_content": _seconds(timing.get("Time To First Content", "")),
            }
    return out


def read_request_log(path: str) -> dict[str, Any] | None:
    """Parse the log at ``path`` (blocking: run it in a thread); None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # never through a link
        with open(fd, encoding="utf-8", errors="replace", newline="\n") as f:
            return parse_request_log(iter(lambda: f.readline(PIECE), ""))
    except OSError:
        return None
