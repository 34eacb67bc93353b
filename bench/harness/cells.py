"""The measured run: every cell, each target in alternation within each run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from harness import DIRECT, FHP, FHP_MIX, LITELLM, ORDER, PASS, TARGET_LABELS, WRK_ONLY, log
from harness.load import ensure_wrk, run_wrk, stream_cell, tree_kb, wrk_script
from harness.lost import nothing_lost
from harness.measure import Plan, measure, short
from harness.stats import summarize
from harness.sustained import sustained_c16
from harness.targets import Stack, log_files, stop


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


def run_bench(
    plan: Plan, work: Path, gap_ms: float, only: set[str] | None = None
) -> dict[str, Any]:
    """Every cell, then the paced c=16 and the nothing-lost checks.

    ``only``: measure just these targets (and the fake upstream), to try the harness.
    """
    ensure_wrk()
    script = wrk_script(work, "post.lua")
    started = time.time()
    results: dict[str, Any] = {"cells": {}, "plan": plan.__dict__, "gap_ms": gap_ms}
    wanted = [n for n in ORDER if only is None or n in only or n == DIRECT]
    with Stack(work, gap_ms, wanted) as stack:
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
                    target = stack.targets.get(name)
                    if (
                        target is None
                        or not target.available
                        or (kind != "wrk" and name in WRK_ONLY)
                    ):
                        runs[name].append(None)
                        continue
                    runs[name].append(measure(target, kind, load, plan, script))
                    figures = runs[name][-1] or {}
                    log(f"{cell} run {run + 1}/{plan.runs} {name}: {short(figures)}")
            results["cells"][cell] = {"kind": kind, "load": load, "runs": runs}
        if 16 in plan.concurrencies and {FHP, PASS} <= set(stack.targets):
            results["sustained"] = sustained_c16(stack, plan, work)
        if plan.stream_counts:
            results["fresh"] = fresh_stream_rss(stack, max(plan.stream_counts), plan)
        for name, target in stack.targets.items():
            if target.available and "log_folder" in target.extra:
                requests, errors = log_files(Path(target.extra["log_folder"]))
                results["targets"][name]["request_logs_written"] = requests
                results["targets"][name]["error_logs_written"] = errors
    if only is None or FHP_MIX in only:
        results["nothing_lost"] = nothing_lost(work, gap_ms, plan)
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
        fresh = stack.start_passthrough() if name == PASS else stack.start_fhp(FHP)
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
