"""Side-by-side benchmark of first-hop-proxy against the floor, the yardstick and LiteLLM.

make bench          full run (3 runs per cell), writes bench/RESULTS.md and bench/results.json
make bench-soak     10 minutes at c=16, mixed streaming and not, against first-hop-proxy
python bench/run.py --quick      one short run per cell, written to bench/.work/

Everything listens on 127.0.0.1 only; every load loop is bounded in count and time.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SPEC = ROOT.parent / "shared" / "spec" / "original-config.example.yaml"
LITELLM_VERSION = "1.108.0"  # newer releases need litellm-proxy-extras builds not yet on PyPI
LITELLM_VENV = BENCH / "venv-litellm"
MASTER_KEY = "sk-bench-master"
MODEL = "bench-model"
SOAK_RSS_LIMIT_MB = 3000
EVENTS = 20
EXPECTED_TEXT = "".join(f"tok{i} " for i in range(EVENTS))

DIRECT, PASS, FHP, FHP_RULES, FHP_RULES11, LITELLM = (
    "direct",
    "passthrough",
    "fhp-default",
    "fhp-rules",
    "fhp-rules11",
    "litellm",
)
TARGET_LABELS = {
    DIRECT: "direct to upstream (floor)",
    PASS: "bare aiohttp pass-through (yardstick)",
    FHP: "first-hop-proxy, default config, logging on",
    FHP_RULES: "first-hop-proxy, 12+49 example rewrite rules, logging on",
    FHP_RULES11: (
        "first-hop-proxy, the same rules minus the outgoing '|' (it matches the empty "
        "string, so it inserts its replacement between every character), logging on"
    ),
    LITELLM: f"LiteLLM proxy {LITELLM_VERSION}",
}
ORDER = [DIRECT, PASS, FHP, FHP_RULES, FHP_RULES11, LITELLM]


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(values: Sequence[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def chat_body(stream: bool) -> bytes:
    """A SillyTavern-like request, about 2 KB, with characters the rewrite rules touch."""
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
            "model": MODEL,
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


# --------------------------------------------------------------------------- processes


@dataclass
class Target:
    name: str
    url: str  # chat completions URL
    proc: subprocess.Popen[bytes] | None = None
    available: bool = True
    reason: str = ""
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def spawn(
    cmd: list[str], logfile: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    out = logfile.open("wb")
    return subprocess.Popen(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=logfile.parent,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=5)


def wait_http(
    url: str, proc: subprocess.Popen[bytes], timeout: float, any_status: bool = False
) -> str | None:
    """Poll ``url`` until it answers 2xx (any status if ``any_status``); None once it does."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if 200 <= resp.status < 300:
                    return None
                last = f"status {resp.status}"
        except urllib.error.HTTPError as exc:
            if any_status:
                return None
            last = f"status {exc.code}"
        except Exception as exc:  # any failure means "not ready yet"
            last = str(exc)
        time.sleep(0.25)
    return f"not ready after {timeout:.0f} s ({last})"


def tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class Stack:
    """The fake upstream plus every target, started and stopped together."""

    def __init__(self, work: Path, gap_ms: float, targets: Sequence[str]) -> None:
        self.work = work
        self.gap_ms = gap_ms
        self.wanted = list(targets)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.targets: dict[str, Target] = {}
        self.upstream_url = ""

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_: object) -> None:
        for proc in reversed(self.procs):
            stop(proc)

    def start(self) -> None:
        py = sys.executable
        port = free_port()
        up = spawn(
            [py, str(BENCH / "upstream.py"), "--port", str(port), "--gap-ms", str(self.gap_ms)],
            self.work / "upstream.log",
        )
        self.procs.append(up)
        problem = wait_http(f"http://127.0.0.1:{port}/v1/models", up, 20)
        if problem:
            raise SystemExit(f"fake upstream did not start: {problem}")
        self.upstream_url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.targets[DIRECT] = Target(DIRECT, self.upstream_url, up)
        for name in self.wanted:
            if name == DIRECT:
                continue
            starter: Callable[[], Target] = {
                PASS: self.start_passthrough,
                FHP: lambda: self.start_fhp(FHP, rules=False),
                FHP_RULES: lambda: self.start_fhp(FHP_RULES, rules=True),
                FHP_RULES11: lambda: self.start_fhp(FHP_RULES11, rules=True, sane=True),
                LITELLM: self.start_litellm,
            }[name]
            target = starter()
            if target.proc is not None:
                self.procs.append(target.proc)
            self.targets[name] = target
            state = "ready" if target.available else f"UNAVAILABLE: {target.reason}"
            log(f"{name}: {state}")

    def start_passthrough(self) -> Target:
        port = free_port()
        proc = spawn(
            [
                sys.executable,
                str(BENCH / "passthrough.py"),
                "--port",
                str(port),
                "--upstream",
                self.upstream_url,
            ],
            self.work / "passthrough.log",
        )
        target = Target(PASS, f"http://127.0.0.1:{port}/v1/chat/completions", proc)
        self._check(target, wait_http(f"http://127.0.0.1:{port}/", proc, 20, any_status=True))
        return target

    def fhp_config(self, name: str, rules: bool, port: int, sane: bool = False) -> Path:
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {}
        if rules:
            data = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
            if sane:
                section = data["regex_replacement"]
                section["rules"] = [r for r in section["rules"] if r["pattern"] != "|"]
        data.setdefault("target_proxy", {})["url"] = self.upstream_url
        data["server"] = {**data.get("server", {}), "host": "127.0.0.1", "port": port}
        data["logging"] = {**data.get("logging", {}), "enabled": True, "folder": "logs"}
        data["error_logging"] = {
            **data.get("error_logging", {}),
            "enabled": True,
            "folder": "logs/errors",
        }
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), "utf-8")
        return path

    def start_fhp(self, name: str, rules: bool, sane: bool = False) -> Target:
        port = free_port()
        config = self.fhp_config(name, rules, port, sane)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHP_")}
        proc = spawn(
            [
                sys.executable,
                "-m",
                "first_hop_proxy",
                "serve",
                "--config",
                str(config),
                "--port",
                str(port),
            ],
            config.parent / "proxy.log",
            env,
        )
        target = Target(name, f"http://127.0.0.1:{port}/v1/chat/completions", proc)
        target.extra["log_folder"] = str(config.parent / "logs")
        if rules:
            loaded = yaml.safe_load(config.read_text("utf-8"))
            target.extra["rules"] = {
                "outgoing": len(loaded["regex_replacement"]["rules"]),
                "incoming": len(loaded["response_processing"]["rules"]),
            }
        problem = wait_http(f"http://127.0.0.1:{port}/health", proc, 30)
        self._check(target, problem, config.parent / "proxy.log")
        return target

    def start_litellm(self) -> Target:
        port = free_port()
        target = Target(LITELLM, f"http://127.0.0.1:{port}/v1/chat/completions")
        problem = install_litellm(self.work)
        if problem:
            target.available, target.reason = False, problem
            return target
        target.version = litellm_version()
        folder = self.work / "litellm"
        folder.mkdir(exist_ok=True)
        config = {
            "model_list": [
                {
                    "model_name": MODEL,
                    "litellm_params": {
                        "model": f"openai/{MODEL}",
                        "api_base": self.upstream_url.rsplit("/chat/completions", 1)[0],
                        "api_key": "sk-upstream",
                    },
                }
            ],
            "litellm_settings": {
                "num_retries": 0,
                "callbacks": [],
                "success_callback": [],
                "failure_callback": [],
                "set_verbose": False,
                "json_logs": False,
            },
            "router_settings": {"num_retries": 0},
            "general_settings": {"master_key": MASTER_KEY},
        }
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(config), "utf-8")
        env = {
            **os.environ,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "DISABLE_SCHEMA_UPDATE": "True",
        }
        env.pop("DATABASE_URL", None)
        cmd = [
            str(LITELLM_VENV / "bin" / "litellm"),
            "--config",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ]
        target.proc = spawn(cmd, folder / "litellm.log", env)
        problem = wait_http(f"http://127.0.0.1:{port}/health/liveliness", target.proc, 180)
        self._check(target, problem, folder / "litellm.log")
        return target

    @staticmethod
    def _check(target: Target, problem: str | None, logfile: Path | None = None) -> None:
        if problem:
            target.available = False
            target.reason = problem + (f"; log: {tail(logfile)}" if logfile else "")
            stop(target.proc)


