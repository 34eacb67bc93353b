"""Hostile config files (alias bombs, recursive aliases, endless nesting) and an empty one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from first_hop_proxy.config import ConfigError, load_config

from .conftest import free_port
from .test_cli import MODULE, run, serving, write_config

BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""
RECURSIVE = "a: &a [*a, *a, *a]\n"
RECURSIVE_MAPPING = "server: &s\n  host: 127.0.0.1\n  again: *s\n"
DEEP = "a: " + "[" * 50_000 + "]" * 50_000 + "\n"
DEEP_BLOCKS = "".join(" " * i + f"k{i}:\n" for i in range(1500)) + " " * 1500 + "x: 1\n"

BOMBS = {
    "billion laughs": (BILLION_LAUGHS, "aliases nest too deep: expanded, the file would hold"),
    "recursive alias": (RECURSIVE, "line 1 contains an alias to itself (a recursive alias)"),
    "recursive mapping": (RECURSIVE_MAPPING, "contains an alias to itself"),
    "deep brackets": (DEEP, "the file nests too deep (more than 200 brackets open at once)"),
    "deep indentation": (DEEP_BLOCKS, "the file nests too deep (lists or mappings inside"),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", list(BOMBS))
def test_bomb_is_one_clear_problem_within_a_second(tmp_path: Path, name: str) -> None:
    text, expected = BOMBS[name]
    path = write_config(tmp_path / "config.yaml", text)
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert time.monotonic() - started < 1
    assert len(caught.value.problems) == 1
    assert expected in caught.value.problems[0]
    assert caught.value.source == str(path)


@pytest.mark.parametrize("name", ["billion laughs", "recursive alias"])
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_commands_refuse_a_bomb_at_once(tmp_path: Path, name: str, command: str) -> None:
    text, expected = BOMBS[name]
    write_config(tmp_path / "config.yaml", text)
    started = time.monotonic()
    result = run([command], tmp_path)  # a hang fails here (30 s), a traceback below
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "Config error in config.yaml:"
    assert lines[1].startswith("  aliases nest too deep: ") and expected in lines[1]


def test_ordinary_aliases_still_work(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "config.yaml",
        """\
codes: &codes [502, 503]
error_handling:
  retry_codes: *codes
  hard_stop_conditions:
    rules:
      - &rule {pattern: "blocked", user_message: "Blocked."}
      - <<: *rule
        pattern: "banned"
""",
    )
    loaded = load_config(path, env={})
    assert loaded.config.error_handling.retry_codes == [502, 503]
    rules = loaded.config.error_handling.hard_stop_conditions.rules
    assert [(r.pattern, r.user_message) for r in rules] == [
        ("blocked", "Blocked."),
        ("banned", "Blocked."),
    ]


def test_empty_file_says_so_and_runs_demo_mode(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.yaml", "# nothing here yet\n")
    result = run(["check-config"], tmp_path)
    assert result.returncode == 0
    assert f"# effective config from {path}" in result.stdout
    assert "warning: config.yaml is empty: built-in defaults apply" in result.stderr
    assert "no config file found" not in result.stderr + result.stdout
    assert load_config(tmp_path / "config.yaml", env={}).demo


async def test_serving_an_empty_file_names_it_in_the_demo_banner(tmp_path: Path) -> None:
    write_config(tmp_path / "config.yaml", "")
    port = free_port()
    async with serving([*MODULE, "--port", str(port)], tmp_path, port) as proxy:
        assert await proxy.stop() == 0
    assert "config.yaml is empty: built-in defaults apply" in proxy.stderr
    assert "DEMO MODE: the config file" in proxy.stderr and "config.yaml is empty" in proxy.stderr
    assert "no config file found" not in proxy.stderr
