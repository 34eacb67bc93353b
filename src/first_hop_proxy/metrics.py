"""``GET /metrics``: the proxy's figures in the Prometheus text format.

A custom collector reads :class:`~first_hop_proxy.stats.Stats`, the breakers
and the log writer when Prometheus scrapes, so serving a request updates no
metric object at all (no label lookup, no lock): the figures it reads are kept
for the dashboard anyway. Each app has its own registry: no global state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from . import __version__
from .breaker import State as BreakerState
from .state import STATE, State

PREFIX = "first_hop_proxy"


class StateCollector(Collector):
    """Everything ``/metrics`` shows, read from one running proxy's state."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state, stats = self.state, self.state.stats
        info = GaugeMetricFamily(f"{PREFIX}_info", "Version of the proxy.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        uptime = GaugeMetricFamily(f"{PREFIX}_uptime_seconds", "Seconds since start-up.")
        uptime.add_metric([], time.monotonic() - state.started)
        yield uptime
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_requests_in_flight", "Chat requests being served now."
        )
        in_flight.add_metric([], state.counters.in_flight)
        yield in_flight

        yield labelled(
            "requests",
            "Chat requests served, by upstream and the status the client got.",
            ["upstream", "status"],
            stats.requests,
        )
        yield labelled(
            "upstream_attempts",
            "Upstream attempts, by upstream and what the proxy decided "
            "(deliver, retry, fail, hard_stop).",
            ["upstream", "outcome"],
            stats.attempts,
        )
        yield labelled(
            "retries",
            "Retries, by the failed attempt's status or failure kind.",
            ["reason"],
            stats.retries,
        )
        for name, value, doc in (
            ("recategorizations", stats.recategorizations, "Statuses recategorized by a rule."),
            ("hard_stops", stats.hard_stops, "Requests ended by a hard-stop rule."),
            ("empty_replies", stats.empty_replies, "Upstream replies with no content."),
            ("client_aborts", stats.client_aborts, "Requests the client gave up on."),
            ("log_files_written", state.writer.written, "Log files written."),
            ("log_files_dropped", state.writer.dropped, "Log files dropped: writer behind."),
            ("log_write_failures", state.writer.failures, "Log writes that failed."),
        ):
            yield labelled(name, doc, [], {(): value})
        yield labelled(
            "refusals",
            "Requests refused before being served (wrong or missing token or key, "
            "foreign Host or Origin).",
            ["code"],
            stats.refusals,
        )

        breaker = GaugeMetricFamily(
            f"{PREFIX}_circuit_breaker_state",
            "1 for the state each upstream's circuit breaker is in.",
            labels=["upstream", "state"],
        )
        latency = HistogramMetricFamily(
            f"{PREFIX}_upstream_latency_seconds",
            "Duration of each upstream attempt (to the reply, or a stream's first content).",
            labels=["upstream"],
        )
        for upstream in state.upstreams:
            for each in BreakerState:
                breaker.add_metric([upstream.name, str(each)], upstream.breaker.state is each)
        for name, histogram in sorted(stats.latency.items()):
            latency.add_metric([name], histogram.cumulative(), histogram.sum)
        yield breaker
        yield latency
        first_token = HistogramMetricFamily(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from a stream request's arrival to its first content.",
            labels=["upstream"],
        )
        for name, histogram in sorted(stats.first_token.items()):
            first_token.add_metric([name], histogram.cumulative(), histogram.sum)
        yield first_token

        queued = GaugeMetricFamily(f"{PREFIX}_log_jobs_queued", "Log jobs waiting for the writer.")
        queued.add_metric([], state.writer.status()["queued"])
        yield queued


def labelled(
    name: str, doc: str, labels: list[str], counts: Mapping[Any, int]
) -> CounterMetricFamily:
    """A counter family from ``{label value (or tuple of them): count}``, sorted."""
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
    for key, n in sorted(counts.items()):
        values = key if isinstance(key, tuple) else (key,)
        family.add_metric([str(v) for v in values], n)
    return family


def registry_for(state: State) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(state))
    return registry


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` (an admin route: see :mod:`access`).

    A registry per scrape (a scrape every few seconds at most) keeps no metric
    object on the app, so the app never imports this module until it is scraped:
    ``prometheus_client`` is 1 MB of memory a proxy nobody scrapes does not need.
    """
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(registry_for(request.app[STATE]))
    return web.Response(body=body, headers={"Content-Type": content_type})
