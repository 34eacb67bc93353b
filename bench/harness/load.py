"""Load and what it costs: the request body, wrk runs, the asyncio stream client, RSS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from harness import EVENTS, EXPECTED_TEXT, FAIL_EVERY, FAIL_MODEL, MASTER_KEY, MODEL, log
from harness.stats import percentile


def chat_body(stream: bool, model: str = MODEL) -> bytes:
    """A SillyTavern-like request, about 2 KB, with characters the rewrite rules touch.

    ``model=FAIL_MODEL``: the same request, which the fake upstream answers with a 400.
    """
    user = (
        "Here's what I'd like — a short scene/story with [brackets], `code`, a | pipe "
        "and “quotes” – nothing fancy. It's late; don't make it too long. "
    )
    messages = [
        {"role": "system", "content": "You are a helpful narrator. " * 12},
        {"role": "user", "content": user * 3},
        {"role": "assistant", "content": "Sure. The night was calm and the road was long. " * 6},
        {"role": "user", "content": user * 2},
    ]
    return orjson.dumps(
        {
            "model": model,
            "messages": messages,
            "stream": stream,
            "temperature": 0.7,
            "max_tokens": 300,
        }
    )


def proc_status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def tree_kb(pid: int, key: str) -> int:
    return sum(proc_status_kb(p, key) for p in process_tree(pid))


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu(path: Path) -> float:
    """user + system CPU seconds from a ``/proc/.../stat`` file (0 if it is gone)."""
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds so far: (the whole process tree, all threads; ``pid``'s main thread).

    ``/proc/<pid>/stat`` sums every thread of the process, ended ones included; the
    main thread (the event loop, for the proxies) is ``/proc/<pid>/task/<pid>/stat``.
    """
    total = sum(stat_cpu(Path(f"/proc/{p}/stat")) for p in process_tree(pid))
    return total, stat_cpu(Path(f"/proc/{pid}/task/{pid}/stat"))


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid`` (sockets included)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def reset_peak(pid: int) -> None:
    """Reset VmHWM (peak RSS) so the next reading is the peak of the next cell only."""
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            Path(f"/proc/{p}/clear_refs").write_text("5")


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------- wrk

WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nWRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,'
    .. '"status":%%d,"timeout":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


# Every FAIL_EVERY-th request of each wrk thread asks for the failing model.
WRK_MIX_LUA = """
local ok_req, fail_req
local n = 0
init = function(args)
  ok_req = wrk.format(nil, nil, nil, [==[%(body)s]==])
  fail_req = wrk.format(nil, nil, nil, [==[%(fail)s]==])
end
request = function()
  n = n + 1
  if n %% %(every)d == 0 then return fail_req end
  return ok_req
end
-- The request id of every answer that was not a 200, from all threads, printed at the end.
local threads = {}
failed = {}
setup = function(thread) table.insert(threads, thread) end
response = function(status, headers, body)
  if status ~= 200 then table.insert(failed, headers["X-Request-ID"] or "?") end
end
local report = done
done = function(summary, latency, requests)
  report(summary, latency, requests)
  local ids = {}
  for _, thread in ipairs(threads) do
    for _, id in ipairs(thread:get("failed")) do table.insert(ids, id) end
  end
  io.write("\\nWRKIDS " .. table.concat(ids, ",") .. "\\n")
end
"""

# Each connection waits ``avg`` ms on average after each reply (whole ms, mixed so
# that the mean is ``avg``): fewer requests per second on the same 16 connections.
WRK_DELAY_LUA = """
local avg = %(delay_ms).3f
delay = function()
  local base = math.floor(avg)
  if math.random() < avg - base then return base + 1 end
  return base
end
"""


def wrk_script(folder: Path, name: str, mix: bool = False, delay_ms: float | None = None) -> Path:
    """A wrk script POSTing the chat request; ``mix``: 1 in FAIL_EVERY fails on purpose."""
    body = chat_body(stream=False).decode()
    text = WRK_LUA % {"body": body, "key": MASTER_KEY}
    if mix:
        fail = chat_body(stream=False, model=FAIL_MODEL).decode()
        text += WRK_MIX_LUA % {"body": body, "fail": fail, "every": FAIL_EVERY}
    if delay_ms is not None:
        text += WRK_DELAY_LUA % {"delay_ms": delay_ms}
    path = folder / name
    path.write_text(text, "utf-8")
    return path


def ensure_wrk() -> str:
    return ensure_program("wrk", "wrk")


def ensure_program(program: str, package: str) -> str:
    """``program``'s path, installed with apt-get (as root) from ``package`` when missing."""
    exe = shutil.which(program)
    if exe:
        return exe
    log(f"{program} missing: installing {package} with apt-get ...")
    subprocess.run(["apt-get", "update", "-qq"], check=False, timeout=300)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", package],
        check=True,
        timeout=600,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    exe = shutil.which(program)
    if not exe:
        raise SystemExit(f"{program} could not be installed")
    return exe


