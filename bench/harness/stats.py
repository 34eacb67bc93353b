"""From runs to figures: medians, per-run pairs, ratios, and the issue's targets."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from harness import DIRECT, FHP, FHP_NOLOG, FHP_RULES, FHP_RULES11, LITELLM, ORDER, PASS

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
        summary[cell] = per
    return summary


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and pass/miss."""
    summary = results.get("bench", {}).get("summary", {})
    soak = results.get("soak")
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: str, ok: bool | None, note: str = "") -> None:
        out.append({"target": name, "value": value, "limit": limit, "pass": ok, "note": note})

    def get(cell: str, target: str, key: str) -> Any:
        return summary.get(cell, {}).get(target, {}).get(key)

    for cell, target, key, name, limit, check, bound in (
        ("c1", FHP, "added_p50_x_pass", "c=1 added p50 vs pass-through's (default config)",
         "<= 1.2x", le, 1.2),
        ("c1", FHP_NOLOG, "added_p50_x_pass", "c=1 added p50 vs pass-through's with logging off",
         "<= 1.2x (information: the floor without log files)", le, 1.2),
        ("c1", FHP, "added_p99_ms", "c=1 added p99 over direct, ms (default config)",
         "<= 1 ms", le, 1.0),
        ("c16", FHP, "x_pass_rps", "c=16 throughput vs pass-through (logging on)",
         ">= 0.75x", ge, 0.75),
        ("c16", FHP_NOLOG, "x_pass_rps", "c=16 throughput vs pass-through with logging off",
         ">= 0.75x (information: the ceiling without log files)", ge, 0.75),
        ("c16", FHP, "x_pass_rps_with_log_catch_up",
         "c=16 throughput vs pass-through, counting the time the log writer needs to catch up",
         ">= 0.75x (information)", ge, 0.75),
    ):  # fmt: skip
        v = get(cell, target, key)
        add(name, v, limit, check(v, bound))
    v = summary.get("c16", {}).get("fhp_x_litellm_rps")
    lite_ok = summary.get("c16", {}).get(LITELLM, {}).get("runs", 0) > 0
    add(
        "c=16 throughput vs LiteLLM",
        v,
        ">= 50x",
        ge(v, 50) if lite_ok else None,
        "" if lite_ok else "LiteLLM unavailable",
    )
    s1000 = summary.get("s1000", {}).get(FHP, {})
    if s1000.get("runs"):
        add(
            "1000 streams: every stream's full text and [DONE] delivered",
            s1000["failed_total"],
            "0 failed",
            s1000["failed_total"] == 0,
            f"{s1000['streams_total'] - s1000['failed_total']}/{s1000['streams_total']} "
            "streams complete",
        )
        v = s1000.get("added_ttft_p50_x_pass")
        add("1000 streams: added TTFT p50 vs pass-through's", v, "<= 1.3x", le(v, 1.3))
        v = s1000.get("peak_rss_mb")
        add(
            "1000 streams: proxy peak RSS, MB (long-running process, after the c=1..64 cells)",
            v,
            "< 100 MB",
            lt(v, 100),
        )
        fresh = (results.get("bench", {}).get("fresh") or {}).get(FHP) or {}
        if "peak_rss_mb" in fresh:
            v = fresh["peak_rss_mb"]
            add(
                "1000 streams: proxy peak RSS, MB (freshly started process)",
                v,
                "< 100 MB",
                lt(v, 100),
                f"{fresh['completed']}/{fresh['streams']} streams complete",
            )
    for cell, key, name, limit in (
        ("c16", "rules_x_default_rps", "rewrite rules: c=16 throughput vs default config",
         ">= 0.85x (cost <= 15 %)"),
        ("c1", "rules_x_default_rps",
         "rewrite rules: c=1 throughput vs default config (no log dropped at c=1)",
         ">= 0.85x (information)"),
        ("c16", "rules11_x_default_rps",
         "rewrite rules without the empty-matching '|': c=16 throughput vs default",
         ">= 0.85x (information)"),
    ):  # fmt: skip
        v = summary.get(cell, {}).get(key)
        add(name, v, limit, ge(v, 0.85))
    if soak:
        add("soak: errors", soak["errors"], "0", soak["errors"] == 0, soak.get("aborted", ""))
        v = soak["rss_growth_mb"]
        add("soak: RSS growth after warm-up, MB", v, "< 10 MB", lt(v, 10), soak.get("aborted", ""))
    paced = results.get("soak_paced")
    if paced:
        note = f"non-streaming paced to {paced.get('rate')} req/s"
        add("paced soak: errors", paced["errors"], "0 (information)", paced["errors"] == 0, note)
        v = paced["rss_growth_mb"]
        add("paced soak: RSS growth, MB", v, "< 10 MB (information)", lt(v, 10), note)
    return out


def le(v: float | None, limit: float) -> bool | None:
    return None if v is None else v <= limit


def ge(v: float | None, limit: float) -> bool | None:
    return None if v is None else v >= limit


def lt(v: float | None, limit: float) -> bool | None:
    return None if v is None else v < limit
