"""Installed as a person installs it: the wheel, built from this tree, in a fresh venv,
run from an empty folder with an empty home.

The wheel is built and installed once per test session (about 10 s; the
dependencies come from pip's cache or the package index).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import tomllib
import venv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from first_hop_proxy import __version__

from .conftest import REPO, chat_body, free_port
from .fake_upstream import FakeUpstream

pytestmark = pytest.mark.timeout(600)
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "src")


@dataclass(frozen=True)
class Installed:
    """A fresh venv holding only the wheel and its dependencies."""

    wheel: Path
    bin: Path

    @property
    def python(self) -> Path:
        return self.bin / ("python.exe" if os.name == "nt" else "python")

    @property
    def command(self) -> Path:
        return self.bin / ("first-hop-proxy.exe" if os.name == "nt" else "first-hop-proxy")


def pip(*args: str | Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--quiet", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    # Built from a copy: a build writes build/ and *.egg-info into its source tree.
    tree = root / "tree"
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(source, tree / name, ignore=ignore)
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy2(source, tree / name)
    pip("wheel", "--no-deps", "--wheel-dir", root / "dist", tree)
    (wheel,) = (root / "dist").glob("first_hop_proxy-*.whl")
    env = root / "venv"
    venv.create(env, with_pip=False)  # this interpreter's pip installs into it
    bin_dir = env / ("Scripts" if os.name == "nt" else "bin")
    pip("--python", bin_dir / "python", "install", wheel)
    return Installed(wheel, bin_dir)


@pytest.fixture
def person(tmp_path: Path) -> dict[str, str]:
    """A new user's environment: an empty home, no project on the path, no FHP_* settings."""
    home = tmp_path / "home"
    home.mkdir()
    keep = ("PATH", "LANG", "LC_ALL", "SYSTEMROOT", "TMPDIR", "TEMP", "TMP")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        HOME=str(home),
        USERPROFILE=str(home),
        APPDATA=str(home / "AppData" / "Roaming"),
        XDG_CONFIG_HOME=str(home / ".config"),
        PYTHONUNBUFFERED="1",
    )
    return env


def run(
    installed: Installed, args: Sequence[str], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(installed.command), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version_and_license_are_written_once() -> None:
    """The version lives in ``__init__.py`` only; the license file is the MIT one declared."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("first-hop-proxy") == __version__
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    license_text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in license_text


def test_wheel_ships_license_version_and_starter_config(installed: Installed) -> None:
    names = subprocess.run(
        [sys.executable, "-m", "zipfile", "--list", str(installed.wheel)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "first_hop_proxy/config.yaml.example" in names
    probe = (
        "import importlib.metadata as m, importlib.resources as r, first_hop_proxy as p; "
        "d = m.distribution('first-hop-proxy'); "
        "print(d.version); print(p.__version__); print(d.metadata['License-Expression']); "
        "print(d.metadata['License-File']); "
        "print(d.read_text('licenses/LICENSE') == open(r'{license}', encoding='utf-8').read()); "
        "print(r.files(p).joinpath('config.yaml.example').read_text(encoding='utf-8') "
        "== open(r'{example}', encoding='utf-8').read())"
    ).format(license=REPO / "LICENSE", example=REPO / "config.yaml.example")
    out = subprocess.run(
        [str(installed.python), "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=installed.bin,
    ).stdout.split()
    version = out[0]
    assert out[1:] == [version, "MIT", "LICENSE", "True", "True"]
    result = subprocess.run(
        [str(installed.command), "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == f"first-hop-proxy {version}"


async def test_init_check_config_and_serve_from_an_empty_folder(
    installed: Installed, person: dict[str, str], tmp_path: Path, upstream: FakeUpstream
) -> None:
    here = tmp_path / "anywhere"
    here.mkdir()
    user_file = Path(person["XDG_CONFIG_HOME"]) / "first-hop-proxy" / "config.yaml"

    result = run(installed, ["check-config"], here, person)
    assert result.returncode == 0, result.stderr
    assert "DEMO MODE: no config file found" in result.stderr
    assert f"{here / 'config.yaml'}, {user_file}." in result.stderr
    assert "first-hop-proxy init" in result.stderr

    result = run(installed, ["init"], here, person)
    assert result.returncode == 0, result.stderr
    assert f"Wrote the starter config to {user_file}" in result.stdout
    text = user_file.read_text(encoding="utf-8")
    assert text == (REPO / "config.yaml.example").read_text(encoding="utf-8")
    assert run(installed, ["init"], here, person).returncode == 1
    assert list(here.iterdir()) == []

    # The person sets target_proxy.url, as the starter config says.
    placeholder = '"https://your-proxy.example.com/v1/chat/completions"'
    assert placeholder in text
    user_file.write_text(text.replace(placeholder, f'"{upstream.chat_url}"'), encoding="utf-8")
    result = run(installed, ["check-config"], here, person)
    assert result.returncode == 0, result.stderr
    assert f"# effective config from {user_file}" in result.stdout
    assert upstream.chat_url in result.stdout

    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(installed.command),
        "--port",
        str(port),
        cwd=here,
        env=person,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                try:
                    async with session.get(url + "/health/detailed") as resp:
                        detailed = await resp.json()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the installed proxy did not start")
            async with session.post(url + "/v1/chat/completions", json=chat_body()) as resp:
                assert resp.status == 200
                reply = await resp.json()
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    stderr = err.decode()
    assert process.returncode == 0, stderr
    assert reply["choices"][0]["message"]["content"] == "Hello there!"
    assert detailed["config"]["file"] == str(user_file)
    assert detailed["demo_mode"] is False
    assert f"config: {user_file}" in stderr
    assert f"listening on {url}" in stderr
    assert (user_file.parent / "logs").is_dir()  # relative folders: beside the config file
    assert list(here.iterdir()) == []
