"""From runs to figures: medians, per-run pairs, ratios, and the issue's targets."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from harness import (
    DIRECT,
    FHP,
    FHP_ASYNCIO,
    FHP_NOLOG,
    FHP_RULES,
    FHP_RULES11,
    LITELLM,
    ORDER,
    PASS,
)

Runs = dict[str, list[dict[str, Any] | None]]


def median(values: Sequence[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def pairs(
    runs: Runs,
    name: str,
    ref: str,
    fn: Callable[[dict[str, Any], dict[str, Any]], float | None],
) -> list[float]:
    """``fn(run of name, run of ref)`` for each run index where both exist."""
    out = []
    for mine, theirs in zip(runs.get(name, []), runs.get(ref, []), strict=False):
        if mine and theirs and "error" not in mine and "error" not in theirs:
            with contextlib.suppress(TypeError, ZeroDivisionError):
                value = fn(mine, theirs)
                if value is not None:
                    out.append(value)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def added(runs: Runs, name: str, key: str) -> float | None:
    """Median over runs of ``key`` of ``name`` minus ``key`` of the direct run next to it."""
    return median(pairs(runs, name, DIRECT, lambda m, d: m[key] - d[key]))


def rps_ratio(runs: Runs, name: str, ref: str) -> float | None:
    """Median over runs of the throughput of ``name`` over that of ``ref`` next to it."""
    return median(pairs(runs, name, ref, lambda m, r: m["rps"] / r["rps"]))


def added_x_pass(runs: Runs, name: str, key: str) -> float | None:
    """Median over runs of what ``name`` adds to ``key`` over what the pass-through adds."""
    return median(
        [
            ratio(m[key] - d[key], p[key] - d[key])
            for m, p, d in zip(runs[name], runs[PASS], runs[DIRECT], strict=False)
            if m and p and d and "error" not in m and "error" not in p
            if m[key] is not None and p[key] is not None
        ]
    )


def cpu_ratio(runs: Runs, name: str, ref: str) -> float | None:
    """Median over runs of the CPU per request of ``name`` over that of ``ref`` next to it."""
    return median(pairs(runs, name, ref, lambda m, r: m["cpu_us_per_req"] / r["cpu_us_per_req"]))


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for cell, data in results["cells"].items():
        runs = data["runs"]
        per: dict[str, Any] = {}
        for name in ORDER:
            mine = [r for r in runs[name] if r and "error" not in r]
            if not mine:
                errors = [r["error"] for r in runs[name] if r and "error" in r]
                per[name] = {"runs": 0, "errors": errors}
                continue
            s: dict[str, Any] = {"runs": len(mine)}
            s["peak_rss_mb"] = max(r["peak_rss_mb"] for r in mine)
            s["cpu_us_per_req"] = median([r.get("cpu_us_per_req") for r in mine])
            s["cpu_main_us_per_req"] = median([r.get("cpu_main_us_per_req") for r in mine])
            if name not in (DIRECT, PASS):
                s["cpu_x_pass"] = cpu_ratio(runs, name, PASS)
            if any("logs_dropped" in r for r in mine):
                s["logs_dropped"] = sum(r.get("logs_dropped", 0) for r in mine)
                s["logs_due"] = s["logs_dropped"] + sum(r.get("logs_written", 0) for r in mine)
            if data["kind"] == "wrk":
                s["rps"] = median([r["rps"] for r in mine])
                s["p50_ms"] = median([r["p50_ms"] for r in mine])
                s["p99_ms"] = median([r["p99_ms"] for r in mine])
                s["errors"] = sum(r["non_2xx"] + r["socket_errors"] for r in mine)
                if any("rps_with_log_catch_up" in r for r in mine):
                    s["rps_with_log_catch_up"] = median(
                        [r.get("rps_with_log_catch_up") for r in mine]
                    )
                    s["x_pass_rps_with_log_catch_up"] = median(
                        pairs(
                            runs,
                            name,
                            PASS,
                            lambda m, p: m["rps_with_log_catch_up"] / p["rps"],
                        )
                    )
                if name != DIRECT:
                    s["added_p50_ms"] = added(runs, name, "p50_ms")
                    s["added_p99_ms"] = added(runs, name, "p99_ms")
                    s["x_direct_rps"] = rps_ratio(runs, name, DIRECT)
                if name not in (DIRECT, PASS):
                    s["x_pass_rps"] = rps_ratio(runs, name, PASS)
                    s["added_p50_x_pass"] = added_x_pass(runs, name, "p50_ms")
            else:
                s["completed"] = median([r["completed"] for r in mine])
                s["failed"] = median([r["failed"] for r in mine])
                s["failed_total"] = sum(r["failed"] for r in mine)
                s["streams_total"] = sum(r["streams"] for r in mine)
                s["events_delivered_total"] = sum(r["events_delivered"] for r in mine)
                s["events_expected_total"] = sum(r["events_expected"] for r in mine)
                s["ttft_p50_ms"] = median([r["ttft_p50_ms"] for r in mine])
                s["ttft_p99_ms"] = median([r["ttft_p99_ms"] for r in mine])
                s["wall_s"] = median([r["wall_s"] for r in mine])
                if name != DIRECT:
                    s["added_ttft_p50_ms"] = added(runs, name, "ttft_p50_ms")
                    s["added_ttft_p99_ms"] = added(runs, name, "ttft_p99_ms")
                if name not in (DIRECT, PASS):
                    s["added_ttft_p50_x_pass"] = added_x_pass(runs, name, "ttft_p50_ms")
            per[name] = s
        if data["kind"] == "wrk":
            per["rules_x_default_rps"] = rps_ratio(runs, FHP_RULES, FHP)
            per["rules11_x_default_rps"] = rps_ratio(runs, FHP_RULES11, FHP)
            per["fhp_x_litellm_rps"] = rps_ratio(runs, FHP, LITELLM)
            per["rules11_x_default_cpu"] = cpu_ratio(runs, FHP_RULES11, FHP)
            per["fhp_x_litellm_cpu"] = cpu_ratio(runs, FHP, LITELLM)
            per["asyncio_x_uvloop_cpu"] = cpu_ratio(runs, FHP_ASYNCIO, FHP)
        summary[cell] = per
    return summary


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 15's targets, each with the measured value and pass/miss."""
    bench = results.get("bench", {})
    summary = bench.get("summary", {})
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: str, ok: bool | None, note: str = "") -> None:
        out.append({"target": name, "value": value, "limit": limit, "pass": ok, "note": note})

    def get(cell: str, target: str, key: str) -> Any:
        return summary.get(cell, {}).get(target, {}).get(key)

    def dropped_note(cell: str, target: str) -> tuple[bool, str]:
        lost = get(cell, target, "logs_dropped") or 0
        return lost == 0, f"{lost} of {get(cell, target, 'logs_due') or 0} logs dropped"

    all_kept, note = dropped_note("c1", FHP)
    v = get("c1", FHP, "cpu_x_pass")
    add(
        "CPU per request vs pass-through, default config, c=1 (every log written)",
        v,
        "<= 2.0x",
        all_kept and le(v, 2.0) if v is not None else None,
        note,
    )
    sustained = bench.get("sustained") or {}
    best = sustained.get("best") or {}
    v = sustained.get("cpu_x_pass")
    add(
        "CPU per request vs pass-through, default config, c=16 (every log written: paced)",
        v,
        "<= 2.0x",
        le(v, 2.0),
        f"at {fmt_num(best.get('rps'))} req/s, against the pass-through back to back",
    )
    v = get("c16", FHP, "cpu_x_pass")
    add(
        "CPU per request vs pass-through, default config, c=16 back to back",
        v,
        "<= 2.0x (information)",
        le(v, 2.0),
        dropped_note("c16", FHP)[1],
    )
    for cell in ("c1", "c16"):
        v = get(cell, FHP_NOLOG, "cpu_x_pass")
        add(f"CPU per request vs pass-through, logging off, c={cell[1:]}", v, "<= 1.3x", le(v, 1.3))
    v = sustained.get("x_pass_rps")
    add(
        "c=16 throughput with every log written (paced, catch-up counted) vs pass-through",
        v,
        ">= 0.45x",
        ge(v, 0.45),
    )
    v = get("c1", FHP, "added_p50_x_pass")
    add("c=1 added p50 vs pass-through's (logging on)", v, "<= 1.5x", le(v, 1.5))
    v = get("c1", FHP, "added_p99_ms")
    add("c=1 added p99 over direct, ms (logging on)", v, "<= 2 ms", le(v, 2.0))
    s1000 = summary.get("s1000", {}).get(FHP, {})
    if s1000.get("runs"):
        missing = s1000["events_expected_total"] - s1000["events_delivered_total"]
        add(
            "1000 streams: content events not delivered",
            missing,
            "0",
            missing == 0 and s1000["failed_total"] == 0,
            f"{s1000['streams_total'] - s1000['failed_total']}/{s1000['streams_total']} "
            "streams complete with [DONE]",
        )
        v = s1000.get("added_ttft_p50_x_pass")
        add("1000 streams: added TTFT p50 vs pass-through's", v, "<= 1.1x", le(v, 1.1))
        v = s1000.get("peak_rss_mb")
        add(
            "1000 streams: proxy peak RSS, MB (long-running process, after the c=1..64 cells)",
            v,
            "< 100 MB",
            lt(v, 100),
        )
        fresh = (bench.get("fresh") or {}).get(FHP) or {}
        if "peak_rss_mb" in fresh:
            v = fresh["peak_rss_mb"]
            add(
                "1000 streams: proxy peak RSS, MB (freshly started process)",
                v,
                "< 100 MB",
                lt(v, 100),
                f"{fresh['completed']}/{fresh['streams']} streams complete",
            )
    c16 = summary.get("c16", {})
    lite_ok = c16.get(LITELLM, {}).get("runs", 0) > 0
    lite_note = "" if lite_ok else "LiteLLM unavailable"
    v = c16.get("fhp_x_litellm_rps")
    add("c=16 throughput vs LiteLLM", v, ">= 30x", ge(v, 30) if lite_ok else None, lite_note)
    share = c16.get("fhp_x_litellm_cpu")
    v = 1 / share if share else None
    add(
        "c=16 CPU per request: LiteLLM's over first-hop-proxy's",
        v,
        ">= 20x",
        ge(v, 20) if lite_ok else None,
        lite_note,
    )
    for cell, limit in (("c1", "<= 1.2x"), ("c16", "<= 1.2x (information: logs dropped differ)")):
        v = summary.get(cell, {}).get("rules11_x_default_cpu")
        add(
            f"rewrite rules without the empty-matching '|': CPU per request vs default, "
            f"c={cell[1:]}",
            v,
            limit,
            le(v, 1.2),
        )
    for cell in ("c1", "c16"):
        v = summary.get(cell, {}).get("asyncio_x_uvloop_cpu")
        add(
            f"uvloop: CPU per request on asyncio's own loop vs on uvloop, c={cell[1:]}",
            v,
            "> 1x: uvloop adopted (information)",
            None if v is None else v > 1,
        )
    lost = bench.get("nothing_lost") or {}
    c64 = lost.get("c64") or {}
    if "every_failure_logged" in c64:
        missing = c64["failures_without_request_log"] + c64["failures_without_error_log"]
        add(
            "c=64, 1 request in 10 failing: failure logs missing from disk",
            missing,
            "0",
            c64["every_failure_logged"],
            f"{c64['failed_seen_by_client']} failures seen by the client, each looked up by "
            "its request id; "
            f"{c64.get('logs_dropped', 0)} plain-success logs dropped",
        )
    paced = lost.get("paced") or {}
    if "nothing_dropped" in paced:
        v = paced["logs_dropped"] + paced["logs_lost"] + paced["failures_without_request_log"]
        add(
            f"{paced['rate']:.0f} req/s for {paced['seconds']:.0f} s: logs dropped",
            v,
            "0",
            paced["nothing_dropped"],
            f"{paced['request_logs_on_disk']} request logs on disk for {paced['sent']} requests",
        )
    for key, title in (("soak", "soak"), ("soak_paced", "paced soak")):
        soak = results.get(key)
        if not soak:
            continue
        note = soak.get("aborted", "")
        add(f"{title}: errors", soak["errors"], "0", soak["errors"] == 0, note)
        v = soak["rss_growth_mb"]
        add(f"{title}: RSS growth after warm-up, MB", v, "< 10 MB", lt(v, 10), note)
        if "fd_growth" in soak:
            v = soak["fd_growth"]
            add(
                f"{title}: file descriptor growth",
                v,
                "<= 0",
                le(v, 0),
                f"{soak['fds_start']} -> {soak['fds_end']}, both idle",
            )
        if "failure_logs_missing" in soak:
            v = soak["failure_logs_missing"]
            add(
                f"{title}: failure logs dropped or missing",
                v,
                "0",
                v == 0,
                f"{soak['failed_on_purpose']} failures, each with its error log on disk",
            )
    return out


def fmt_num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def le(v: float | None, limit: float) -> bool | None:
    return None if v is None else v <= limit


def ge(v: float | None, limit: float) -> bool | None:
    return None if v is None else v >= limit


def lt(v: float | None, limit: float) -> bool | None:
    return None if v is None else v < limit
