"""Side-by-side benchmark of first-hop-proxy against the floor, the yardstick and LiteLLM.

make bench          full run (3 runs per cell), writes bench/RESULTS.md and bench/results.json
make bench-soak     10 minutes at c=16, mixed streaming and not, against first-hop-proxy
python bench/run.py --quick      one short run per cell, written to bench/.work/

Everything listens on 127.0.0.1 only; every load loop is bounded in count and time.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

# Run as a script (`python bench/run.py`): the harness package sits next to this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH, log
from harness.cells import run_bench
from harness.load import raise_fd_limit
from harness.measure import Plan
from harness.report import fmt, load_results, machine_info, write_results
from harness.soak import run_soak
from harness.stats import check_targets
from harness.targets import litellm_version


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
        "--out",
        type=Path,
        help="output folder (default bench/; --quick, --only or --cells: bench/.work)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (configs, logs)")
    parser.add_argument(
        "--only",
        help="comma-separated targets to measure (to try the harness; e.g. "
        "passthrough,fhp-default,fhp-mix); the fake upstream is always measured",
    )
    parser.add_argument(
        "--cells", help="comma-separated cells to run (e.g. c1,c16,s100; default: all)"
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite RESULTS.md from results.json"
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    # Only a whole run replaces RESULTS.md: a part of one goes to the scratch folder.
    partial = quick or bool(args.only) or bool(args.cells)
    out = args.out or (BENCH / ".work" if partial else BENCH)
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
            cells = set(args.cells.split(",")) if args.cells else None
            plan = Plan(
                runs=args.runs or (1 if quick else 3),
                wrk_seconds=args.seconds or (1.0 if quick else 5.0),
                concurrencies=[c for c in (1, 16, 64) if cells is None or f"c{c}" in cells],
                stream_counts=[n for n in (100, 500, 1000) if cells is None or f"s{n}" in cells],
                stream_limit_s=60.0 if quick else 120.0,
                quick=quick,
            )
            only = set(args.only.split(",")) if args.only else None
            bench = run_bench(plan, work, args.gap_ms, only)
            bench["machine"] = machine_info(litellm_version())
            results["bench"] = bench
    write_results(out, results)
    for t in check_targets(results):
        state = {True: "pass", False: "MISS", None: "n/a"}[t["pass"]]
        log(f"{state:5} {t['target']}: {fmt(t['value'])} ({t['limit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
