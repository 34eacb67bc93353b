"""What the usage totals cost the request path: per request, and per streamed event.

Run: .venv/bin/python bench/bench_usage.py
Figures are the best of several runs, in nanoseconds. For scale: the proxy spends
about 260 us of CPU per request with logging off (RESULTS.md, "CPU per request").
The database writes are not on the request path (a thread of their own, every few
seconds); their cost is shown last, for a batch.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

from first_hop_proxy.config import Usage
from first_hop_proxy.usage import (
    Database,
    StreamUsage,
    UsageTotals,
    ask_for_usage,
    count_request,
)

USAGE = {"prompt_tokens": 1234, "completion_tokens": 321, "total_tokens": 1555}


def best_ns(fn: Callable[[], object], n: int, repeat: int = 7) -> float:
    """The best of ``repeat`` runs of ``n`` calls, per call, in ns (loop overhead removed)."""

    def empty() -> None:
        pass

    def run(f: Callable[[], object]) -> float:
        start = time.perf_counter_ns()
        for _ in range(n):
            f()
        return (time.perf_counter_ns() - start) / n

    return min(run(fn) for _ in range(repeat)) - min(run(empty) for _ in range(repeat))


def chunk(text: str, **extra: Any) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        **extra,
    }
    return b"data: " + orjson.dumps(body)


def show(label: str, ns: float) -> None:
    print(f"  {label:<40} {ns:8.0f} ns")


def bench_request() -> None:
    totals = UsageTotals(lambda: Usage())
    settings = SimpleNamespace(config=SimpleNamespace(usage=Usage()))
    ex: Any = SimpleNamespace(
        calls=1,
        chat=SimpleNamespace(model="gpt-4o-mini"),
        upstream=SimpleNamespace(name="default"),
        settings=settings,
        state=SimpleNamespace(usage=totals),
        key_label="...x7Qa",
        usage=USAGE,
    )
    print("per request (the hook in forwarding.finish):")
    show("count_request, a reply with usage", best_ns(lambda: count_request(ex, 200), 200_000))
    ex.usage = None
    show("count_request, no usage (a failure)", best_ns(lambda: count_request(ex, 502), 200_000))
    add = totals.add
    show("UsageTotals.add alone", best_ns(lambda: add("default", "", "m", False, USAGE), 200_000))


def bench_stream() -> None:
    plain = chunk("Hello there, how")
    nulled = chunk("Hello there, how", usage=None)
    last = b"data: " + orjson.dumps({"id": "c", "choices": [], "usage": USAGE})
    ex: Any = SimpleNamespace(usage=None)
    watching, hiding = StreamUsage(ex, False), StreamUsage(ex, True)
    needle = b'"usage"'
    print(f"per streamed event ({len(plain)} bytes):")
    show("the check, an event without usage", best_ns(lambda: needle in plain, 1_000_000))
    show('see(), "usage": null, relayed', best_ns(lambda: watching.see(nulled), 200_000))
    show('see(), "usage": null, removed', best_ns(lambda: hiding.see(nulled), 200_000))
    show("see(), the usage chunk (once a stream)", best_ns(lambda: hiding.see(last), 200_000))


def bench_track_streams() -> None:
    big = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x" * 1_000_000}]}
    raw = orjson.dumps(big)

    def splice() -> None:
        chat: Any = SimpleNamespace(payload=big, body=raw)
        ask_for_usage(Usage(track_streams=True), chat)

    print("track_streams, a 1 MB request body (once per stream request):")
    show("the option added to the bytes", best_ns(splice, 200))
    show("(serializing the body again instead)", best_ns(lambda: orjson.dumps(big), 200))


async def bench_flush() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "usage.sqlite3")
        db = Database()
        for rows in (1, 100):
            batch = {
                ("2025-01-01", "default", "", f"model-{i}"): [1, 0, 10, 5, 15] for i in range(rows)
            }
            db.write(path, batch)
            start = time.perf_counter()
            for _ in range(50):
                db.write(path, batch)
            took = (time.perf_counter() - start) / 50
            show(f"a batch of {rows} row(s)", took * 1e9)
        db.close()


if __name__ == "__main__":
    bench_request()
    bench_stream()
    bench_track_streams()
    print("the usage thread, every few seconds (not on the request path), per write:")
    asyncio.run(bench_flush())
