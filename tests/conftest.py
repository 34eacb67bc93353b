"""Shared fixtures: a fake upstream and the real proxy, both on loopback ports."""

from __future__ import annotations

import asyncio
import copy
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy.config import parse_config
from first_hop_proxy.server import RunningServer, start

from .fake_upstream import FakeUpstream

DATA = Path(__file__).resolve().parent / "data"
#: A config in the original implementation's format, with its users' quirks (see its header).
LEGACY_CONFIG = DATA / "legacy-config.yaml"
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


@pytest.fixture(autouse=True, scope="session")
def _empty_user_config_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No test finds the developer's own config file: the user's config folder (where the
    lookup ends, see ``config_file``) is an empty temporary one, for subprocesses too."""
    folder = tmp_path_factory.mktemp("xdg-config")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(folder))
        yield folder


def default_settings(upstream: FakeUpstream, folder: Path) -> dict[str, Any]:
    """The tests' defaults: retries fast (tiny delays), logs in ``folder``."""
    return {
        "target_proxy": {"url": upstream.chat_url, "timeout": 5},
        "error_handling": {"base_delay": 0.01, "max_delay": 0.05},
        "logging": {"folder": str(folder / "logs")},
        "error_logging": {"folder": str(folder / "logs" / "errors")},
    }


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream().start()
    yield fake
    await fake.close()


@pytest.fixture
async def start_proxy(upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[StartProxy]:
    """Start the real proxy against the fake upstream; settings merge over
    :func:`default_settings`, so no test sleeps for seconds."""
    running: list[RunningServer] = []

    async def _start(
        settings: dict[str, Any] | None = None, *, env: dict[str, str] | None = None
    ) -> RunningServer:
        data = merge(default_settings(upstream, tmp_path), settings or {})
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
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
        **extra,
    }


async def wait_until(condition: Callable[[], object], seconds: float) -> None:
    """Poll ``condition`` every 10 ms until it is true or ``seconds`` have passed.

    It does not assert: the caller checks what it expects afterwards.
    """
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


async def raw_request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> RawResponse:
    """One HTTP/1.1 request written byte for byte (no client normalizes the path)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    headers = headers or {}
    given = {k.lower() for k in headers}
    lines = [f"{method} {path} HTTP/1.1"]
    if "host" not in given:
        lines.append(f"Host: 127.0.0.1:{port}")
    if "connection" not in given:
        lines.append("Connection: close")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding") == "chunked":
        rest = dechunk(rest)
    return RawResponse(int(status_line.split()[1]), parsed, rest)


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a proxy subprocess: no FHP_* from the caller, src importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHP_")}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
