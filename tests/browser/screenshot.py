"""The README's dashboard screenshots, taken in the browser the tests use.

    .venv/bin/python -m tests.browser.screenshot [folder]     (or: make screenshots)

Starts the fake upstream and the proxy on 127.0.0.1, plays a few requests (some
retried, one failed, one stream still running) and saves the dashboard in the light
and dark colour schemes and on a phone-sized screen, as PNG files in ``folder``
(default ``docs/``).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from .chromium import MISSING, chromium, chromium_available
from .scene import story

REPO = Path(__file__).resolve().parents[2]
SHOTS: dict[str, dict[str, Any]] = {
    "dashboard.png": {"viewport": {"width": 1280, "height": 860}, "color_scheme": "light"},
    "dashboard-dark.png": {"viewport": {"width": 1280, "height": 860}, "color_scheme": "dark"},
    "dashboard-phone.png": {
        "viewport": {"width": 390, "height": 844},
        "device_scale_factor": 2,
        "is_mobile": True,
        "has_touch": True,
        "color_scheme": "light",
    },
}


async def take(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="fhp-shot-") as tmp:
        async with story(Path(tmp)) as proxy:
            for name, options in SHOTS.items():
                async with chromium(**options) as context:
                    page = await context.new_page()
                    await page.goto(proxy.url + "/")
                    await page.wait_for_selector("#feed tbody tr.running")
                    await page.wait_for_selector(".upstream")
                    await page.wait_for_timeout(300)
                    path = folder / name
                    await page.screenshot(path=str(path))
                    written.append(path)
    return written


def main(argv: list[str]) -> int:
    if not chromium_available():
        print(MISSING, file=sys.stderr)
        return 1
    folder = Path(argv[0]) if argv else REPO / "docs"
    for path in asyncio.run(take(folder)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
