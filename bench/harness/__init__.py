"""The benchmark harness behind ``bench/run.py``: names and settings every module shares.

Modules, one concept each:

- ``targets``: the fake upstream and every target process (start, stop, configs, LiteLLM)
- ``load``: the request body, wrk runs, the asyncio stream client, RSS readings
- ``cells``: the measured run, every cell with the targets in alternation
- ``soak``: the long mixed load against first-hop-proxy
- ``stats``: medians, per-run pairs, ratios, the issue's targets
- ``report``: RESULTS.md and results.json
"""

from __future__ import annotations

import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
# A legacy-format config with the example rules (12 outgoing, 49 incoming), the project's own.
RULES_CONFIG = ROOT / "tests" / "data" / "legacy-config.yaml"
LITELLM_VERSION = "1.108.0"  # newer releases need litellm-proxy-extras builds not yet on PyPI
LITELLM_VENV = BENCH / "venv-litellm"
MASTER_KEY = "sk-bench-master"
MODEL = "bench-model"
SOAK_RSS_LIMIT_MB = 3000
EVENTS = 20
EXPECTED_TEXT = "".join(f"tok{i} " for i in range(EVENTS))

FAIL_MODEL = "bench-fail"  # the fake upstream answers 400 to requests for this model
FAIL_EVERY = 10  # the failure mix: every 10th request fails (10 %)
PACED_RATE = 200.0  # requests per second of the paced nothing-lost run

DIRECT, PASS, FHP, FHP_ASYNCIO, FHP_NOLOG, FHP_RULES, FHP_RULES11, LITELLM = (
    "direct",
    "passthrough",
    "fhp-default",
    "fhp-asyncio",
    "fhp-nolog",
    "fhp-rules",
    "fhp-rules11",
    "litellm",
)
FHP_MIX = "fhp-mix"  # the default config, nothing pruned: the nothing-lost checks
TARGET_LABELS = {
    DIRECT: "direct to upstream (floor)",
    PASS: "bare aiohttp pass-through (yardstick)",
    FHP: "first-hop-proxy, default config, logging on",
    FHP_ASYNCIO: "first-hop-proxy, default config, logging on, --no-uvloop (asyncio's own loop)",
    FHP_NOLOG: "first-hop-proxy, default config with request and error logging off",
    FHP_RULES: "first-hop-proxy, 12+49 example rewrite rules, logging on",
    FHP_RULES11: (
        "first-hop-proxy, the same rules minus the outgoing '|' (it matches the empty "
        "string, so it inserts its replacement between every character), logging on"
    ),
    LITELLM: f"LiteLLM proxy {LITELLM_VERSION}",
    FHP_MIX: (
        "first-hop-proxy, default config, logging on, max_files raised so that no log is "
        "pruned (the nothing-lost checks)"
    ),
}
ORDER = [DIRECT, PASS, FHP, FHP_ASYNCIO, FHP_NOLOG, FHP_RULES, FHP_RULES11, LITELLM]
#: Targets measured in the non-streaming (wrk) cells only.
WRK_ONLY = {FHP_ASYNCIO}
#: first-hop-proxy targets that write logs (their writer's counters are read).
LOGGED = (FHP, FHP_ASYNCIO, FHP_RULES, FHP_RULES11)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
