"""Server-sent events: re-framing a byte stream into whole events.

One socket read is not one event: reads both split and merge events under
load, so events are cut on the blank line that ends them, whatever the reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

DONE = b"[DONE]"


class EventSplitter:
    """Accumulates bytes and yields each complete event (without its blank line).

    Line endings are normalized to ``\\n`` so an event always goes out framed
    as ``<lines>\\n\\n``, whatever the upstream used.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        held = b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):  # may be the first half of a CRLF split by the read
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            event = buffer[start:end].lstrip(b"\n")
            start = end + 2
            if event:
                yield event
        self._buffer = buffer[start:] + held

    def flush(self) -> bytes | None:
        """What is left when the stream ends: a last event without its blank line."""
        rest, self._buffer = self._buffer.strip(b"\n"), b""
        return rest or None


def event_data(event: bytes) -> bytes | None:
    """The joined ``data:`` payload of an event, or None for comments and other fields."""
    if event.startswith(b"data:") and b"\n" not in event:
        return event[6:] if event[5:6] == b" " else event[5:]
    parts = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            parts.append(line[6:] if line[5:6] == b" " else line[5:])
    return b"\n".join(parts) if parts else None


def frame(data: bytes) -> bytes:
    """One ``data:`` event, with the blank line that ends it."""
    return b"data: " + data + b"\n\n"


def comment(text: str) -> bytes:
    """An SSE comment line: clients ignore it, but it keeps idle connections open."""
    return b": " + text.encode() + b"\n\n"


def parse_event(data: bytes | None) -> dict[str, Any] | None:
    """An event's data as a JSON object; None for no data, ``[DONE]``, or anything else."""
    if not data or data == DONE:
        return None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None
