"""The proxy's state: everything one running proxy holds, built from one config.

No module-level globals: the server keeps one :class:`State` on its
``web.Application`` and every handler reaches it from the request.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .config import Config, LoadedConfig


@dataclass(eq=False)
class Counters:
    """Request counters shown in ``/health/detailed``."""

    requests: int = 0
    in_flight: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    retries: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "retries": self.retries,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
        }


@dataclass(eq=False)
class State:
    loaded: LoadedConfig
    target_url: str
    started_wall: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    counters: Counters = field(default_factory=Counters)
    _session: aiohttp.ClientSession | None = None

    @property
    def config(self) -> Config:
        return self.loaded.config

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream session is opened when the server starts")
        return self._session

    def open_session(self) -> None:
        """One shared client session: a pool sized for hundreds of concurrent streams.

        ``total=None``: a stream may run for as long as it keeps sending;
        ``sock_read`` bounds the wait for headers and the gap between reads.
        """
        target = self.config.target_proxy
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=target.connect_timeout, sock_read=target.timeout
            ),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def close_session(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


STATE = web.AppKey("state", State)