def install_litellm(work: Path) -> str | None:
    """Install LiteLLM into its own venv if missing; None when usable, else why not."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists() and litellm_version() == LITELLM_VERSION:
        return None
    log(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} ...")
    logfile = work / "litellm-install.log"
    try:
        with logfile.open("wb") as out:
            if not (LITELLM_VENV / "bin" / "python").exists():
                subprocess.run(
                    [sys.executable, "-m", "venv", str(LITELLM_VENV)],
                    check=True,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=300,
                )
            subprocess.run(
                [
                    str(LITELLM_VENV / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    f"litellm[proxy]=={LITELLM_VERSION}",
                ],
                check=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=900,
            )
    except (subprocess.SubprocessError, OSError) as exc:
        return f"install failed ({exc}): {tail(logfile, 3)}"
    return None if exe.exists() else "install finished but no litellm executable"


def litellm_version() -> str:
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        return ""
    try:
        out = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (subprocess.SubprocessError, OSError):
        return ""
    return out.stdout.strip()


# --------------------------------------------------------------------------- load: wrk

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


def ensure_wrk() -> str:
    exe = shutil.which("wrk")
    if exe:
        return exe
    log("wrk missing: installing it with apt-get ...")
    subprocess.run(["apt-get", "update", "-qq"], check=False, timeout=300)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "wrk"],
        check=True,
        timeout=600,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    exe = shutil.which("wrk")
    if not exe:
        raise SystemExit("wrk could not be installed")
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
            }
    raise RuntimeError(f"wrk gave no result: {out.stdout[-400:]} {out.stderr[-400:]}")


# --------------------------------------------------------------------------- load: streams


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


# --------------------------------------------------------------------------- the run


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
                folder = Path(target.extra["log_folder"])
                results["targets"][name]["request_logs_written"] = sum(
                    1 for p in folder.glob("*") if p.is_file()
                )
                results["targets"][name]["error_logs_written"] = sum(
                    1 for p in (folder / "errors").glob("*") if p.is_file()
                )
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
    try:
        if kind == "wrk":
            figures = run_wrk(script, target.url, load, plan.wrk_seconds)
        else:
            figures = asyncio.run(stream_cell(target.url, load, plan.stream_limit_s))
    except Exception as exc:  # one failed cell must not stop the run
        return {"error": f"{type(exc).__name__}: {exc}"}
    figures["peak_rss_mb"] = round(tree_kb(pid, "VmHWM") / 1024, 1)
    figures["rss_mb"] = round(tree_kb(pid, "VmRSS") / 1024, 1)
    if "log_folder" in target.extra:
        # Log work deferred to the writer thread must not spill into the next measurement.
        figures["log_backlog"] = log_backlog(target.url)
        figures["log_catch_up_s"] = wait_log_drained(target.url, 180)
        if "rps" in figures:
            ok = figures["requests"] - figures["non_2xx"]
            span = figures["duration_s"] + figures["log_catch_up_s"]
            figures["rps_with_log_catch_up"] = round(ok / span, 1) if span else None
    time.sleep(0.3)
    return figures


def wait_log_drained(chat_url: str, limit_s: float) -> float:
    """Seconds until first-hop-proxy's log writer queue is empty (at most ``limit_s``)."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if (log_backlog(chat_url) or 0) == 0:
            break
        time.sleep(0.1)
    return round(time.monotonic() - start, 2)


def writer_status(chat_url: str) -> dict[str, Any]:
    """first-hop-proxy's log writer counters (``/health/detailed``), {} if unavailable."""
    url = chat_url.replace("/v1/chat/completions", "/health/detailed")
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.loads(resp.read())
        status = data["logging"]["writer"]
        return status if isinstance(status, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def log_backlog(chat_url: str) -> int | None:
    """first-hop-proxy's log writer queue length right now."""
    queued = writer_status(chat_url).get("queued")
    return int(queued) if isinstance(queued, int) else None


# --------------------------------------------------------------------------- summary


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}"


