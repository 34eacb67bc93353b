"""Everything a proxy let out (bodies, log files, log views, console), gathered to look for keys."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from first_hop_proxy.server import RunningServer

from .keys import windows
from .log_helpers import settle


class Outputs:
    """Everything the proxy let out, by where it went."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def add(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.texts[where] = self.texts.get(where, "") + text + "\n"

    def leaks(self, secrets: dict[str, str]) -> dict[str, str]:
        """Where a 12-character piece of a named secret shows up: ``{"name in where": piece}``."""
        found = {}
        for name, secret in secrets.items():
            pieces = windows(secret)
            for where, text in self.texts.items():
                hits = sorted(p for p in pieces if p in text)
                if hits:
                    found[f"{name} in {where}"] = hits[0]
        return found

    async def gather(
        self,
        running: list[RunningServer],
        folder: Path,
        caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Add the log views of each proxy, every file under ``folder`` and the console."""
        for proxy in running:
            await settle(proxy)
            async with aiohttp.ClientSession() as session:
                for path in ("/health/detailed", "/logs/errors?limit=1000", "/logs/requests"):
                    async with session.get(proxy.url + path) as resp:
                        self.add(path, await resp.read())
                async with session.get(proxy.url + "/logs/errors?limit=1000") as resp:
                    listing = await resp.json()
                for item in listing["files"]:
                    async with session.get(f"{proxy.url}/logs/errors/{item['name']}") as resp:
                        assert resp.status == 200
                        self.add("GET /logs/errors/{name}", await resp.read())
                async with session.get(proxy.url + "/logs/requests") as resp:
                    entries = (await resp.json())["requests"]
                for entry in entries:
                    async with session.get(f"{proxy.url}/logs/requests/{entry['id']}") as resp:
                        assert resp.status == 200
                        self.add("GET /logs/requests/{id}", await resp.read())
        for path in folder.rglob("*"):
            if path.is_file():
                self.add(f"file {path.relative_to(folder)}", path.read_bytes())
        for record in caplog.records:
            self.add("console (logging)", record.getMessage())
            if record.exc_text:
                self.add("console (logging)", record.exc_text)
        captured = capsys.readouterr()
        self.add("stdout", captured.out)
        self.add("stderr", captured.err)
        self.add("caplog text", caplog.text)
