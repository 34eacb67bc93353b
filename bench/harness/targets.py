"""The fake upstream and every target: processes, configs, readiness, LiteLLM's venv."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness import (
    BENCH,
    DIRECT,
    FHP,
    FHP_ASYNCIO,
    FHP_MIX,
    FHP_NOLOG,
    FHP_RULES,
    FHP_RULES11,
    LITELLM,
    LITELLM_VENV,
    LITELLM_VERSION,
    MASTER_KEY,
    MODEL,
    PASS,
    RULES_CONFIG,
    log,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
                FHP: lambda: self.start_fhp(FHP),
                FHP_ASYNCIO: lambda: self.start_fhp(FHP_ASYNCIO, uvloop=False),
                FHP_MIX: lambda: self.start_fhp(FHP_MIX, keep_all=True),
                FHP_NOLOG: lambda: self.start_fhp(FHP_NOLOG, logging=False),
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
        target.extra["event_loop"] = event_loop_of(self.work / "passthrough.log")
        return target

    def fhp_config(
        self,
        name: str,
        port: int,
        *,
        rules: bool = False,
        sane: bool = False,
        logging: bool = True,
        keep_all: bool = False,
        keep_errors: bool = False,
    ) -> Path:
        """The config of target ``name``: the defaults, or the spec's example ``rules``
        (``sane``: without the '|' rule); ``logging`` on or off; ``keep_all`` (or
        ``keep_errors``) raises ``max_files`` so that no log (no error log) is pruned."""
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {}
        if rules:
            data = yaml.safe_load(RULES_CONFIG.read_text(encoding="utf-8"))
            if sane:
                section = data["regex_replacement"]
                section["rules"] = [r for r in section["rules"] if r["pattern"] != "|"]
        data.setdefault("target_proxy", {})["url"] = self.upstream_url
        data["server"] = {**data.get("server", {}), "host": "127.0.0.1", "port": port}
        data["logging"] = {**data.get("logging", {}), "enabled": logging, "folder": "logs"}
        data["error_logging"] = {
            **data.get("error_logging", {}),
            "enabled": logging,
            "folder": "logs/errors",
        }
        # Every log (or every error log) stays on disk, to be looked for afterwards.
        if keep_all:
            data["logging"]["max_files"] = 10_000_000
        if keep_all or keep_errors:
            data["error_logging"]["max_files"] = 10_000_000
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), "utf-8")
        return path

    def start_fhp(self, name: str, uvloop: bool = True, **options: bool) -> Target:
        """first-hop-proxy with ``fhp_config(name, port, **options)`` (``--no-uvloop``)."""
        port = free_port()
        config = self.fhp_config(name, port, **options)
        settings = yaml.safe_load(config.read_text("utf-8"))
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
                *([] if uvloop else ["--no-uvloop"]),
            ],
            config.parent / "proxy.log",
            env,
        )
        target = Target(name, f"http://127.0.0.1:{port}/v1/chat/completions", proc)
        if settings["logging"]["enabled"]:
            target.extra["log_folder"] = str(config.parent / "logs")
        if "regex_replacement" in settings:
            target.extra["rules"] = {
                "outgoing": len(settings["regex_replacement"]["rules"]),
                "incoming": len(settings["response_processing"]["rules"]),
            }
        problem = wait_http(f"http://127.0.0.1:{port}/health", proc, 30)
        self._check(target, problem, config.parent / "proxy.log")
        target.extra["event_loop"] = event_loop_of(config.parent / "proxy.log")
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


def event_loop_of(logfile: Path) -> str:
    """The event loop a target said it runs on (``event loop: uvloop`` in its output)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            match = re.search(r"event loop: (\w+)", logfile.read_text(errors="replace"))
            if match:
                return match[1]
        time.sleep(0.1)
    return "unknown"


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


def log_files(folder: Path) -> tuple[int, int]:
    """Request logs and error logs in first-hop-proxy's log ``folder`` right now."""
    requests = sum(1 for p in folder.glob("*") if p.is_file())
    errors = sum(1 for p in (folder / "errors").glob("*") if p.is_file())
    return requests, errors


def upstream_counts(chat_url: str) -> dict[str, int]:
    """The fake upstream's answers so far by kind (ok, failed, streams)."""
    url = chat_url.replace("/v1/chat/completions", "/stats")
    with urllib.request.urlopen(url, timeout=5) as resp:
        data = json.loads(resp.read())
    return {str(k): int(v) for k, v in data.items()}


REQUEST_LOG_HEAD = re.compile(
    r"^Request ID: (?P<id>[^\n]*)$.*?^Final Status: (?P<status>\S+)", re.M | re.S
)
ERROR_LOG_ID = re.compile(r'"request_id": "(?P<id>[^"]*)"')


def logs_on_disk(folder: Path) -> dict[str, Any]:
    """What first-hop-proxy's log ``folder`` holds: request ids by final status, error ids.

    Reads the head of every request log (its id and final status) and every
    error log's ``request_id``: the proof that a failure's logs reached the disk.
    """
    statuses: dict[str, str] = {}
    for path in folder.glob("*.log"):
        with contextlib.suppress(OSError), path.open("rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
            match = REQUEST_LOG_HEAD.search(head)
            if match:
                statuses[match["id"].strip()] = match["status"]
    error_ids: dict[str, int] = {}
    for path in (folder / "errors").glob("*.log"):
        with contextlib.suppress(OSError):
            match = ERROR_LOG_ID.search(path.read_text("utf-8", "replace"))
            key = match["id"] if match else ""
            error_ids[key] = error_ids.get(key, 0) + 1
    return {"request_status": statuses, "error_ids": error_ids}
