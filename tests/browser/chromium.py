"""Starting Debian's Chromium under Playwright: the one browser set-up of the tests and
the README screenshot.

Playwright drives the system browser (``executable_path``); it never downloads one of
its own. Each launch gets a fresh profile folder, and the switches keep Chromium from
talking to anything but the pages it is sent to.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from playwright.async_api import BrowserContext, async_playwright

CHROMIUM = os.environ.get("FHP_CHROMIUM", "/usr/bin/chromium")
#: Set (by .ci/run) to make a missing browser a test failure instead of a skip.
REQUIRE_ENV = "FHP_REQUIRE_BROWSER"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MISSING = (
    f"Chromium is missing ({CHROMIUM} not found), so the dashboard's browser tests "
    "cannot run: install it with 'apt-get install chromium' (Debian/Ubuntu)."
)


def chromium_available() -> bool:
    return os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)


@asynccontextmanager
async def chromium(**context_options: Any) -> AsyncIterator[BrowserContext]:
    """A headless Chromium with a fresh profile; ``context_options`` as Playwright takes
    them (``viewport``, ``color_scheme``...)."""
    profile = tempfile.mkdtemp(prefix="fhp-chromium-")
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=ARGS,
                **context_options,
            )
            try:
                yield context
            finally:
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
