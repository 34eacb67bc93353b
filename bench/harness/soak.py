"""The soak: minutes of mixed streaming and plain load against first-hop-proxy alone."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from harness import FAIL_MODEL, FHP, MASTER_KEY, SOAK_RSS_LIMIT_MB, log
from harness.load import chat_body, fd_count, one_stream, tree_kb
from harness.targets import Stack, log_backlog, log_files, logs_on_disk, writer_status

FAILURES_PER_SECOND = 5.0  # one more connection sends requests that fail, at this pace
# Idle before counting file descriptors. A pooled upstream connection is closed once
# idle for 15 s (aiohttp's keepalive_timeout), by a sweep that runs every 15 s: up to
# 30 s after its last use (measured: +17 descriptors 16 s after the load, none at 31 s).
IDLE_S = 31.0


async def soak_load(
    url: str, conns: int, seconds: float, pid: int, rate: float | None = None
) -> dict[str, Any]:
    plain = chat_body(stream=False)
    streamed = chat_body(stream=True)
    failing = chat_body(stream=False, model=FAIL_MODEL)
    failed_ids: list[str] = []
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {MASTER_KEY}"}
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    max_requests = 50_000_000  # a bound on the loop besides time
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)

    async def worker(session: aiohttp.ClientSession, index: int) -> None:
        streaming = index % 2 == 1  # half the connections stream, half do not
        plain_conns = max(1, conns // 2)
        interval = plain_conns / rate if rate else 0.0  # each plain connection's share
        next_at = time.monotonic()
        while time.monotonic() < deadline and sum(counts.values()) < max_requests:
            if interval and not streaming:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if streaming:
                result = await one_stream(session, url, streamed)
                counts["streams"] += 1
                if not result.ok:
                    errors[f"stream: {result.reason}"] += 1
                continue
            try:
                async with session.post(url, data=plain, headers=headers) as resp:
                    body = await resp.read()
                    counts["requests"] += 1
                    if resp.status != 200 or not body.startswith(b"{"):
                        errors[f"status {resp.status}"] += 1
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                errors[type(exc).__name__] += 1

    async def failer(session: aiohttp.ClientSession) -> None:
        """Requests the upstream answers with a 400: their logs must all be kept."""
        while time.monotonic() < deadline and len(failed_ids) < max_requests:
            await asyncio.sleep(1 / FAILURES_PER_SECOND)
            try:
                async with session.post(url, data=failing, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 400:
                        failed_ids.append(resp.headers.get("X-Request-ID", "?"))
                    else:
                        errors[f"failing request: status {resp.status}"] += 1
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                errors[f"failing request: {type(exc).__name__}"] += 1

    samples: list[tuple[float, float, int | None]] = []
    aborted: list[str] = []

    async def sampler() -> None:
        nonlocal deadline
        start = time.monotonic()
        while time.monotonic() < deadline:
            rss = tree_kb(pid, "VmRSS") / 1024
            backlog = await asyncio.to_thread(log_backlog, url)
            samples.append((round(time.monotonic() - start, 1), rss, backlog))
            if rss > SOAK_RSS_LIMIT_MB:  # bound memory: stop rather than exhaust the machine
                aborted.append(f"stopped early: proxy RSS {rss:.0f} MB > {SOAK_RSS_LIMIT_MB} MB")
                deadline = time.monotonic()
                break
            await asyncio.sleep(min(15.0, max(1.0, seconds / 40)))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(
            sampler(), failer(session), *(worker(session, i) for i in range(conns))
        )
    return {
        "counts": dict(counts),
        "failed_ids": failed_ids,
        "errors": dict(errors),
        "samples": samples,
        "aborted": aborted[0] if aborted else "",
    }


def run_soak(
    work: Path, gap_ms: float, seconds: float, warm_s: float, rate: float | None = None
) -> dict[str, Any]:
    with Stack(work, gap_ms, []) as stack:
        stack.start()
        target = stack.targets[FHP] = stack.start_fhp(FHP, keep_errors=True)
        if target.proc is not None:
            stack.procs.append(target.proc)
        if not target.available or target.pid is None:
            raise SystemExit(f"first-hop-proxy did not start: {target.reason}")
        pid = target.pid
        log(f"soak warm-up {warm_s:.0f} s")
        asyncio.run(soak_load(target.url, 16, warm_s, pid, rate))
        time.sleep(IDLE_S)
        fds_start = fd_count(pid)
        start_rss = tree_kb(pid, "VmRSS") / 1024
        log(f"soak {seconds:.0f} s at c=16, start RSS {start_rss:.1f} MB")
        load = asyncio.run(soak_load(target.url, 16, seconds, pid, rate))
        end_rss = tree_kb(pid, "VmRSS") / 1024
        target_url = target.url
        backlog_end = log_backlog(target_url)
        drain_deadline = time.monotonic() + 180
        while time.monotonic() < drain_deadline and (log_backlog(target_url) or 0) > 0:
            time.sleep(1)
        drained_rss = tree_kb(pid, "VmRSS") / 1024
        backlog_after_wait = log_backlog(target_url)
        status = writer_status(target_url)
        folder = Path(target.extra["log_folder"])
        request_logs, error_logs = log_files(folder)
        error_ids = logs_on_disk(folder)["error_ids"]
        time.sleep(IDLE_S)
        fds_end = fd_count(pid)
        alive = target.proc is not None and target.proc.poll() is None
    errors = sum(load["errors"].values()) + (0 if alive else 1)
    failed_ids = load["failed_ids"]
    without_error_log = sum(1 for k in failed_ids if k not in error_ids)
    result = {
        "seconds": seconds,
        "warm_up_s": warm_s,
        "concurrency": 16,
        "mix": (
            "8 connections non-streaming "
            + (f"paced to {rate:.0f} req/s in all" if rate else "back to back")
            + ", 8 streaming (20 events each), 1 sending "
            + f"{FAILURES_PER_SECOND:.0f} failing requests a second"
        ),
        "rate": rate,
        "requests": load["counts"].get("requests", 0),
        "streams": load["counts"].get("streams", 0),
        "errors": errors,
        "error_kinds": load["errors"],
        "proxy_alive_at_end": alive,
        "rss_start_mb": round(start_rss, 1),
        "rss_end_mb": round(end_rss, 1),
        "rss_max_mb": round(max(s[1] for s in load["samples"]), 1),
        "rss_growth_mb": round(end_rss - start_rss, 1),
        "log_backlog_end": backlog_end,
        "rss_after_log_drain_mb": round(drained_rss, 1),
        "log_backlog_after_wait": backlog_after_wait,
        "logs_dropped": status.get("dropped"),
        "logs_lost": status.get("lost"),
        "failed_on_purpose": len(failed_ids),
        "failures_without_error_log": without_error_log,
        "failure_logs_missing": without_error_log + (status.get("lost") or 0),
        "fds_start": fds_start,
        "fds_end": fds_end,
        "fd_growth": fds_end - fds_start,
        "ran_s": load["samples"][-1][0] if load["samples"] else 0.0,
        "log_backlog_max": max((s[2] or 0 for s in load["samples"]), default=0),
        "aborted": load["aborted"],
        "samples_t_rss_mb_backlog": [(t, round(m, 1), b) for t, m, b in load["samples"]],
        "request_log_files_at_end": request_logs,
        "error_log_files_at_end": error_logs,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    log(
        f"soak: {result['requests']} requests, {result['streams']} streams, "
        f"{errors} errors, RSS {start_rss:.1f} -> {end_rss:.1f} MB"
    )
    return result
