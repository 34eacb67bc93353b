"""Shared fixtures: a fake upstream and the real proxy, both on loopback ports."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from first_hop_proxy.config import parse_config
from first_hop_proxy.server import RunningServer, start

from .fake_upstream import FakeUpstream

SHARED = Path(__file__).resolve().parents[2] / "shared"
SPEC = SHARED / "spec"
SPEC_CONFIG = SPEC / "original-config.example.yaml"
REPO = Path(__file__).resolve().parents[1]

StartProxy = Callable[..., Awaitable[RunningServer]]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream().start()
    yield fake
    await fake.close()


@pytest.fixture
async def start_proxy(upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[StartProxy]:
    """Start the real proxy against the fake upstream; settings merge over test defaults.

    Test defaults keep retries fast (tiny delays) so no test sleeps for seconds.
    """
    running: list[RunningServer] = []

    async def _start(settings: dict[str, Any] | None = None, *, env: dict[str, str] | None = None) -> RunningServer:
        base = {
            "target_proxy": {"url": upstream.chat_url, "timeout": 5},
            "error_handling": {"base_delay": 0.01, "max_delay": 0.05},
            "logging": {"folder": str(tmp_path / "logs")},
            "error_logging": {"folder": str(tmp_path / "logs" / "errors")},
        }
        data = merge(base, settings or {})
        loaded = parse_config(data, base_dir=tmp_path, env=env or {})
        server = await start(loaded, "127.0.0.1", 0)
        running.append(server)
        return server

    yield _start
    for server in running:
        await server.close()


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> RunningServer:
    return await start_proxy()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def chat_body(stream: bool = False, text: str = "Hi", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], "stream": stream, **extra}
