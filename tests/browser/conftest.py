"""The dashboard in a real headless Chromium (Debian's), driven by Playwright.

Every page a test opens is watched: a console error, an uncaught exception or a
request to any host but the proxy fails the test. Without Chromium these tests are
skipped with a message saying so, unless FHP_REQUIRE_BROWSER is set (as CI does):
then a missing browser is a failure.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.async_api import ConsoleMessage, Page, Route

from first_hop_proxy.server import RunningServer

from .chromium import MISSING, REQUIRE_ENV, chromium, chromium_available


@dataclass
class Watch:
    """What a page did that it should not have."""

    origin: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)
    allowed_console: tuple[str, ...] = ()

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not any(a in message.text for a in self.allowed_console):
            self.console_errors.append(message.text)

    def check(self) -> None:
        assert not self.foreign, f"requests to other hosts: {self.foreign}"
        assert not self.page_errors, f"uncaught errors: {self.page_errors}"
        assert not self.console_errors, f"console errors: {self.console_errors}"


OpenPage = Callable[..., Awaitable[tuple[Page, Watch]]]


@pytest.fixture
def need_chromium() -> None:
    if not chromium_available():
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{MISSING} ({REQUIRE_ENV} is set: a missing browser is a failure)")
        pytest.skip("skipped: " + MISSING)


@pytest.fixture
async def open_page(need_chromium: None) -> AsyncIterator[OpenPage]:
    """``await open_page(proxy, **context options)``: the dashboard in a fresh browser."""
    watches: list[Watch] = []
    contexts: list[Any] = []

    async def _open(
        proxy: RunningServer, path: str = "/", allowed_console: tuple[str, ...] = (), **options: Any
    ) -> tuple[Page, Watch]:
        manager = chromium(**options)
        context = await manager.__aenter__()
        contexts.append(manager)
        watch = Watch(proxy.url, allowed_console=allowed_console)
        watches.append(watch)

        async def route(route: Route) -> None:
            url = route.request.url
            watch.requested.append(url)
            if url == watch.origin or url.startswith(watch.origin + "/"):
                await route.continue_()
            else:
                watch.foreign.append(url)
                await route.abort()

        await context.route("**/*", route)
        page = await context.new_page()
        page.on("console", watch.on_console)
        page.on("pageerror", lambda exc: watch.page_errors.append(str(exc)))
        await page.goto(proxy.url + path)
        return page, watch

    yield _open
    for manager in reversed(contexts):
        await manager.__aexit__(None, None, None)
    for watch in watches:
        watch.check()
