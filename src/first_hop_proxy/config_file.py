"""Where the config file is: the lookup order, the user's config folder, the starter file.

The proxy is installed as a command and started from any folder, so the config
is looked for in a fixed order (the first that is given or exists wins):
``--config``, ``$FHP_CONFIG``, ``./config.yaml``, then the user's config file
(``$XDG_CONFIG_HOME/first-hop-proxy/config.yaml`` on Linux, the usual places on
macOS and Windows). ``first-hop-proxy init`` writes the commented starter config,
which ships inside the package.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

APP_NAME = "first-hop-proxy"
FILE_NAME = "config.yaml"
STARTER_RESOURCE = "config.yaml.example"
INIT_COMMAND = "first-hop-proxy init"


def user_config_file() -> Path:
    """The user's own config file, wherever this platform keeps such files."""
    from platformdirs import user_config_path  # imported when asked: a serving proxy never is

    return user_config_path(APP_NAME, appauthor=False, roaming=True) / FILE_NAME


def shown(path: Path) -> str:
    """``path`` as a person should see it: absolute, so it can be found from anywhere."""
    return os.path.abspath(path)


@dataclass(frozen=True)
class Lookup:
    """The config file to use (``path``), whether the person named it, and where else
    was looked when none was found."""

    path: Path | None
    explicit: bool = False
    searched: tuple[Path, ...] = ()


def find_config(path: Path | None, env: Mapping[str, str] | None = None) -> Lookup:
    """The first of ``--config``, ``$FHP_CONFIG``, ``./config.yaml`` and the user file.

    A file named by ``--config`` or ``$FHP_CONFIG`` is returned whether or not it
    exists (the loader then says it is missing); the two implicit places count
    only when they hold a file.
    """
    env = os.environ if env is None else env
    if path is not None:
        return Lookup(path, explicit=True)
    if env.get("FHP_CONFIG"):
        return Lookup(Path(env["FHP_CONFIG"]), explicit=True)
    searched = (Path(FILE_NAME), user_config_file())
    for candidate in searched:
        if candidate.is_file():
            return Lookup(candidate)
    return Lookup(None, searched=searched)


def starter_config() -> str:
    """The commented starter config (the same text as the repository's config.yaml.example)."""
    from importlib.resources import files

    return files("first_hop_proxy").joinpath(STARTER_RESOURCE).read_text(encoding="utf-8")


def write_starter_config(path: Path) -> Path:
    """Write the starter config to ``path`` (its folders created); never overwrite a file.

    Raises ``FileExistsError`` when ``path`` exists, ``OSError`` when it cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a folder should be: not "the config exists"
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(path.parent)) from None
    with open(path, "x", encoding="utf-8", newline="") as f:
        f.write(starter_config())
    return path
