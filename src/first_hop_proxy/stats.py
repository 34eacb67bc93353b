"""Running figures for the dashboard and ``/metrics``, kept in memory as requests end.

Updated on the event loop once per attempt and once per request: a handful of
integer additions, no locks and no label lookups, so the request path does not
notice. The dashboard and the Prometheus collector read them when asked.

Totals since start-up (counters and histograms, what Prometheus wants), and the
requests and failures of the last hour minute by minute (the dashboard's chart).
Each upstream's own last hour (success rate, median latency) is its
:class:`~first_hop_proxy.upstreams.Record`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from typing import Any

WINDOW_MINUTES = 60
#: Bucket bounds (seconds) of the latency and time-to-first-token histograms.
HISTOGRAM_BOUNDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def is_failure(status: int) -> bool:
    """A request the person did not get a reply for (a client that left is no failure)."""
    return status >= 400 and status != 499


class Histogram:
    """Counts per bucket, their sum and count: a Prometheus histogram without its locks."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = HISTOGRAM_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, observations at or below it)`` pairs, ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class _Minute:
    minute: int
    requests: int = 0
    failures: int = 0


class Stats:
    """Everything counted since start-up, plus the last hour's requests minute by minute."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (upstream, final status)
        self.attempts: Counter[tuple[str, str]] = Counter()  # (upstream, decision)
        self.retries: Counter[str] = Counter()  # by the failed attempt's status or failure kind
        self.refusals: Counter[str] = Counter()  # 401/403/421 before a request was served
        self.recategorizations = 0
        self.hard_stops = 0
        self.empty_replies = 0
        self.client_aborts = 0
        self.latency: dict[str, Histogram] = {}  # per upstream: each attempt's duration
        self.first_token: dict[str, Histogram] = {}  # per upstream: streams' first content
        self._minutes: list[_Minute | None] = [None] * WINDOW_MINUTES

    def attempt(
        self,
        upstream: str,
        *,
        action: str,
        duration: float,
        retry_reason: str = "",
        recategorized: bool = False,
        empty: bool = False,
    ) -> None:
        """One upstream attempt and what the decision core made of it."""
        histogram = self.latency.get(upstream)
        if histogram is None:
            histogram = self.latency[upstream] = Histogram()
        histogram.observe(duration)
        self.attempts[upstream, action] += 1
        if retry_reason:
            self.retries[retry_reason] += 1
        if recategorized:
            self.recategorizations += 1
        if empty:
            self.empty_replies += 1
        if action == "hard_stop":
            self.hard_stops += 1

    def request(
        self, upstream: str, status: int, now: float, first_token: float | None = None
    ) -> None:
        """One client request has ended with ``status`` (``upstream``: the last one tried)."""
        self.requests[upstream, status] += 1
        if status == 499:
            self.client_aborts += 1
        if first_token is not None:
            histogram = self.first_token.get(upstream)
            if histogram is None:
                histogram = self.first_token[upstream] = Histogram()
            histogram.observe(first_token)
        minute = int(now // 60)
        slot = self._minutes[minute % WINDOW_MINUTES]
        if slot is None or slot.minute != minute:
            slot = self._minutes[minute % WINDOW_MINUTES] = _Minute(minute)
        slot.requests += 1
        slot.failures += is_failure(status)

    def per_minute(self, now: float) -> list[dict[str, int]]:
        """Requests and failures in each of the last 60 minutes, oldest first.

        ``t`` is the minute's start in Unix seconds; the last entry is the minute running now.
        """
        now_minute = int(now // 60)
        out = []
        for minute in range(now_minute - WINDOW_MINUTES + 1, now_minute + 1):
            slot = self._minutes[minute % WINDOW_MINUTES]
            if slot is None or slot.minute != minute:
                out.append({"t": minute * 60, "requests": 0, "failures": 0})
            else:
                out.append({"t": minute * 60, "requests": slot.requests, "failures": slot.failures})
        return out

    def counters(self) -> dict[str, Any]:
        """The totals the dashboard shows."""
        by_status: Counter[int] = Counter()
        for (_, status), n in self.requests.items():
            by_status[status] += n
        return {
            "requests": sum(by_status.values()),
            "by_status": {str(k): v for k, v in sorted(by_status.items())},
            "retries": sum(self.retries.values()),
            "retries_by_reason": dict(self.retries.most_common()),
            "recategorizations": self.recategorizations,
            "hard_stops": self.hard_stops,
            "empty_replies": self.empty_replies,
            "client_aborts": self.client_aborts,
            "refusals": dict(self.refusals),
        }
