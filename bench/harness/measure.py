"""One measurement of one target: a wrk run or a stream cell, with what it cost the target."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.load import cpu_seconds, reset_peak, run_wrk, stream_cell, tree_kb
from harness.report import fmt
from harness.targets import Target, log_backlog, wait_log_drained, writer_status


@dataclass
class Plan:
    runs: int
    wrk_seconds: float
    concurrencies: list[int]
    stream_counts: list[int]
    stream_limit_s: float
    quick: bool


def short(f: dict[str, Any]) -> str:
    cpu = f" cpu {f['cpu_us_per_req']:.0f} us/req" if f.get("cpu_us_per_req") else ""
    dropped = f" dropped {f['logs_dropped']}" if f.get("logs_dropped") else ""
    if "rps" in f:
        return (
            f"{f['rps']:.0f} req/s p50 {f['p50_ms']:.2f} ms p99 {f['p99_ms']:.2f} ms "
            f"err {f['non_2xx'] + f['socket_errors']} rss {f.get('peak_rss_mb')} MB{cpu}{dropped}"
        )
    if "streams" in f:
        return (
            f"{f['completed']}/{f['streams']} ok, ttft p50 {fmt(f['ttft_p50_ms'])} "
            f"p99 {fmt(f['ttft_p99_ms'])} ms, {f['wall_s']} s, rss {f.get('peak_rss_mb')} MB"
            f"{cpu} {f['fail_reasons'] or ''}"
        )
    return str(f)


def measure(
    target: Target, kind: str, load: int, plan: Plan, script: Path
) -> dict[str, Any] | None:
    pid = target.pid
    if pid is None or (target.proc is not None and target.proc.poll() is not None):
        target.available = False
        target.reason = target.reason or "process exited during the run"
        return None
    reset_peak(pid)
    logged = "log_folder" in target.extra
    before = writer_status(target.url) if logged else {}
    cpu_before, main_before = cpu_seconds(pid)
    try:
        if kind == "wrk":
            figures = run_wrk(script, target.url, load, plan.wrk_seconds)
        else:
            figures = asyncio.run(stream_cell(target.url, load, plan.stream_limit_s))
    except Exception as exc:  # one failed cell must not stop the run
        return {"error": f"{type(exc).__name__}: {exc}"}
    figures["peak_rss_mb"] = round(tree_kb(pid, "VmHWM") / 1024, 1)
    figures["rss_mb"] = round(tree_kb(pid, "VmRSS") / 1024, 1)
    if logged:
        # Log work deferred to the writer thread must not spill into the next measurement.
        figures["log_backlog"] = log_backlog(target.url)
        figures["log_catch_up_s"] = wait_log_drained(target.url, 180)
        # Past its queue bound the writer drops new logs (and counts them): say how many.
        after = writer_status(target.url)
        for key in ("written", "dropped", "lost", "waits"):
            if isinstance(after.get(key), int) and isinstance(before.get(key), int):
                figures[f"logs_{key}"] = after[key] - before[key]
        if "rps" in figures:
            ok = figures["requests"] - figures["non_2xx"]
            span = figures["duration_s"] + figures["log_catch_up_s"]
            figures["rps_with_log_catch_up"] = round(ok / span, 1) if span else None
    # CPU after the log writer caught up: the logs of these requests are part of their cost.
    cpu_after, main_after = cpu_seconds(pid)
    served = figures.get("requests") or figures.get("streams") or 0
    figures["cpu_s"] = round(cpu_after - cpu_before, 3)
    if served:
        figures["cpu_us_per_req"] = round((cpu_after - cpu_before) * 1e6 / served, 1)
        figures["cpu_main_us_per_req"] = round((main_after - main_before) * 1e6 / served, 1)
    time.sleep(0.3)
    return figures
