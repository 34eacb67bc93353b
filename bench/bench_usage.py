"""What the usage totals cost the request path: per request, and per streamed event.

Run: .venv/bin/python bench/bench_usage.py [--e2e]
Figures are the best of several runs, in nanoseconds. For scale: the proxy spends
about 260 us of CPU per request with logging off (RESULTS.md, "CPU per request").
The database writes are not on the request path (a thread of their own, every few
seconds); their cost is shown last, for a batch.

``--e2e`` also runs the proxy twice, usage totals on and off (logging off in both,
so that only the totals differ), against the bench's fake upstream, with wrk at
c=1 and c=16 in alternation, and prints the CPU per request of each: a whole-proxy
figure, whose noise on a shared machine is far larger than the hook itself.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import yaml

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


def bench_e2e(runs: int = 5, seconds: float = 4.0) -> None:
    """The whole proxy, usage totals on and off: CPU per request, medians of ``runs``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness.load import cpu_seconds, run_wrk, wrk_script
    from harness.targets import free_port, spawn, stop, wait_http

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        port = free_port()
        bench = Path(__file__).resolve().parent
        procs = [
            spawn(
                [sys.executable, str(bench / "upstream.py"), "--port", str(port)], work / "up.log"
            )
        ]
        try:
            assert wait_http(f"http://127.0.0.1:{port}/v1/models", procs[0], 20) is None
            urls = {}
            for name, enabled in (("usage on", True), ("usage off", False)):
                home = work / name.replace(" ", "-")
                home.mkdir()
                own = free_port()
                config = {
                    "target_proxy": {"url": f"http://127.0.0.1:{port}/v1/chat/completions"},
                    "logging": {"enabled": False},
                    "error_logging": {"enabled": False},
                    "usage": {"enabled": enabled},
                }
                (home / "config.yaml").write_text(yaml.safe_dump(config), "utf-8")
                cmd = [sys.executable, "-m", "first_hop_proxy", "serve"]
                cmd += ["--config", str(home / "config.yaml"), "--port", str(own)]
                proc = spawn(cmd, home / "proxy.log")
                procs.append(proc)
                assert wait_http(f"http://127.0.0.1:{own}/health", proc, 30) is None
                urls[name] = (f"http://127.0.0.1:{own}/v1/chat/completions", proc.pid)
            script = wrk_script(work, "post.lua")
            for conns in (1, 16):
                cpu: dict[str, list[float]] = {name: [] for name in urls}
                for _ in range(runs):
                    for name, (url, pid) in urls.items():
                        before = cpu_seconds(pid)[0]
                        result = run_wrk(script, url, conns, seconds)
                        cpu[name].append((cpu_seconds(pid)[0] - before) / result["requests"])
                print(f"the whole proxy, c={conns}, CPU per request (median of {runs}):")
                for name, values in cpu.items():
                    spread = f"{min(values) * 1e6:.0f}-{max(values) * 1e6:.0f}"
                    show(f"{name} (runs: {spread} us)", statistics.median(values) * 1e9)
        finally:
            for proc in reversed(procs):
                stop(proc)


if __name__ == "__main__":
    bench_request()
    bench_stream()
    bench_track_streams()
    print("the usage thread, every few seconds (not on the request path), per write:")
    asyncio.run(bench_flush())
    if "--e2e" in sys.argv:
        bench_e2e()
