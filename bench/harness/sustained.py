"""Sustained throughput at c=16 with every log written: paced until nothing is dropped.

Back to back, the proxy serves requests faster than its log writer keeps their
logs, so the writer drops request logs of plain successes (counted). Here each
of the 16 connections waits a little after every reply (wrk's ``delay``), and
the wait is bisected to the least at which no log is dropped. Each run's rate
counts the time the writer then needs to catch up (``rps_with_log_catch_up``),
so the figure is requests served per second with every log on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import FHP, PASS, log
from harness.load import wrk_script
from harness.measure import Plan, measure, short
from harness.targets import Stack

BISECTIONS = 3  # each halves the interval of waits: 1/8 of the widest at the end
SLOWEST = 0.25  # the widest wait brings the rate to about this share of back to back


def kept_every_log(figures: dict[str, Any] | None) -> bool:
    return bool(
        figures
        and "error" not in figures
        and figures.get("logs_dropped") == 0
        and figures.get("logs_lost", 0) == 0
        and figures["non_2xx"] + figures["socket_errors"] == 0
    )


def sustained_c16(stack: Stack, plan: Plan, work: Path) -> dict[str, Any]:
    target, passthrough = stack.targets[FHP], stack.targets[PASS]
    if not (target.available and passthrough.available):
        return {"error": "first-hop-proxy or the pass-through is unavailable"}
    steps: list[dict[str, Any]] = []

    def step(delay_ms: float) -> dict[str, Any] | None:
        script = wrk_script(work, f"paced-{delay_ms:.3f}.lua", delay_ms=delay_ms or None)
        figures = measure(target, "wrk", 16, plan, script)
        if figures is not None:
            figures["delay_ms"] = round(delay_ms, 3)
            figures["kept_every_log"] = kept_every_log(figures)
            steps.append(figures)
        log(f"sustained c=16, wait {delay_ms:.2f} ms: {short(figures or {})}")
        return figures

    reference = measure(passthrough, "wrk", 16, plan, wrk_script(work, "paced-0.lua"))
    log(f"sustained c=16, pass-through back to back: {short(reference or {})}")
    first = step(0.0)
    if first is not None and not kept_every_log(first) and first.get("rps"):
        high = 16 / (SLOWEST * first["rps"]) * 1000 - 16 / first["rps"] * 1000
        low = 0.0
        if kept_every_log(step(high)):
            for _ in range(BISECTIONS):
                middle = (low + high) / 2
                if kept_every_log(step(middle)):
                    high = middle
                else:
                    low = middle
    kept = [f for f in steps if f["kept_every_log"]]
    best = max(kept, key=lambda f: f["rps_with_log_catch_up"] or 0.0) if kept else None
    out: dict[str, Any] = {"steps": steps, "passthrough": reference, "best": best}
    if best and reference and reference.get("rps"):
        out["x_pass_rps"] = round(best["rps_with_log_catch_up"] / reference["rps"], 3)
        if reference.get("cpu_us_per_req"):
            out["cpu_x_pass"] = round(best["cpu_us_per_req"] / reference["cpu_us_per_req"], 3)
    return out
