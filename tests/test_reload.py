"""Config changes without a restart: the next request uses them, one in flight does not,
a broken file is refused whole, breakers survive where the URL stayed, the file is
watched, and SIGHUP reloads it."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from first_hop_proxy.config import load_config
from first_hop_proxy.reload import Reloader
from first_hop_proxy.server import RunningServer, start

from .conftest import chat_body, free_port, wait_until
from .fake_upstream import FakeUpstream, Json, completion
from .log_helpers import error_logs, settle, state_of
from .test_cli import MODULE, serving

CHAT = "/v1/chat/completions"


def config_text(upstream_url: str, folder: Path, word: str, **extra: Any) -> str:
    data: dict[str, Any] = {
        "target_proxy": {"url": upstream_url, "timeout": 5},
        "error_handling": {"base_delay": 0.01, "max_delay": 0.05},
        "response_processing": {"rules": [{"pattern": "hello", "replacement": word}]},
        "logging": {"folder": str(folder / "logs")},
        "error_logging": {"folder": str(folder / "logs" / "errors")},
        **extra,
    }
    return yaml.safe_dump(data)


Write = Callable[..., None]


@pytest.fixture
async def reloading(
    upstream: FakeUpstream, tmp_path: Path
) -> AsyncIterator[tuple[RunningServer, Reloader, Write]]:
    path = tmp_path / "config.yaml"

    def write(word: str = "HOLA", url: str | None = None, **extra: Any) -> None:
        path.write_text(config_text(url or upstream.chat_url, tmp_path, word, **extra))

    write("ONE")
    server = await start(load_config(path, env={}), "127.0.0.1", 0)
    reloader = Reloader(state_of(server), path, lambda: load_config(path, env={}))
    yield server, reloader, write
    await server.close()


async def ask(proxy: RunningServer) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + CHAT, json=chat_body()) as resp,
    ):
        body = await resp.read()
        assert resp.status == 200, body
        return str(orjson.loads(body)["choices"][0]["message"]["content"])


async def test_the_next_request_uses_the_new_rules_one_in_flight_the_old(
    reloading: tuple[RunningServer, Reloader, Write], upstream: FakeUpstream
) -> None:
    proxy, reloader, write = reloading
    upstream.queue(Json(200, completion("hello there"), delay=0.5))
    in_flight = asyncio.create_task(ask(proxy))
    await wait_until(lambda: upstream.calls == 1, 2)
    write("TWO")
    assert reloader.reload() is True
    upstream.default = Json(200, completion("hello again"))
    assert await ask(proxy) == "TWO again"
    assert await in_flight == "ONE there"
    assert reloader.reloads == 1


async def test_an_invalid_file_is_refused_and_the_old_config_keeps_serving(
    reloading: tuple[RunningServer, Reloader, Write],
    upstream: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="first_hop_proxy")
    proxy, reloader, write = reloading
    before = state_of(proxy).settings
    write("TWO", error_handling={"max_retries": -1, "base_delay": "soon"})
    assert reloader.reload() is False
    assert state_of(proxy).settings is before
    upstream.default = Json(200, completion("hello"))
    assert await ask(proxy) == "ONE"
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("config reload refused") for line in lines)
    assert any("error_handling.max_retries:" in line for line in lines)
    assert any("error_handling.base_delay:" in line for line in lines)
    await settle(proxy)
    (logged,) = error_logs(tmp_path / "logs" / "errors", "config_error")
    assert "error_handling.max_retries" in logged.read_text()


async def test_breakers_survive_where_the_url_stayed(
    reloading: tuple[RunningServer, Reloader, Write], upstream: FakeUpstream
) -> None:
    proxy, reloader, write = reloading
    breaker = {"failure_threshold": 1, "recovery_timeout": 30}
    write("ONE", circuit_breaker=breaker)
    assert reloader.reload()
    upstream.default = Json(503)
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + CHAT, json=chat_body()) as resp:
            assert resp.status == 503
        assert state_of(proxy).upstreams[0].breaker.state == "open"
        write("TWO", circuit_breaker=breaker)
        assert reloader.reload()
        assert state_of(proxy).upstreams[0].breaker.state == "open"
        async with session.post(proxy.url + CHAT, json=chat_body()) as resp:
            assert (await resp.json())["error"]["code"] == "circuit_open"
        other = f"http://127.0.0.1:{upstream.port}/v1//chat/completions"
        write("TWO", url=other, circuit_breaker=breaker)
        assert reloader.reload()
        assert state_of(proxy).upstreams[0].breaker.state == "closed"


async def test_health_says_when_and_from_where(
    reloading: tuple[RunningServer, Reloader, Write], tmp_path: Path
) -> None:
    proxy, reloader, write = reloading

    async def config() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(proxy.url + "/health/detailed") as resp,
        ):
            return dict((await resp.json())["config"])

    first = await config()
    assert first["file"] == str(tmp_path / "config.yaml")
    await asyncio.sleep(0.01)
    write("TWO")
    reloader.reload()
    assert (await config())["loaded_at"] > first["loaded_at"]


async def test_the_file_is_watched(
    reloading: tuple[RunningServer, Reloader, Write], upstream: FakeUpstream
) -> None:
    proxy, reloader, write = reloading
    stop = asyncio.Event()
    watcher = asyncio.create_task(reloader.watch(stop))
    try:
        await asyncio.sleep(0.3)  # the watch is set up
        write("WATCHED")
        await wait_until(lambda: reloader.reloads == 1, 10)
        assert reloader.reloads == 1
        upstream.default = Json(200, completion("hello"))
        assert await ask(proxy) == "WATCHED"
    finally:
        stop.set()
        await asyncio.wait_for(watcher, 10)


async def test_a_save_by_rename_is_seen_and_a_touch_is_not_a_change(
    reloading: tuple[RunningServer, Reloader, Write], upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy, reloader, _ = reloading
    path = tmp_path / "config.yaml"
    stop = asyncio.Event()
    watcher = asyncio.create_task(reloader.watch(stop, every=0.05))
    try:
        await asyncio.sleep(0.1)
        path.write_bytes(path.read_bytes())  # new times, same bytes: nothing to reload
        await asyncio.sleep(0.6)  # a look, the debounce, and the digest compared
        assert reloader.reloads == 0
        # An editor's save: a new file renamed over the old one (a new inode).
        fresh = tmp_path / "config.yaml.new"
        fresh.write_text(config_text(upstream.chat_url, tmp_path, "RENAMED"))
        fresh.replace(path)
        await wait_until(lambda: reloader.reloads == 1, 5)
        upstream.default = Json(200, completion("hello"))
        assert await ask(proxy) == "RENAMED"
        path.unlink()  # gone: refused, the config in use stays
        await wait_until(lambda: reloader.refusals == 1, 5)
        assert await ask(proxy) == "RENAMED"
    finally:
        stop.set()
        await asyncio.wait_for(watcher, 5)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP exists on POSIX only")
async def test_sighup_reloads(tmp_path: Path, upstream: FakeUpstream) -> None:
    port = free_port()
    path = tmp_path / "config.yaml"
    extra = {"server": {"port": port, "reload_on_change": False}}
    path.write_text(config_text(upstream.chat_url, tmp_path, "ONE", **extra))
    upstream.default = Json(200, completion("hello"))
    command = [*MODULE, "serve", "--config", str(path)]
    async with serving(command, tmp_path, port) as proxy, aiohttp.ClientSession() as session:

        async def reply() -> str:
            async with session.post(proxy.url + CHAT, json=chat_body()) as resp:
                return str((await resp.json())["choices"][0]["message"]["content"])

        assert await reply() == "ONE"
        path.write_text(config_text(upstream.chat_url, tmp_path, "TWO", **extra))
        await asyncio.sleep(0.5)
        assert await reply() == "ONE"  # not watched: reload_on_change is false
        proxy.process.send_signal(signal.SIGHUP)
        for _ in range(100):
            if await reply() == "TWO":
                break
            await asyncio.sleep(0.05)
        assert await reply() == "TWO"
        assert await proxy.stop() == 0
    assert "config reloaded from" in proxy.stderr
    assert "Traceback" not in proxy.stderr
    assert sys.platform != "win32"
