"""uvloop: used when installed, unless ``server.uvloop: false`` or ``--no-uvloop`` says not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from first_hop_proxy.server import loop_factory

from .conftest import free_port
from .test_cli import MODULE, get_health, serving, write_config

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed on this platform")


def test_loop_factory_is_uvloop_only_when_wanted() -> None:
    assert loop_factory(True) is uvloop.new_event_loop
    assert loop_factory(False) is None


def test_loop_factory_without_uvloop_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` fail
    assert loop_factory(True) is None


@pytest.mark.parametrize(
    ("args", "config", "loop"),
    [
        ([], "", "uvloop"),
        (["--no-uvloop"], "", "asyncio"),
        ([], "server:\n  uvloop: false\n", "asyncio"),
        (["--no-uvloop"], "server:\n  uvloop: true\n", "asyncio"),
    ],
    ids=["default", "flag", "config", "flag-over-config"],
)
async def test_the_proxy_runs_on_the_loop_it_is_told(
    tmp_path: Path, args: list[str], config: str, loop: str
) -> None:
    write_config(tmp_path / "config.yaml", config)
    port = free_port()
    command = [*MODULE, "serve", "--port", str(port), *args]
    async with serving(command, tmp_path, port) as proxy:
        assert await get_health(proxy.url) == 200
        assert await proxy.stop() == 0
    assert f"(event loop: {loop})" in proxy.stderr
    assert "Traceback" not in proxy.stderr
