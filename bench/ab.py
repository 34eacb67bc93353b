"""first-hop-proxy at two git revisions, side by side: CPU per request and latency.

    .venv/bin/python bench/ab.py REV_A REV_B [--rounds 3] [--seconds 5] [--b-args=--no-uvloop]

Each revision is checked out into a temporary git worktree and run from its
``src`` with this venv's packages (so a revision whose dependencies this venv
lacks cannot be measured). Both get the same one-upstream config, as written for
the spec (``target_proxy``), against the same fake upstream; the revisions
alternate within each round, each in a fresh process, and the medians are
printed. Used to show what a change costs the request path (e.g. the
several-upstreams support on a config with one upstream).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH, ROOT, log
from harness.load import cpu_seconds, run_wrk, wrk_script
from harness.targets import free_port, spawn, stop, wait_http

#: (label, connections, logging on)
MODES = [
    ("c=1, logging on", 1, True),
    ("c=1, logging off", 1, False),
    ("c=16, logging off", 16, False),
]


def checkout(rev: str, folder: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(folder), rev],
        check=True,
        timeout=120,
    )
    return folder


def measure(
    src: Path,
    work: Path,
    upstream: str,
    conns: int,
    logging: bool,
    seconds: float,
    extra: list[str],
) -> dict[str, Any]:
    """One fresh proxy from ``src``: warmed, then one wrk run; CPU per request."""
    port = free_port()
    folder = Path(tempfile.mkdtemp(dir=work))
    config = {
        "target_proxy": {"url": upstream},
        "server": {"host": "127.0.0.1", "port": port},
        "logging": {"enabled": logging, "folder": "logs"},
        "error_logging": {"enabled": logging, "folder": "logs/errors"},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), "utf-8")
    env = {**os.environ, "PYTHONPATH": str(src)}
    env = {k: v for k, v in env.items() if not k.startswith("FHP_")}
    cmd = [sys.executable, "-m", "first_hop_proxy", "serve", "--config", str(path)]
    proc = spawn([*cmd, "--port", str(port), *extra], folder / "proxy.log", env)
    try:
        problem = wait_http(f"http://127.0.0.1:{port}/health", proc, 30)
        if problem:
            raise SystemExit(f"{src}: the proxy did not start: {problem}")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        script = wrk_script(folder, "post.lua")
        run_wrk(script, url, conns, 1)  # warm-up
        time.sleep(0.5)
        before = cpu_seconds(proc.pid)[0]
        result = run_wrk(script, url, conns, seconds)
        after = cpu_seconds(proc.pid)[0]
    finally:
        stop(proc)
    result["cpu_us"] = (after - before) * 1e6 / max(1, result["requests"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revisions", nargs=2, help="two git revisions (commits, tags, branches)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--b-args",
        default="",
        help="more command-line arguments for the second revision's proxy (e.g. --no-uvloop, "
        "to compare on the same event loop as a revision from before uvloop)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fhp-ab-") as tmp:
        work = Path(tmp)
        sources = {}
        try:
            for n, rev in enumerate(args.revisions):
                sources[rev] = checkout(rev, work / f"rev{n}") / "src"
            port = free_port()
            up = spawn(
                [sys.executable, str(BENCH / "upstream.py"), "--port", str(port)],
                work / "upstream.log",
            )
            try:
                problem = wait_http(f"http://127.0.0.1:{port}/v1/models", up, 20)
                if problem:
                    raise SystemExit(f"fake upstream did not start: {problem}")
                upstream = f"http://127.0.0.1:{port}/v1/chat/completions"
                report(run(args, sources, work, upstream), args.revisions)
            finally:
                stop(up)
        finally:
            for n in range(len(sources)):
                subprocess.run(
                    [
                        "git",
                        "-C",
                        str(ROOT),
                        "worktree",
                        "remove",
                        "--force",
                        str(work / f"rev{n}"),
                    ],
                    check=False,
                    timeout=60,
                )


def run(
    args: argparse.Namespace, sources: dict[str, Path], work: Path, upstream: str
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for label, conns, logging in MODES:
        for round_ in range(args.rounds):
            for n, (rev, src) in enumerate(sources.items()):
                extra = args.b_args.split() if n == 1 else []
                got = measure(src, work, upstream, conns, logging, args.seconds, extra)
                results.setdefault((label, rev), []).append(got)
                log(
                    f"{label} round {round_ + 1} {rev}: {got['rps']:.0f} req/s, "
                    f"p50 {got['p50_ms']:.2f} ms, {got['cpu_us']:.0f} us CPU/request"
                )
    return results


def report(results: dict[tuple[str, str], list[dict[str, Any]]], revisions: list[str]) -> None:
    a, b = revisions
    print(f"\n| load | {a} CPU us/req | {b} CPU us/req | {b} / {a} | {a} p50 ms | {b} p50 ms |")
    print("|---|---|---|---|---|---|")
    for label, _, _ in MODES:
        cpu = [statistics.median(r["cpu_us"] for r in results[label, rev]) for rev in revisions]
        p50 = [statistics.median(r["p50_ms"] for r in results[label, rev]) for rev in revisions]
        print(
            f"| {label} | {cpu[0]:,.0f} | {cpu[1]:,.0f} | {cpu[1] / cpu[0]:.2f} "
            f"| {p50[0]:.2f} | {p50[1]:.2f} |"
        )


if __name__ == "__main__":
    main()
