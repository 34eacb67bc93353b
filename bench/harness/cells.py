"""The measured run: every cell, each target in alternation within each run."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import FHP, LITELLM, MASTER_KEY, ORDER, PASS, TARGET_LABELS, log
from harness.load import WRK_LUA, chat_body, ensure_wrk, reset_peak, run_wrk, stream_cell, tree_kb
from harness.report import fmt
from harness.stats import summarize
from harness.targets import (
    Stack,
    Target,
    log_backlog,
    log_files,
    stop,
    wait_log_drained,
    writer_status,
)


@dataclass
class Plan:
    runs: int
    wrk_seconds: float
    concurrencies: list[int]
    stream_counts: list[int]
    stream_limit_s: float
    quick: bool


def cell_names(plan: Plan) -> list[tuple[str, str, int]]:
    return [(f"c{c}", "wrk", c) for c in plan.concurrencies] + [
        (f"s{n}", "streams", n) for n in plan.stream_counts
    ]


def warm_up(stack: Stack, script: Path) -> None:
    for name, target in stack.targets.items():
        if not target.available:
            continue
        log(f"warm-up {name}")
        try:
            run_wrk(script, target.url, 8, 1 if name != LITELLM else 3)
            asyncio.run(stream_cell(target.url, 20, 60))
        except Exception as exc:  # a failed warm-up shows in the cells
            log(f"warm-up {name} failed: {exc}")


def run_bench(plan: Plan, work: Path, gap_ms: float) -> dict[str, Any]:
    ensure_wrk()
    script = work / "post.lua"
    script.write_text(
        WRK_LUA % {"body": chat_body(stream=False).decode(), "key": MASTER_KEY}, "utf-8"
    )
    started = time.time()
    results: dict[str, Any] = {"cells": {}, "plan": plan.__dict__, "gap_ms": gap_ms}
    with Stack(work, gap_ms, ORDER) as stack:
        stack.start()
        warm_up(stack, script)
        results["targets"] = {
            name: {
                "label": TARGET_LABELS[name],
                "available": t.available,
                "reason": t.reason,
                "version": t.version,
                **t.extra,
            }
            for name, t in stack.targets.items()
        }
        for cell, kind, load in cell_names(plan):
            runs: dict[str, list[dict[str, Any] | None]] = {name: [] for name in ORDER}
            for run in range(plan.runs):
                for name in ORDER:
                    target = stack.targets[name]
                    if not target.available:
                        runs[name].append(None)
                        continue
                    runs[name].append(measure(target, kind, load, plan, script))
                    figures = runs[name][-1] or {}
                    log(f"{cell} run {run + 1}/{plan.runs} {name}: {short(figures)}")
            results["cells"][cell] = {"kind": kind, "load": load, "runs": runs}
        if plan.stream_counts:
            results["fresh"] = fresh_stream_rss(stack, max(plan.stream_counts), plan)
        for name, target in stack.targets.items():
            if target.available and "log_folder" in target.extra:
                requests, errors = log_files(Path(target.extra["log_folder"]))
                results["targets"][name]["request_logs_written"] = requests
                results["targets"][name]["error_logs_written"] = errors
    results["elapsed_s"] = round(time.time() - started, 1)
    results["summary"] = summarize(results)
    return results


def fresh_stream_rss(stack: Stack, streams: int, plan: Plan) -> dict[str, Any]:
    """Peak RSS during ``streams`` streams in a freshly started process (after 20 streams).

    The cells above run one long-lived process per target, whose RSS also holds what
    the earlier cells left behind; this separates the streams' own footprint.
    """
    out: dict[str, Any] = {}
    for name in (PASS, FHP):
        old = stack.targets.get(name)
        if old is None or not old.available:
            continue
        stop(old.proc)
        fresh = stack.start_passthrough() if name == PASS else stack.start_fhp(FHP, rules=False)
        if fresh.proc is not None:
            stack.procs.append(fresh.proc)
        stack.targets[name] = fresh
        if not fresh.available or fresh.pid is None:
            out[name] = {"error": fresh.reason}
            continue
        asyncio.run(stream_cell(fresh.url, 20, 60))
        start_rss = round(tree_kb(fresh.pid, "VmRSS") / 1024, 1)
        figures = measure(fresh, "streams", streams, plan, Path())
        if figures is not None:
            figures["rss_before_mb"] = start_rss
        out[name] = figures
        log(f"fresh {name}, {streams} streams: {short(figures or {})}")
    return out


def short(f: dict[str, Any]) -> str:
    if "rps" in f:
        return (
            f"{f['rps']:.0f} req/s p50 {f['p50_ms']:.2f} ms p99 {f['p99_ms']:.2f} ms "
            f"err {f['non_2xx'] + f['socket_errors']} rss {f.get('peak_rss_mb')} MB"
        )
    if "streams" in f:
        return (
            f"{f['completed']}/{f['streams']} ok, ttft p50 {fmt(f['ttft_p50_ms'])} "
            f"p99 {fmt(f['ttft_p99_ms'])} ms, {f['wall_s']} s, rss {f.get('peak_rss_mb')} MB "
            f"{f['fail_reasons'] or ''}"
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
        for key in ("written", "dropped"):
            if isinstance(after.get(key), int) and isinstance(before.get(key), int):
                figures[f"logs_{key}"] = after[key] - before[key]
        if "rps" in figures:
            ok = figures["requests"] - figures["non_2xx"]
            span = figures["duration_s"] + figures["log_catch_up_s"]
            figures["rps_with_log_catch_up"] = round(ok / span, 1) if span else None
    time.sleep(0.3)
    return figures
