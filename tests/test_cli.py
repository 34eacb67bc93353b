"""The command line, run as a user runs it: a subprocess in a scratch directory."""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from first_hop_proxy.server import GC_THRESHOLDS, tune_gc

from .conftest import REPO, chat_body, clean_env, free_port, wait_until
from .fake_upstream import FakeUpstream, Json

KEY = "sk-live-0123456789abcdefWXYZ"
EXAMPLE = REPO / "config.yaml.example"
MODULE = [sys.executable, "-m", "first_hop_proxy"]


def run(args: Sequence[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MODULE, *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- check-config -------------------------------------------------------------------------


def test_check_config_masks_secrets_and_prints_warnings(tmp_path: Path) -> None:
    write_config(
        tmp_path / "config.yaml",
        f"""
target_proxy:
  url: "https://user:pa55word@up.example/v1/chat/completions?key=qwerty123"
  headers:
    Authorization: "Bearer {KEY}"
    X-Goog-Api-Key: "goog-secret-key-987654"
    X-Title: "SillyTavern"
server:
  host: "0.0.0.0"
error_handling:
  max_retires: 3
""",
    )
    result = run(["check-config"], tmp_path)
    assert result.returncode == 0, result.stderr
    everything = result.stdout + result.stderr
    for secret in (KEY, "goog-secret-key-987654", "pa55word", "qwerty123"):
        assert secret not in everything
    assert "***WXYZ" in result.stdout
    assert "X-Title: SillyTavern" in result.stdout
    assert "host: 0.0.0.0" in result.stdout
    assert "max_retries: 10" in result.stdout
    assert "up.example/v1/chat/completions" in result.stdout
    assert "did you mean 'max_retries'?" in result.stderr
    assert "server.host: listening on 0.0.0.0 exposes the key" in result.stderr
    assert "2 warning(s)" in result.stderr


def test_check_config_spec_file(tmp_path: Path) -> None:
    from .conftest import LEGACY_CONFIG

    result = run(["check-config", "--config", str(LEGACY_CONFIG)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "your-api-key-here" not in result.stdout + result.stderr
    assert "fail_codes wins" in result.stderr
    assert "regex_replacement.rules[9].pattern" in result.stderr


def test_check_config_errors(tmp_path: Path) -> None:
    write_config(
        tmp_path / "config.yaml",
        """
target_proxy:
  timeout: -5
error_handling:
  base_delay: "soon"
  hard_stop_conditions:
    rules:
      - pattern: "unterminated (group"
regex_replacement:
  rules:
    - pattern: "ok"
      flags: "iz"
      apply_to: "narrator"
""",
    )
    result = run(["check-config"], tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "Config error in config.yaml:"
    problems = [line.strip() for line in lines[1:]]
    paths = [p.split(":", 1)[0] for p in problems]
    assert paths == [
        "target_proxy.timeout",
        "regex_replacement.rules[0].flags",
        "regex_replacement.rules[0].apply_to",
        "error_handling.base_delay",
        "error_handling.hard_stop_conditions.rules[0].pattern",
    ]
    assert "missing ) at position 19" in problems[-1]


def test_check_config_invalid_yaml(tmp_path: Path) -> None:
    write_config(tmp_path / "config.yaml", "server:\n  port: [1,\n")
    result = run(["check-config"], tmp_path)
    assert result.returncode == 1
    assert "not valid YAML" in result.stderr


def test_config_option_and_env(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "conf" / "mine.yaml", "server:\n  port: 4242\n")
    other = write_config(tmp_path / "conf" / "other.yaml", "server:\n  port: 4343\n")
    for args in (["check-config", "--config", str(conf)], ["--config", str(conf), "check-config"]):
        result = run(args, tmp_path)
        assert result.returncode == 0, result.stderr
        assert "port: 4242" in result.stdout
        assert f"from {conf}" in result.stdout
    result = run(["check-config"], tmp_path, FHP_CONFIG=str(conf))
    assert "port: 4242" in result.stdout
    # --config wins over $FHP_CONFIG.
    result = run(["check-config", "--config", str(other)], tmp_path, FHP_CONFIG=str(conf))
    assert "port: 4343" in result.stdout
    result = run(["check-config"], tmp_path, FHP_CONFIG=str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    assert "no such file" in result.stderr


def test_check_config_without_file_is_demo(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    result = run(["check-config"], tmp_path, XDG_CONFIG_HOME=str(xdg))
    assert result.returncode == 0, result.stderr
    assert "demo mode" in result.stdout
    user_file = xdg / "first-hop-proxy" / "config.yaml"
    assert "DEMO MODE: no config file found" in result.stderr
    assert (
        "Looked for: --config (not given), $FHP_CONFIG (not set), "
        f"{tmp_path / 'config.yaml'}, {user_file}." in result.stderr
    )
    assert f"run `first-hop-proxy init` (it writes {user_file})" in result.stderr


def test_check_config_empty_file_says_so(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.yaml", "# nothing set yet\n")
    result = run(["check-config"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"# effective config from {path}" in result.stdout
    assert f"DEMO MODE: the config file {path} is empty" in result.stderr
    write_config(path, "server:\n  port: 4242\n")
    result = run(["check-config"], tmp_path)
    assert f"DEMO MODE: the config file {path} sets no target_proxy.url" in result.stderr


# --- init ---------------------------------------------------------------------------------


def test_init_writes_the_user_config_file(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    user_file = xdg / "first-hop-proxy" / "config.yaml"
    result = run(["init"], tmp_path, XDG_CONFIG_HOME=str(xdg))
    assert result.returncode == 0, result.stderr
    assert user_file.read_text(encoding="utf-8") == EXAMPLE.read_text(encoding="utf-8")
    assert f"Wrote the starter config to {user_file}" in result.stdout
    assert "set target_proxy.url" in result.stdout
    assert result.stdout.rstrip().endswith("\n  first-hop-proxy")
    # Found from any folder without --config.
    result = run(["check-config"], tmp_path, XDG_CONFIG_HOME=str(xdg))
    assert result.returncode == 0, result.stderr
    assert f"# effective config from {user_file}" in result.stdout
    assert "your-proxy.example.com" in result.stdout
    # Never overwritten.
    user_file.write_text("server:\n  port: 4242\n", encoding="utf-8")
    result = run(["init"], tmp_path, XDG_CONFIG_HOME=str(xdg))
    assert result.returncode == 1
    assert f"{user_file} already exists; nothing was written" in result.stderr
    assert user_file.read_text(encoding="utf-8") == "server:\n  port: 4242\n"


def test_init_path(tmp_path: Path) -> None:
    result = run(["init", "conf/mine.yaml"], tmp_path)
    assert result.returncode == 0, result.stderr
    written = tmp_path / "conf" / "mine.yaml"
    assert written.read_text(encoding="utf-8") == EXAMPLE.read_text(encoding="utf-8")
    assert f'first-hop-proxy --config "{written}"' in result.stdout
    result = run(["init", "config.yaml"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("\n  first-hop-proxy")
    write_config(tmp_path / "a-file", "")
    result = run(["init", "a-file/config.yaml"], tmp_path)
    assert result.returncode == 1
    assert f"cannot write {tmp_path / 'a-file' / 'config.yaml'}: not a folder" in result.stderr


def test_check_config_env_overrides(tmp_path: Path) -> None:
    result = run(
        ["check-config"],
        tmp_path,
        FHP_TARGET_URL="http://127.0.0.1:9/v1/chat/completions",
        FHP_TARGET_API_KEY=KEY,
        FHP_PORT="5151",
    )
    assert result.returncode == 0, result.stderr
    assert "url: http://127.0.0.1:9/v1/chat/completions" in result.stdout
    assert "port: 5151" in result.stdout
    assert KEY not in result.stdout + result.stderr
    assert "Authorization: Bearer ***WXYZ" in result.stdout


def test_console_script_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "first-hop-proxy"
    assert script.exists()
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=30, env=clean_env()
    )
    assert result.returncode == 0
    assert "check-config" in result.stdout and "serve" in result.stdout


def test_bad_port_argument(tmp_path: Path) -> None:
    result = run(["serve", "--port", "70000"], tmp_path)
    assert result.returncode == 2
    assert "port" in result.stderr


# --- serve ------------------------------------------------------------------------------


@dataclass
class Proxy:
    process: asyncio.subprocess.Process
    url: str
    stderr: str = ""

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        self.process.send_signal(sig)
        _, err = await asyncio.wait_for(self.process.communicate(), timeout)
        self.stderr = err.decode()
        assert self.process.returncode is not None
        return self.process.returncode


@asynccontextmanager
async def serving(command: Sequence[str], cwd: Path, port: int, **env: str) -> AsyncIterator[Proxy]:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env=clean_env(**env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    proxy = Proxy(process, f"http://127.0.0.1:{port}")
    try:
        await wait_ready(proxy)
        yield proxy
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


async def wait_ready(proxy: Proxy) -> None:
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proxy.process.returncode is not None:
                _, err = await proxy.process.communicate()
                pytest.fail(f"the proxy exited: {err.decode()}")
            try:
                async with session.get(proxy.url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    pytest.fail("the proxy did not start")


async def get_health(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url + "/health") as resp:
        assert (await resp.json())["status"] == "ok"
        return resp.status


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serve_and_stop(tmp_path: Path, sig: int) -> None:
    port = free_port()
    command = [*MODULE, "serve", "--host", "127.0.0.1", "--port", str(port)]
    async with serving(command, tmp_path, port) as proxy:
        assert await get_health(proxy.url) == 200
        assert await proxy.stop(sig) == 0
    assert f"listening on http://127.0.0.1:{port}" in proxy.stderr
    assert "Traceback" not in proxy.stderr


async def test_main_py(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, str(REPO / "main.py"), "--port", str(port)]
    async with serving(command, tmp_path, port) as proxy:
        assert await get_health(proxy.url) == 200
        assert await proxy.stop() == 0


async def test_port_from_env_and_config(tmp_path: Path) -> None:
    port = free_port()
    write_config(tmp_path / "config.yaml", f"server:\n  port: {port}\n")
    async with serving([*MODULE], tmp_path, port) as proxy:
        assert await proxy.stop() == 0
    port = free_port()
    async with serving([*MODULE, "serve"], tmp_path, port, FHP_PORT=str(port)) as proxy:
        assert await proxy.stop() == 0


async def test_cli_host_warns_about_exposed_key(tmp_path: Path) -> None:
    port = free_port()
    write_config(
        tmp_path / "config.yaml",
        "target_proxy:\n  url: http://127.0.0.1:9/v1/chat/completions\n"
        f"  headers:\n    Authorization: Bearer {KEY}\n",
    )
    command = [*MODULE, "serve", "--host", "0.0.0.0", "--port", str(port)]
    async with serving(command, tmp_path, port) as proxy:
        assert await proxy.stop() == 0
    assert "exposes the key" in proxy.stderr
    assert KEY not in proxy.stderr


async def test_cli_beyond_loopback_prints_a_generated_admin_token_once(tmp_path: Path) -> None:
    port = free_port()
    command = [*MODULE, "serve", "--host", "0.0.0.0", "--port", str(port)]
    async with serving(command, tmp_path, port) as proxy:
        assert proxy.process.stderr is not None
        token = ""
        while not token:
            line = (await asyncio.wait_for(proxy.process.stderr.readline(), 10)).decode()
            assert line, "the proxy printed no admin token"
            if "admin token" in line:
                token = line.rsplit(": ", 1)[1].strip()
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url + "/metrics") as resp:
                assert resp.status == 401
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(proxy.url + "/metrics", headers=headers) as resp:
                assert resp.status == 200
            async with session.post(proxy.url + "/v1/chat/completions", json=chat_body()) as resp:
                assert resp.status == 200  # chat needs no token
        assert await proxy.stop() == 0
    assert token not in proxy.stderr  # printed once, at start-up, and in no refusal line
    assert "refused GET /metrics" in proxy.stderr


async def test_cli_on_loopback_prints_no_token(tmp_path: Path) -> None:
    port = free_port()
    async with serving([*MODULE, "serve", "--port", str(port)], tmp_path, port) as proxy:
        assert await proxy.stop() == 0
    assert "admin token" not in proxy.stderr
    assert f"dashboard: http://127.0.0.1:{port}/" in proxy.stderr


async def test_port_in_use(tmp_path: Path) -> None:
    port = free_port()
    command = [*MODULE, "serve", "--port", str(port)]
    async with serving(command, tmp_path, port) as proxy:
        second = run(["serve", "--port", str(port)], tmp_path)
        assert second.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
        assert await proxy.stop() == 0


async def test_graceful_shutdown_finishes_in_flight(tmp_path: Path) -> None:
    upstream = await FakeUpstream().start()
    try:
        upstream.default = Json(delay=1)
        port = free_port()
        write_config(
            tmp_path / "config.yaml",
            f"target_proxy:\n  url: {upstream.chat_url}\nserver:\n  port: {port}\n"
            "  shutdown_grace_seconds: 5\n",
        )
        async with serving([*MODULE], tmp_path, port) as proxy:
            async with aiohttp.ClientSession() as session:
                request = asyncio.create_task(
                    session.post(proxy.url + "/v1/chat/completions", json=chat_body())
                )
                await wait_until(lambda: upstream.calls, 3)
                assert upstream.calls == 1
                proxy.process.send_signal(signal.SIGTERM)
                resp = await asyncio.wait_for(request, 5)
                assert resp.status == 200
                body = await resp.json()
                assert body["choices"][0]["message"]["content"] == "Hello there!"
            assert await proxy.stop(signal.SIGTERM) == 0
    finally:
        await upstream.close()


async def test_graceful_shutdown_stops_accepting(tmp_path: Path) -> None:
    upstream = await FakeUpstream().start()
    try:
        upstream.default = Json(delay=1)
        port = free_port()
        write_config(
            tmp_path / "config.yaml",
            f"target_proxy:\n  url: {upstream.chat_url}\n",
        )
        async with (
            serving([*MODULE, "--port", str(port)], tmp_path, port) as proxy,
            aiohttp.ClientSession() as session,
        ):
            request = asyncio.create_task(
                session.post(proxy.url + "/v1/chat/completions", json=chat_body())
            )
            await wait_until(lambda: upstream.calls, 3)
            proxy.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh:
                    await fresh.get(proxy.url + "/health")
            assert (await asyncio.wait_for(request, 5)).status == 200
            returncode = await proxy.stop(signal.SIGTERM)
        assert returncode == 0
    finally:
        await upstream.close()


# --- Demo mode --------------------------------------------------------------------------


async def test_demo_mode(tmp_path: Path) -> None:
    port = free_port()
    async with serving([*MODULE, "--port", str(port)], tmp_path, port) as proxy:
        async with aiohttp.ClientSession() as session:
            url = proxy.url + "/v1/chat/completions"
            async with session.post(url, json=chat_body()) as resp:
                assert resp.status == 200
                reply = (await resp.json())["choices"][0]["message"]["content"]
            async with session.post(url, json=chat_body(stream=True)) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/event-stream"
                text = await resp.text()
            async with session.get(proxy.url + "/v1/models") as resp:
                assert resp.status == 200
                models = await resp.json()
            async with session.get(proxy.url + "/health/detailed") as resp:
                detailed = await resp.json()
        assert await proxy.stop() == 0
    assert "demo" in reply.lower() and "target_proxy.url" in reply
    streamed = ""
    for event in text.strip().split("\n\n"):
        data = event.removeprefix("data: ")
        if data != "[DONE]":
            streamed += orjson.loads(data)["choices"][0]["delta"].get("content", "")
    assert streamed == reply
    assert [m["id"] for m in models["data"]] == ["demo"]
    assert detailed["demo_mode"] is True
    assert detailed["config"]["file"] is None
    assert "config: no config file" in proxy.stderr
    assert "DEMO MODE: no config file found" in proxy.stderr
    assert f"{tmp_path / 'config.yaml'}" in proxy.stderr
    assert "first-hop-proxy init" in proxy.stderr
    assert "target_proxy.url" in proxy.stderr
    assert not (tmp_path / "config.yaml").exists()


async def test_banner_and_health_name_the_config_file(tmp_path: Path) -> None:
    """Started from a folder without a config, the user's config file is found and named."""
    upstream = await FakeUpstream().start()
    try:
        xdg = tmp_path / "xdg"
        user_file = write_config(
            xdg / "first-hop-proxy" / "config.yaml", f"target_proxy:\n  url: {upstream.chat_url}\n"
        )
        work = tmp_path / "work"
        work.mkdir()
        port = free_port()
        command = [*MODULE, "--port", str(port)]
        async with serving(command, work, port, XDG_CONFIG_HOME=str(xdg)) as proxy:
            async with aiohttp.ClientSession() as session:
                async with session.get(proxy.url + "/health/detailed") as resp:
                    detailed = await resp.json()
                async with session.post(proxy.url + "/v1/chat/completions", json=chat_body()):
                    pass
            assert await proxy.stop() == 0
        assert detailed["config"]["file"] == str(user_file)
        assert detailed["demo_mode"] is False
        assert f"config: {user_file}" in proxy.stderr
        assert "DEMO MODE" not in proxy.stderr
        assert upstream.calls == 1
        assert (xdg / "first-hop-proxy" / "logs").is_dir()
        assert not (work / "logs").exists()
    finally:
        await upstream.close()


def test_tune_gc_freezes_start_up_objects_and_collects_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_check_config_lists_the_upstreams_with_keys_masked(tmp_path: Path) -> None:
    write_config(
        tmp_path / "config.yaml",
        """
upstreams:
  - name: community
    url: https://a.example/v1/chat/completions?key=sk-query-secret-123456
    headers: {Authorization: "Bearer sk-community-0123456789abcdef"}
  - name: community
    url: https://b.example/v1/chat/completions
    headers: {x-api-key: "paid-key-0123456789abcdef"}
    models: ["gpt-*"]
    model_map: {opus: claude-3-opus}
""",
    )
    result = run(["check-config"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    for secret in ("sk-community-0123456789abcdef", "paid-key-0123456789abcdef", "sk-query"):
        assert secret not in out
    data = yaml.safe_load(result.stdout.split("\n", 1)[1])
    assert [u["name"] for u in data["upstreams"]] == ["community", "community"]
    assert data["upstreams"][0]["headers"]["Authorization"] == "Bearer ***cdef"
    assert data["upstreams"][0]["url"].endswith("?key=***")
    assert "upstreams[1].name: 'community' is also the name of upstreams[0]" in result.stderr
    assert "upstreams[1].model_map: 'opus' is mapped but not" in result.stderr