def wrk_version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def run_wrk(script: Path, url: str, conns: int, seconds: float) -> dict[str, Any]:
    threads = 1 if conns == 1 else 2
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    failed_ids: list[str] | None = None
    for line in out.stdout.splitlines():
        if line.startswith("WRKIDS"):
            failed_ids = [i for i in line[len("WRKIDS") :].strip().split(",") if i]
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[len("WRKJSON ") :])
            secs = raw["duration_us"] / 1e6
            errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
            ok = raw["requests"] - raw["status"]
            return {
                "rps": round(ok / secs, 1) if secs else 0.0,
                "requests": raw["requests"],
                "non_2xx": raw["status"],
                "socket_errors": errors,
                "p50_ms": raw["p50_us"] / 1000,
                "p90_ms": raw["p90_us"] / 1000,
                "p99_ms": raw["p99_us"] / 1000,
                "max_ms": raw["max_us"] / 1000,
                "duration_s": round(secs, 3),
                **({} if failed_ids is None else {"failed_ids": failed_ids}),
            }
    raise RuntimeError(f"wrk gave no result: {out.stdout[-400:]} {out.stderr[-400:]}")


# --------------------------------------------------------------------------- streams


@dataclass
class StreamResult:
    ok: bool
    ttft: float | None
    events: int
    reason: str = ""


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes) -> StreamResult:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {MASTER_KEY}"}
    start = time.perf_counter()
    ttft: float | None = None
    chunks: list[bytes] = []
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                await resp.read()
                return StreamResult(False, None, 0, f"status {resp.status}")
            async for chunk in resp.content.iter_any():
                if ttft is None:
                    ttft = time.perf_counter() - start
                chunks.append(chunk)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return StreamResult(False, ttft, 0, type(exc).__name__)
    return check_stream(b"".join(chunks), ttft)


def check_stream(raw: bytes, ttft: float | None) -> StreamResult:
    """Every event's text arrived, in order, and the stream ended with [DONE]."""
    text: list[str] = []
    events = 0
    done = False
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        try:
            payload = orjson.loads(data)
            content = payload["choices"][0]["delta"].get("content") if payload["choices"] else None
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            continue
        if content:
            events += 1
            text.append(content)
    joined = "".join(text)
    if joined != EXPECTED_TEXT:
        return StreamResult(False, ttft, events, "text incomplete")
    if not done:
        return StreamResult(False, ttft, events, "no [DONE]")
    return StreamResult(True, ttft, events)


async def stream_cell(url: str, streams: int, limit_s: float) -> dict[str, Any]:
    body = chat_body(stream=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(one_stream(session, url, body)) for _ in range(streams)]
        done, pending = await asyncio.wait(tasks, timeout=limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    results = [t.result() for t in done if not t.cancelled() and t.exception() is None]
    reasons = Counter(r.reason for r in results if not r.ok)
    if pending:
        reasons[f"unfinished after {limit_s:.0f} s"] += len(pending)
    ttfts = sorted(r.ttft * 1000 for r in results if r.ok and r.ttft is not None)
    completed = sum(r.ok for r in results)
    return {
        "streams": streams,
        "completed": completed,
        "failed": streams - completed,
        "events_delivered": sum(r.events for r in results),
        "events_expected": streams * EVENTS,
        "fail_reasons": dict(reasons),
        "ttft_p50_ms": percentile(ttfts, 50) if ttfts else None,
        "ttft_p99_ms": percentile(ttfts, 99) if ttfts else None,
        "wall_s": round(wall, 3),
    }


# --------------------------------------------------------------------------- paced


async def paced_mix(url: str, rate: float, seconds: float) -> dict[str, Any]:
    """``rate`` requests a second for ``seconds`` (open loop), 1 in FAIL_EVERY failing.

    Returns the counts by status and the request ids (``X-Request-ID``) of the
    requests that failed, so their logs can be looked for afterwards.
    """
    plain = chat_body(stream=False)
    failing = chat_body(stream=False, model=FAIL_MODEL)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {MASTER_KEY}"}
    statuses: Counter[str] = Counter()
    failed_ids: list[str] = []
    latencies: list[float] = []
    total = int(rate * seconds)

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        body = failing if index % FAIL_EVERY == FAIL_EVERY - 1 else plain
        start = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                statuses[str(resp.status)] += 1
                if resp.status != 200:
                    failed_ids.append(resp.headers.get("X-Request-ID", "?"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            statuses[type(exc).__name__] += 1
        latencies.append(time.perf_counter() - start)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i in range(total):  # bounded in count; one task per request, on schedule
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, i)))
        await asyncio.gather(*tasks)
        elapsed = loop.time() - start
    latencies.sort()
    return {
        "rate": rate,
        "seconds": seconds,
        "sent": total,
        "achieved_rps": round(total / elapsed, 1) if elapsed else None,
        "statuses": dict(statuses),
        "failed_ids": failed_ids,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 99) * 1000, 2) if latencies else None,
    }
