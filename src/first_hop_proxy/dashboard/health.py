"""Health at a glance: upstreams, counters, the last hour and the log writer, as JSON."""

from __future__ import annotations

import time
from typing import Any

from .. import __version__
from ..logs.views import logging_status
from ..state import State, upstream_status


def health(state: State) -> dict[str, Any]:
    """Each upstream as ``/health/detailed`` shows it (breaker, last 5 and 60 minutes),
    the counters, requests per minute over the last hour, and the log writer."""
    now = time.time()
    logging = logging_status(state.writer, state.request_log, state.error_log)
    logging["request_log"]["folder"] = str(state.request_log.folder)
    logging["error_log"]["folder"] = str(state.error_log.folder)
    status, reason = state.health()
    return {
        "version": __version__,
        "now": now,
        "status": status,
        "reason": state.redactor.text(reason),
        "uptime_seconds": round(time.monotonic() - state.started, 1),
        "demo_mode": state.loaded.demo,
        "in_flight": state.counters.in_flight,
        "upstreams": [upstream_status(u, state.redactor) for u in state.upstreams],
        "counters": state.stats.counters(),
        "per_minute": state.stats.per_minute(now),
        "logging": logging,
    }
