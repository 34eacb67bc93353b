"""first-hop-proxy at two git revisions, side by side: CPU per request and latency.

    .venv/bin/python bench/ab.py REV_A REV_B [--rounds 3] [--seconds 5] [--b-args=--no-uvloop]
                                             [--instructions]

Each revision is checked out into a temporary git worktree and run from its
``src`` with this venv's packages (so a revision whose dependencies this venv
lacks cannot be measured). Both get the same one-upstream config, as written for
the spec (``target_proxy``), against the same fake upstream; the revisions
alternate within each round, each in a fresh process, and the medians are
printed. Used to show what a change costs the request path (e.g. the
several-upstreams support on a config with one upstream).

CPU time per request moves by 5 % or more between runs of the same revision on
a shared machine, which hides smaller changes. ``--instructions`` counts instead
the instructions the proxy process executes per request (all its threads, user
space only) under valgrind's callgrind, switched on only while the load runs and
less what the same process spends idle for as long: the same revision gives the
same count within about 1 %. It runs some 50x slower, so the load is lighter (a
few hundred requests), and it leaves out what the kernel spends on the sockets,
which is about the same for both revisions.
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
from harness.load import cpu_seconds, ensure_program, run_wrk, wrk_script
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
    instructions: bool = False,
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
    counts = folder / "callgrind.out"
    if instructions:
        cmd = [*CALLGRIND, f"--callgrind-out-file={counts}", *cmd]
    proc = spawn([*cmd, "--port", str(port), *extra], folder / "proxy.log", env)
    try:
        problem = wait_http(f"http://127.0.0.1:{port}/health", proc, 300 if instructions else 30)
        if problem:
            raise SystemExit(f"{src}: the proxy did not start: {problem}")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        script = wrk_script(folder, "post.lua")
        run_wrk(script, url, conns, 3 if instructions else 1)  # warm-up
        time.sleep(0.5)
        if instructions:
            # First as long with no load: what the proxy spends idle (its timers and
            # threads) is taken off, as it weighs 50x more per request under valgrind.
            callgrind_control(proc.pid, "-i", "on")
            time.sleep(seconds)
            callgrind_control(proc.pid, "-d", "idle")
        before = cpu_seconds(proc.pid)[0]
        result = run_wrk(script, url, conns, seconds)
        after = cpu_seconds(proc.pid)[0]
        if instructions:
            callgrind_control(proc.pid, "-d", "load")
    finally:
        stop(proc)
    result["cpu_us"] = (after - before) * 1e6 / max(1, result["requests"])
    if instructions:
        idle, load = (callgrind_total(folder / f"callgrind.out.{n}") for n in (1, 2))
        result["instructions"] = (load - idle) / max(1, result["requests"])
    return result


#: valgrind's callgrind, counting nothing until told to (start-up is not measured).
CALLGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]


def callgrind_control(pid: int, *command: str) -> None:
    """Tell callgrind in the running process to count (``-i on``) or to write what it
    counted so far and start again from zero (``-d NAME``: one numbered file each)."""
    subprocess.run(
        ["callgrind_control", *command, str(pid)], check=True, capture_output=True, timeout=60
    )


def callgrind_total(path: Path) -> int:
    """The instructions one callgrind file counted."""
    lines = path.read_text("utf-8", "replace").splitlines()
    # "summary:" heads the file (0 when counting began late); "totals:" ends it.
    return max(
        (int(line.split()[1]) for line in lines if line.startswith(("summary:", "totals:"))),
        default=0,
    )


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
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count the instructions per request under valgrind's callgrind (steady to about "
        "1 %%, where CPU time moves by 5 %%) instead of CPU time; about 50x slower",
    )
    args = parser.parse_args()
    if args.instructions:
        ensure_program("callgrind_control", "valgrind")
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
                figure = "instructions" if args.instructions else "cpu_us"
                report(run(args, sources, work, upstream), args.revisions, figure)
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
                got = measure(
                    src, work, upstream, conns, logging, args.seconds, extra, args.instructions
                )
                results.setdefault((label, rev), []).append(got)
                figure = (
                    f"{got['instructions']:,.0f} instructions/request"
                    if args.instructions
                    else f"{got['cpu_us']:.0f} us CPU/request"
                )
                log(
                    f"{label} round {round_ + 1} {rev}: {got['rps']:.0f} req/s, "
                    f"p50 {got['p50_ms']:.2f} ms, {figure}"
                )
    return results


def report(
    results: dict[tuple[str, str], list[dict[str, Any]]], revisions: list[str], figure: str
) -> None:
    a, b = revisions
    unit = "instructions/req" if figure == "instructions" else "CPU us/req"
    p50_note = "" if figure == "cpu_us" else " (under valgrind)"
    print(
        f"\n| load | {a} {unit} | {b} {unit} | {b} / {a} "
        f"| {a} p50 ms{p50_note} | {b} p50 ms{p50_note} |"
    )
    print("|---|---|---|---|---|---|")
    for label, _, _ in MODES:
        cost = [statistics.median(r[figure] for r in results[label, rev]) for rev in revisions]
        p50 = [statistics.median(r["p50_ms"] for r in results[label, rev]) for rev in revisions]
        print(
            f"| {label} | {cost[0]:,.0f} | {cost[1]:,.0f} | {cost[1] / cost[0]:.3f} "
            f"| {p50[0]:.2f} | {p50[1]:.2f} |"
        )


if __name__ == "__main__":
    main()
