"""The upstreams a request can go to: each one's settings, circuit breaker and recent record.

An :class:`Upstream` is built from one entry of the config's ``upstreams`` list
(``target_proxy`` alone is a list of one). Its breaker and its record outlive a
config reload as long as its URL stays the same: :func:`build_upstreams` takes
them over from the previous list.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .breaker import CircuitBreaker
from .breaker import State as BreakerState
from .config import DEFAULT_UPSTREAM, serves
from .config import CircuitBreaker as BreakerConfig
from .config import Upstream as UpstreamConfig
from .headers import configured_headers
from .keys import KeyPool

#: Latency buckets in milliseconds: 5 per doubling, 1 ms to about 17 minutes.
_BOUNDS: tuple[float, ...] = tuple(2 ** (i / 5) for i in range(100))
WINDOW_MINUTES = 60


@dataclass(slots=True)
class _Minute:
    minute: int
    attempts: int = 0
    failures: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS) + 1))


class Record:
    """What one upstream's attempts did over the last hour, by the minute.

    Constant memory whatever the load: one small histogram per minute, not one
    entry per attempt. The median comes from the histogram (within 15 %).
    """

    __slots__ = ("_minutes", "attempts", "failures")

    def __init__(self) -> None:
        self._minutes: list[_Minute] = []
        self.attempts = 0  # since start
        self.failures = 0

    def add(self, ok: bool, seconds: float, now: float | None = None) -> None:
        minute = int((time.time() if now is None else now) // 60)
        minutes = self._minutes
        if not minutes or minutes[-1].minute != minute:
            minutes.append(_Minute(minute))
            if len(minutes) > WINDOW_MINUTES:
                del minutes[0]
        bucket = minutes[-1]
        bucket.attempts += 1
        self.attempts += 1
        if not ok:
            bucket.failures += 1
            self.failures += 1
        bucket.latency[bisect.bisect_left(_BOUNDS, seconds * 1000)] += 1

    def summary(self, minutes: int, now: float | None = None) -> dict[str, Any]:
        """Attempts, failures, success rate and median latency over the last ``minutes``."""
        since = int((time.time() if now is None else now) // 60) - minutes + 1
        recent = [m for m in self._minutes if m.minute >= since]
        attempts = sum(m.attempts for m in recent)
        failures = sum(m.failures for m in recent)
        counts = [sum(column) for column in zip(*(m.latency for m in recent), strict=True)]
        return {
            "attempts": attempts,
            "failures": failures,
            "success_rate": round(1 - failures / attempts, 4) if attempts else None,
            "p50_ms": _median_ms(counts, attempts) if attempts else None,
        }


def _median_ms(counts: Sequence[int], total: int) -> float:
    seen = 0
    for i, count in enumerate(counts):
        seen += count
        if seen * 2 >= total:
            low = _BOUNDS[i - 1] if i else 0.0
            high = _BOUNDS[i] if i < len(_BOUNDS) else _BOUNDS[-1]
            return round((low + high) / 2, 1)
    return _BOUNDS[-1]  # not reached: the counts add up to total


class Upstream:
    """One upstream as the running proxy knows it."""

    __slots__ = (
        "breaker",
        "connect_timeout",
        "headers",
        "json_only",
        "keys",
        "last_answer",
        "last_models",
        "model_map",
        "name",
        "patterns",
        "read_timeout",
        "record",
        "stream_mode",
        "streaming_json",
        "timeout",
        "url",
    )

    def __init__(self, config: UpstreamConfig, breaker: BreakerConfig) -> None:
        self.name = config.name
        self.url = config.url
        #: The configured headers that carry something (``headers.configured_headers``).
        self.headers: dict[str, str] = configured_headers(config.headers)
        self.read_timeout = float(config.timeout or 30)
        self.connect_timeout = float(config.connect_timeout or 10)
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=self.connect_timeout, sock_read=self.read_timeout
        )
        self.patterns = None if config.models is None else list(config.models)
        self.model_map = dict(config.model_map)
        self.breaker = CircuitBreaker.from_config(breaker)
        self.record = Record()
        self.last_models: bytes | None = None  # its last good /models answer
        self.last_answer: float | None = None  # wall time it last answered (not failed)
        self.keys = (
            KeyPool(list(config.keys), config.key_header, config.key_strategy)
            if config.keys
            else None
        )
        self.stream_mode = config.stream_upstream or "auto"
        #: auto: JSON requests go upstream as streams since a CDN cut a slow JSON reply.
        self.streaming_json = self.stream_mode == "always"
        #: Models that refused a stream: JSON requests for them go as JSON.
        self.json_only: set[str] = set()

    @property
    def setting(self) -> str:
        """Where it is configured, for messages that name the key to change."""
        return "target_proxy" if self.name == DEFAULT_UPSTREAM else f"upstreams[{self.name}]"

    def serves(self, model: str) -> bool:
        return serves(self.patterns, model)

    def model_for(self, model: str) -> str:
        """The name this upstream knows ``model`` by."""
        return self.model_map.get(model, model)

    def our_name(self, upstream_model: str) -> str:
        """The name a model of this upstream's list goes by here (``model_map`` reversed)."""
        for ours, theirs in self.model_map.items():
            if theirs == upstream_model:
                return ours
        return upstream_model

    def adopt(self, old: Upstream, breaker: BreakerConfig) -> None:
        """Take over ``old``'s breaker state and record (a reload kept the same URL)."""
        old.breaker.threshold = breaker.failure_threshold
        old.breaker.recovery_timeout = float(breaker.recovery_timeout)
        old.breaker.half_open_max = breaker.half_open_max_requests
        old.breaker.enabled = breaker.enabled
        self.breaker = old.breaker
        self.record = old.record
        self.last_models = old.last_models
        self.last_answer = old.last_answer
        if self.keys is not None and old.keys is not None:
            self.keys.adopt(old.keys)
        if self.stream_mode == "auto":
            self.streaming_json = old.streaming_json
        self.json_only = old.json_only

    def streams_json(self, model: str) -> bool:
        """Whether a JSON request for ``model`` goes upstream as a stream (and is assembled)."""
        return self.streaming_json and self.stream_mode != "never" and model not in self.json_only

    def health(self) -> tuple[str, str]:
        """``ok``, ``degraded`` or ``unknown``, and why.

        ``ok`` only once the upstream answered; ``degraded`` while its breaker is
        open (or probing) or its last attempts failed.
        """
        breaker = self.breaker
        last = breaker.last_failure or "no details"
        if breaker.state is BreakerState.OPEN:
            wait = breaker.retry_in(time.monotonic())
            return "degraded", (
                f"the circuit breaker is open after {breaker.consecutive_failures} failed "
                f"attempts in a row (the last: {last}); it is tried again in {wait:.0f} s"
            )
        if breaker.state is BreakerState.HALF_OPEN:
            return "degraded", f"probing it after failures (the last: {last})"
        if breaker.consecutive_failures:
            return "degraded", (
                f"the last {breaker.consecutive_failures} attempt(s) failed (the last: {last})"
            )
        if self.last_answer is None:
            return "unknown", "no request has reached it yet"
        return "ok", "it answered the last attempt"

    def available(self) -> bool:
        """Not taken out of the rotation by an open breaker."""
        return self.breaker.state is BreakerState.CLOSED or not self.breaker.enabled


def build_upstreams(
    configs: Iterable[UpstreamConfig],
    breaker: BreakerConfig,
    previous: Sequence[Upstream] = (),
) -> tuple[Upstream, ...]:
    """The runtime upstreams for a config; breakers carried over where the URL is unchanged."""
    by_url: Mapping[str, Upstream] = {u.url: u for u in previous}
    built = []
    for config in configs:
        upstream = Upstream(config, breaker)
        old = by_url.get(upstream.url)
        if old is not None:
            upstream.adopt(old, breaker)
        built.append(upstream)
    return tuple(built)
