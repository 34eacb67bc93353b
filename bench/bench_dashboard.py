"""What the dashboard and /metrics cost the request path, and what a scrape costs.

Run: .venv/bin/python bench/bench_dashboard.py

Per request the proxy does the dashboard's bookkeeping on the event loop: the
running figures (``Stats``: one attempt, one request) and the live feed
(``EventHub``: started, attempted, finished). This times exactly those calls,
with the record a typical request has (one delivered attempt, and a retried
request with an upstream error text to mask), with nobody watching and with one
page watching. /metrics reads those figures when scraped; its cost is timed
too, off the request path. Figures are CPU time, the best of several runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import generate_latest

from first_hop_proxy.config import parse_config
from first_hop_proxy.events import EventHub, Subscriber
from first_hop_proxy.logs.request_log import RequestRecord
from first_hop_proxy.metrics import registry_for
from first_hop_proxy.redact import Redactor
from first_hop_proxy.state import State
from first_hop_proxy.stats import Stats

ROUNDS = 9
N = 20_000
KEY = "sk-live-0123456789abcdefWXYZ"


def best_us(fn: Callable[[], None], n: int = N) -> float:
    """CPU microseconds per call (this thread's CPU time: other processes on the machine
    do not count): the best of ``ROUNDS`` runs of ``n`` calls."""
    best = float("inf")
    for _ in range(ROUNDS):
        began = time.thread_time()
        for _ in range(n):
            fn()
        best = min(best, (time.thread_time() - began) / n * 1e6)
    return best


def request(stats: Stats | None, hub: EventHub | None, retried: bool) -> Callable[[], None]:
    """One request's record, as forwarding fills it anyway, plus the dashboard's calls
    (left out when ``stats`` and ``hub`` are None: the baseline)."""

    def factory() -> Redactor:  # as Exchange.redactor: the client's key added
        return Redactor([KEY])

    counter = [0]

    def one() -> None:
        counter[0] += 1
        now = time.time()
        record = RequestRecord(f"r{counter[0]}", "/v1/chat/completions", model="gpt-4o")
        if hub is not None:
            hub.started(record, factory)
        if retried:
            record.add_attempt(
                status=503,
                duration=0.2,
                action="retry",
                reason="503 is a retry code: retry 1 of 10 in 1.0 s",
                error="The model is overloaded",
                code="503",
            )
            if stats is not None and hub is not None:
                stats.attempt("default", action="retry", duration=0.2, retry_reason="503")
                if hub.subscribers:
                    hub.attempted(record)
        record.add_attempt(status=200, duration=0.4, action="deliver", reason="good reply")
        if stats is not None and hub is not None:
            stats.attempt("default", action="deliver", duration=0.4)
            if hub.subscribers:
                hub.attempted(record)
        record.first_content = 0.3
        record.finish(200)
        if stats is not None and hub is not None:
            stats.request("default", 200, now, record.first_content)
            hub.finished(record, "default", 1234, factory)

    return one


def scrape_of(stats: Stats, hub: EventHub) -> Callable[[], None]:
    """A /metrics scrape of a proxy state holding ``stats``."""
    loaded = parse_config({"logging": {"enabled": False}}, base_dir=Path.cwd(), env={})
    state = State.build(loaded)
    state.stats, state.hub = stats, hub
    registry = registry_for(state)

    def scrape() -> None:
        generate_latest(registry)

    return scrape


def main() -> None:
    print("Dashboard bookkeeping per request on the event loop (best of 9 x 20,000, CPU time):")
    for retried in (False, True):
        base = best_us(request(None, None, retried))
        for watching in (False, True):
            stats, hub = Stats(), EventHub()
            one = request(stats, hub, retried)
            subscriber = hub.subscribe() if watching else None

            def step(
                one: Callable[[], None] = one, subscriber: Subscriber | None = subscriber
            ) -> None:
                one()
                if subscriber is not None:
                    subscriber.take()  # the page's stream drains its queue

            extra = best_us(step) - base
            kind = "retried once, error masked" if retried else "one attempt"
            who = "one page watching" if watching else "nobody watching"
            print(f"  {kind:28} {who:18} +{extra:5.1f} us")
    stats, hub = Stats(), EventHub()
    one = request(stats, hub, True)
    for _ in range(N):
        one()
    scrape = best_us(scrape_of(stats, hub), 200)
    print(f"/metrics scrape after {N:,} requests (off the request path): {scrape / 1000:.2f} ms")


if __name__ == "__main__":
    main()