def pairs(
    runs: dict[str, list[dict[str, Any] | None]],
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


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for cell, data in results["cells"].items():
        runs = data["runs"]
        direct_runs = runs[DIRECT]
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
                    add50 = pairs(runs, name, DIRECT, lambda m, d: m["p50_ms"] - d["p50_ms"])
                    add99 = pairs(runs, name, DIRECT, lambda m, d: m["p99_ms"] - d["p99_ms"])
                    s["added_p50_ms"] = median(add50)
                    s["added_p99_ms"] = median(add99)
                    s["x_direct_rps"] = median(
                        pairs(runs, name, DIRECT, lambda m, d: m["rps"] / d["rps"])
                    )
                if name not in (DIRECT, PASS):
                    s["x_pass_rps"] = median(
                        pairs(runs, name, PASS, lambda m, p: m["rps"] / p["rps"])
                    )
                    s["added_p50_x_pass"] = median(
                        [
                            ratio(
                                m["p50_ms"] - d["p50_ms"],
                                p["p50_ms"] - d["p50_ms"],
                            )
                            for m, p, d in zip(runs[name], runs[PASS], direct_runs, strict=False)
                            if m and p and d and "error" not in m and "error" not in p
                        ]
                    )
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
                    s["added_ttft_p50_ms"] = median(
                        pairs(runs, name, DIRECT, lambda m, d: m["ttft_p50_ms"] - d["ttft_p50_ms"])
                    )
                    s["added_ttft_p99_ms"] = median(
                        pairs(runs, name, DIRECT, lambda m, d: m["ttft_p99_ms"] - d["ttft_p99_ms"])
                    )
                if name not in (DIRECT, PASS):
                    s["added_ttft_p50_x_pass"] = median(
                        [
                            ratio(
                                m["ttft_p50_ms"] - d["ttft_p50_ms"],
                                p["ttft_p50_ms"] - d["ttft_p50_ms"],
                            )
                            for m, p, d in zip(runs[name], runs[PASS], direct_runs, strict=False)
                            if m and p and d and "error" not in m and "error" not in p
                            if m["ttft_p50_ms"] is not None and p["ttft_p50_ms"] is not None
                        ]
                    )
            per[name] = s
        if data["kind"] == "wrk":
            rules = pairs(runs, FHP_RULES, FHP, lambda r, f: r["rps"] / f["rps"])
            lite = pairs(runs, FHP, LITELLM, lambda f, lt: f["rps"] / lt["rps"])
            per["rules_x_default_rps"] = median(rules)
            per["rules11_x_default_rps"] = median(
                pairs(runs, FHP_RULES11, FHP, lambda r, f: r["rps"] / f["rps"])
            )
            per["fhp_x_litellm_rps"] = median(lite)
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

    v = get("c1", FHP, "added_p50_x_pass")
    add("c=1 added p50 vs pass-through's (default config)", v, "<= 1.2x", le(v, 1.2))
    v = get("c1", FHP, "added_p99_ms")
    add("c=1 added p99 over direct, ms (default config)", v, "<= 1 ms", le(v, 1.0))
    v = get("c16", FHP, "x_pass_rps")
    add("c=16 throughput vs pass-through (logging on)", v, ">= 0.75x", ge(v, 0.75))
    v = get("c16", FHP, "x_pass_rps_with_log_catch_up")
    add(
        "c=16 throughput vs pass-through, counting the time the log writer needs to catch up",
        v,
        ">= 0.75x (information)",
        ge(v, 0.75),
    )
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
    v = summary.get("c16", {}).get("rules_x_default_rps")
    add(
        "rewrite rules: c=16 throughput vs default config",
        v,
        ">= 0.85x (cost <= 15 %)",
        ge(v, 0.85),
    )
    v = summary.get("c16", {}).get("rules11_x_default_rps")
    add(
        "rewrite rules without the empty-matching '|': c=16 throughput vs default",
        v,
        ">= 0.85x (information)",
        ge(v, 0.85),
    )
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


# --------------------------------------------------------------------------- soak


async def soak_load(
    url: str, conns: int, seconds: float, pid: int, rate: float | None = None
) -> dict[str, Any]:
    plain = chat_body(stream=False)
    streamed = chat_body(stream=True)
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
        await asyncio.gather(sampler(), *(worker(session, i) for i in range(conns)))
    return {
        "counts": dict(counts),
        "errors": dict(errors),
        "samples": samples,
        "aborted": aborted[0] if aborted else "",
    }


def run_soak(
    work: Path, gap_ms: float, seconds: float, warm_s: float, rate: float | None = None
) -> dict[str, Any]:
    with Stack(work, gap_ms, [FHP]) as stack:
        stack.start()
        target = stack.targets[FHP]
        if not target.available or target.pid is None:
            raise SystemExit(f"first-hop-proxy did not start: {target.reason}")
        pid = target.pid
        log(f"soak warm-up {warm_s:.0f} s")
        asyncio.run(soak_load(target.url, 16, warm_s, pid, rate))
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
        dropped = writer_status(target_url).get("dropped")
        folder = Path(target.extra["log_folder"])
        request_logs = sum(1 for p in folder.glob("*") if p.is_file())
        error_logs = sum(1 for p in (folder / "errors").glob("*") if p.is_file())
        alive = target.proc is not None and target.proc.poll() is None
    errors = sum(load["errors"].values()) + (0 if alive else 1)
    result = {
        "seconds": seconds,
        "warm_up_s": warm_s,
        "concurrency": 16,
        "mix": (
            "8 connections non-streaming "
            + (f"paced to {rate:.0f} req/s in all" if rate else "back to back")
            + ", 8 streaming (20 events each)"
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
        "logs_dropped": dropped,
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


# --------------------------------------------------------------------------- report


def machine_info(lite_version: str) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "src"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if dirty:
        commit += " + uncommitted changes in src/"

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "n/a"

    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "first_hop_proxy": f"{version('first-hop-proxy')} (git {commit})",
        "aiohttp": version("aiohttp"),
        "orjson": version("orjson"),
        "pyyaml": version("pyyaml"),
        "litellm": lite_version or "not installed",
        "wrk": wrk_version() if shutil.which("wrk") else "n/a",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def render(results: dict[str, Any]) -> str:
    bench = results.get("bench")
    lines = ["# first-hop-proxy benchmark results", ""]
    lines.append(
        "Generated by `bench/run.py` (`make bench`, `make bench-soak`); raw figures in "
        "[`results.json`](results.json); what each figure means: [README](README.md)."
    )
    lines.append("")
    machine = (bench or {}).get("machine") or results.get("soak", {}).get("machine", {})
    if machine:
        lines += ["## Machine", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in machine.items()]
        lines.append("")
    lines += [
        "## Targets (issue 6)",
        "",
        "| target | measured | limit | result |",
        "|---|---|---|---|",
    ]
    for t in check_targets(results):
        state = {True: "**pass**", False: "**MISS**", None: "not measured"}[t["pass"]]
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['target']} | {fmt(t['value'])}{note} | {t['limit']} | {state} |")
    lines.append("")
    if bench:
        plan = bench["plan"]
        lines.append(
            f"Run: {plan['runs']} run(s) per cell, wrk {plan['wrk_seconds']} s per run, "
            f"targets measured in alternation within each run; streams of {EVENTS} events "
            f"{bench['gap_ms']:.0f} ms apart; medians over runs; every ratio is the median of "
            f"per-run pairs (a target's run against the direct/pass-through run next to it). "
            f"Whole run: {bench['elapsed_s'] / 60:.1f} min."
        )
        lines.append("")
        lines += ["### Targets measured", ""]
        for name, t in bench["targets"].items():
            state = "" if t["available"] else f" — **unavailable**: {t['reason']}"
            extra = f" (rules: {t['rules']})" if "rules" in t else ""
            lines.append(f"- `{name}`: {t['label']}{extra}{state}")
        lines.append("")
        lines += render_wrk(bench) + render_streams(bench) + render_fresh(bench)
    for key, title in (
        ("soak", "Soak (`make bench-soak`)"),
        ("soak_paced", "Soak, paced (`bench/run.py --soak --soak-rate N`)"),
    ):
        lines += render_soak(results.get(key), title)
    findings = BENCH / "findings.md"
    if findings.exists():
        lines += [findings.read_text("utf-8").strip(), ""]
    return "\n".join(lines)


def soak_ran(soak: dict[str, Any]) -> float:
    series = soak.get("samples_t_rss_mb_backlog") or []
    return float(series[-1][0]) if series else float(soak["seconds"])


def render_soak(soak: dict[str, Any] | None, title: str) -> list[str]:
    lines: list[str] = []
    if soak:
        lines += [
            f"## {title}",
            "",
            f"{soak.get('ran_s') or soak_ran(soak):.0f} s (planned {soak['seconds']:.0f} s) "
            "against first-hop-proxy (default config, "
            f"logging on) at c={soak['concurrency']}, {soak['mix']}, after a "
            f"{soak['warm_up_s']:.0f} s warm-up; {soak['date']}.",
            "",
            "| requests | streams | errors | RSS start | RSS end | RSS max | growth | "
            "log backlog max / end | logs dropped | request logs kept | error logs |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {soak['requests']:,} | {soak['streams']:,} | {soak['errors']} "
            f"{soak['error_kinds'] or ''} | {soak['rss_start_mb']} MB | {soak['rss_end_mb']} MB | "
            f"{soak['rss_max_mb']} MB | {soak['rss_growth_mb']:+} MB | "
            f"{soak.get('log_backlog_max')} / {soak.get('log_backlog_end')} | "
            f"{soak.get('logs_dropped', 'n/a')} | "
            f"{soak['request_log_files_at_end']} | {soak['error_log_files_at_end']} |",
            "",
        ]
        left = soak.get("log_backlog_after_wait")
        lines += [
            "RSS after the load stopped and the log writer was given up to 180 s to catch up: "
            f"{soak.get('rss_after_log_drain_mb')} MB"
            + (f" (log jobs still queued: {left})." if left is not None else "."),
            "",
        ]
        if soak.get("aborted"):
            lines += [f"**The soak {soak['aborted']}.**", ""]
        series = soak.get("samples_t_rss_mb_backlog") or []
        if series:
            step = max(1, len(series) // 12)
            points = ", ".join(f"{t:.0f} s: {m} MB / {b}" for t, m, b in series[::step])
            lines += [f"RSS / log backlog over time: {points}.", ""]
    return lines


def render_wrk(bench: dict[str, Any]) -> list[str]:
    lines = [
        "## Non-streaming (wrk, ~2 KB request, ~1 KB reply)",
        "",
        "| conc. | target | req/s | x direct | x pass-through | p50 ms | p99 ms | "
        "added p50 ms | added p99 ms | added p50 x pass-through's | errors | peak RSS MB "
        "| req/s incl. log catch-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, data in bench["cells"].items():
        if data["kind"] != "wrk":
            continue
        per = bench["summary"][cell]
        for name in ORDER:
            s = per.get(name, {})
            if not s.get("runs"):
                lines.append(f"| {data['load']} | {name} | unavailable | | | | | | | | | | |")
                continue
            lines.append(
                f"| {data['load']} | {name} | {fmt(s['rps'], 0)} | {fmt(s.get('x_direct_rps'))} "
                f"| {fmt(s.get('x_pass_rps'))} | {fmt(s['p50_ms'])} | {fmt(s['p99_ms'])} "
                f"| {fmt(s.get('added_p50_ms'))} | {fmt(s.get('added_p99_ms'))} "
                f"| {fmt(s.get('added_p50_x_pass'))} | {s['errors']} | {s['peak_rss_mb']} "
                f"| {fmt(s.get('rps_with_log_catch_up'), 0)} |"
            )
        lines.append(
            f"| {data['load']} | *ratios* | rules/default {fmt(per.get('rules_x_default_rps'))}"
            f" | rules11/default {fmt(per.get('rules11_x_default_rps'))}"
            f" | fhp/LiteLLM {fmt(per.get('fhp_x_litellm_rps'), 1)} | | | | | | | | |"
        )
    lines.append("")
    return lines


def render_streams(bench: dict[str, Any]) -> list[str]:
    lines = [
        "## Streaming (concurrent streams, asyncio client, all started at once)",
        "",
        "| streams | target | completed (median) | failed, all runs | content events received | "
        "TTFT p50 ms | TTFT p99 ms | added TTFT p50 ms | added TTFT p99 ms | "
        "added TTFT p50 x pass-through's | wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, data in bench["cells"].items():
        if data["kind"] != "streams":
            continue
        per = bench["summary"][cell]
        for name in ORDER:
            s = per.get(name, {})
            if not s.get("runs"):
                lines.append(f"| {data['load']} | {name} | unavailable | | | | | | | | | |")
                continue
            reasons = Counter[str]()
            for r in data["runs"][name]:
                if r and "fail_reasons" in r:
                    reasons.update(r["fail_reasons"])
            why = f" {dict(reasons)}" if reasons else ""
            lines.append(
                f"| {data['load']} | {name} | {fmt(s['completed'], 0)} "
                f"| {s['failed_total']}/{s['streams_total']}{why} "
                f"| {s['events_delivered_total']}/{s['events_expected_total']} "
                f"| {fmt(s['ttft_p50_ms'])} | {fmt(s['ttft_p99_ms'])} "
                f"| {fmt(s.get('added_ttft_p50_ms'))} | {fmt(s.get('added_ttft_p99_ms'))} "
                f"| {fmt(s.get('added_ttft_p50_x_pass'))} | {fmt(s['wall_s'])} "
                f"| {s['peak_rss_mb']} |"
            )
    lines.append("")
    return lines


def render_fresh(bench: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    fresh = bench.get("fresh") or {}
    if fresh:
        lines += [
            "### 1000 streams in a freshly started process",
            "",
            "The cells above use one long-running process per target; here the "
            "pass-through and first-hop-proxy are restarted, warmed with 20 streams, then "
            "given the largest stream cell once.",
            "",
            "| target | completed | RSS before MB | peak RSS MB | TTFT p50 ms | TTFT p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for name, f in fresh.items():
            if not f or "error" in f:
                lines.append(f"| {name} | failed: {(f or {}).get('error')} | | | | |")
                continue
            lines.append(
                f"| {name} | {f['completed']}/{f['streams']} | {f.get('rss_before_mb')} "
                f"| {f['peak_rss_mb']} | {fmt(f['ttft_p50_ms'])} | {fmt(f['ttft_p99_ms'])} |"
            )
        lines.append("")
    backlog: list[str] = []
    for cell, data in bench["cells"].items():
        for name in (FHP, FHP_RULES, FHP_RULES11):
            values = [r.get("log_backlog") for r in data["runs"].get(name, []) if r]
            values = [v for v in values if v is not None]
            if values:
                backlog.append(f"{cell} {name}: {max(values)}")
    if backlog:
        lines += [
            "Log writer backlog (jobs queued in first-hop-proxy's log thread when the load "
            "stopped, largest of the runs; the harness waits for it to drain before the next "
            "measurement): " + "; ".join(backlog) + ".",
            "",
        ]
    return lines


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        with contextlib.suppress(ValueError):
            data = json.loads(path.read_text("utf-8"))
            if isinstance(data, dict):
                return data
    return {}


def write_results(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n", "utf-8")
    (out / "RESULTS.md").write_text(render(results), "utf-8")
    log(f"wrote {out / 'RESULTS.md'} and {out / 'results.json'}")


@contextlib.contextmanager
def work_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fhp-bench-"))
    try:
        yield path
    finally:
        if keep:
            log(f"kept work folder {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one short run per cell (smoke)")
    parser.add_argument("--soak", action="store_true", help="the 10-minute soak only")
    parser.add_argument("--runs", type=int, help="runs per cell (default 3; --quick: 1)")
    parser.add_argument("--seconds", type=float, help="wrk seconds per run (5; --quick: 1)")
    parser.add_argument("--soak-seconds", type=float, help="soak length (600; --quick: 20)")
    parser.add_argument("--gap-ms", type=float, default=50.0, help="gap between stream events")
    parser.add_argument(
        "--soak-rate",
        type=float,
        help="pace the soak's non-streaming requests to this many per second in all "
        "(reported apart, as soak_paced)",
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default bench/; --quick: bench/.work)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (configs, logs)")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite RESULTS.md from results.json"
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    out = args.out or (BENCH / ".work" if quick else BENCH)
    if args.render:
        write_results(out, load_results(out / "results.json"))
        return 0
    fds = raise_fd_limit()
    log(f"open-file limit {fds}")
    results = load_results(out / "results.json")
    with work_dir(args.keep) as work:
        if args.soak:
            seconds = args.soak_seconds or (20.0 if quick else 600.0)
            soak = run_soak(work, args.gap_ms, seconds, 5.0 if quick else 30.0, args.soak_rate)
            soak["machine"] = machine_info(litellm_version())
            results["soak_paced" if args.soak_rate else "soak"] = soak
        else:
            plan = Plan(
                runs=args.runs or (1 if quick else 3),
                wrk_seconds=args.seconds or (1.0 if quick else 5.0),
                concurrencies=[1, 16, 64],
                stream_counts=[100, 500, 1000],
                stream_limit_s=60.0 if quick else 120.0,
                quick=quick,
            )
            bench = run_bench(plan, work, args.gap_ms)
            bench["machine"] = machine_info(litellm_version())
            results["bench"] = bench
    write_results(out, results)
    for t in check_targets(results):
        state = {True: "pass", False: "MISS", None: "n/a"}[t["pass"]]
        log(f"{state:5} {t['target']}: {fmt(t['value'])} ({t['limit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
