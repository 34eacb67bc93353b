"""Nothing lost: every failure's logs reach the disk, at saturation and at a steady pace.

A proxy of its own (``fhp-mix``: the default config with ``max_files`` raised, so
nothing is pruned) gets two loads, each with 1 request in ``FAIL_EVERY`` asking
for the model the fake upstream answers with a 400:

- ``c64``: wrk at 64 connections, back to back: the log writer falls behind and may
  drop request logs of plain successes, never a failure's request log or error log;
- ``paced``: ``PACED_RATE`` requests a second for a minute: no log of any kind dropped.

Afterwards the log folder is read: every request log's id and final status, every
error log's request id. Each check compares what the client saw, what the fake
upstream answered and what is on disk.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from harness import FAIL_EVERY, FHP_MIX, PACED_RATE, log
from harness.load import paced_mix, run_wrk, wrk_script
from harness.measure import Plan, measure, short
from harness.targets import Stack, logs_on_disk, upstream_counts, wait_log_drained, writer_status


def new_logs(folder: Path, seen: set[str]) -> tuple[dict[str, str], dict[str, int]]:
    """Request logs (id: final status) not in ``seen``, and the error logs' request ids."""
    disk = logs_on_disk(folder)
    fresh = {k: v for k, v in disk["request_status"].items() if k not in seen}
    return fresh, disk["error_ids"]


def saturated_mix(stack: Stack, plan: Plan, work: Path) -> dict[str, Any]:
    target = stack.targets[FHP_MIX]
    folder = Path(target.extra["log_folder"])
    script = wrk_script(work, "mix.lua", mix=True)
    run_wrk(script, target.url, 8, 1)  # warm-up
    wait_log_drained(target.url, 60)
    seen = set(logs_on_disk(folder)["request_status"])
    upstream_before = upstream_counts(stack.upstream_url)
    figures = measure(target, "wrk", 64, plan, script)
    if figures is None or "error" in figures:
        return {"error": (figures or {}).get("error", "first-hop-proxy exited")}
    answered = upstream_counts(stack.upstream_url)["failed"] - upstream_before["failed"]
    statuses, error_ids = new_logs(folder, seen)
    failed = figures.pop("failed_ids", [])  # the ids of the answers the client saw fail
    by_status = Counter(statuses.values())
    out = {
        **figures,
        "failed_seen_by_client": len(failed),
        "failed_answered_by_upstream": answered,
        "request_logs_by_status": dict(by_status),
        "failures_without_request_log": sum(1 for k in failed if statuses.get(k) != "400"),
        "failures_without_error_log": sum(1 for k in failed if k not in error_ids),
    }
    # Requests cut off when wrk stopped end as 499 (client went away): kept, no error log.
    out["every_failure_logged"] = (
        len(failed) == figures["non_2xx"] > 0
        and out["failures_without_request_log"] == 0
        and out["failures_without_error_log"] == 0
        and figures.get("logs_lost", 0) == 0
        and figures["socket_errors"] == 0
    )
    return out


def paced(stack: Stack, seconds: float) -> dict[str, Any]:
    target = stack.targets[FHP_MIX]
    folder = Path(target.extra["log_folder"])
    seen = set(logs_on_disk(folder)["request_status"])
    before = writer_status(target.url)
    load = asyncio.run(paced_mix(target.url, PACED_RATE, seconds))
    catch_up = wait_log_drained(target.url, 60)
    after = writer_status(target.url)
    statuses, error_ids = new_logs(folder, seen)
    failed_ids = load.pop("failed_ids")
    out: dict[str, Any] = {
        **load,
        "log_catch_up_s": catch_up,
        "logs_dropped": after.get("dropped", 0) - before.get("dropped", 0),
        "logs_lost": after.get("lost", 0) - before.get("lost", 0),
        "request_logs_on_disk": len(statuses),
        "failed": len(failed_ids),
        "failures_without_request_log": sum(1 for k in failed_ids if k not in statuses),
        "failures_without_error_log": sum(1 for k in failed_ids if k not in error_ids),
    }
    out["nothing_dropped"] = (
        out["logs_dropped"] == 0
        and out["logs_lost"] == 0
        and len(statuses) == load["sent"]
        and out["failures_without_request_log"] == 0
        and out["failures_without_error_log"] == 0
        and load["statuses"].get("200", 0) + len(failed_ids) == load["sent"]
    )
    return out


def nothing_lost(work: Path, gap_ms: float, plan: Plan) -> dict[str, Any]:
    folder = work / "nothing-lost"
    folder.mkdir(exist_ok=True)
    out: dict[str, Any] = {"fail_every": FAIL_EVERY, "paced_rate": PACED_RATE}
    with Stack(folder, gap_ms, [FHP_MIX]) as stack:
        stack.start()
        if not stack.targets[FHP_MIX].available:
            return {"error": stack.targets[FHP_MIX].reason}
        out["c64"] = saturated_mix(stack, plan, folder)
        log(f"nothing lost, c=64 with failures: {short(out['c64'])}")
        log(f"  every failure logged: {out['c64'].get('every_failure_logged')}")
        seconds = 5.0 if plan.quick else 60.0
        out["paced"] = paced(stack, seconds)
        log(
            f"nothing lost, {PACED_RATE:.0f} req/s for {seconds:.0f} s: "
            f"{out['paced']['request_logs_on_disk']}/{out['paced']['sent']} request logs, "
            f"dropped {out['paced']['logs_dropped']}, nothing dropped: "
            f"{out['paced']['nothing_dropped']}"
        )
    return out
