"""The dashboard as a person sees it, in headless Chromium against the real proxy.

Every test also checks (in conftest's ``open_page``) that the page logged no console
error, threw nothing, and requested nothing from any host but the proxy.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Page, Response, expect

from first_hop_proxy.logs.request_log import RequestRecord
from first_hop_proxy.redact import Redactor
from first_hop_proxy.server import RunningServer

from ..conftest import StartProxy
from ..fake_upstream import FakeUpstream, Json, Sse, text_chunks
from ..log_helpers import settle, state_of
from .chromium import MISSING, REQUIRE_ENV, chromium_available
from .conftest import OpenPage
from .scene import chat, story

if not chromium_available() and not os.environ.get(REQUIRE_ENV):
    pytest.skip("skipped: " + MISSING, allow_module_level=True)  # one line in the summary

TOKEN = "admin-token-0123456789abcdef"


async def live(page: Page) -> None:
    await expect(page.locator("#conn")).to_have_text("live", timeout=5000)


async def test_a_request_shows_in_the_live_feed_within_a_second(
    proxy: RunningServer,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    open_page: OpenPage,
) -> None:
    page, _ = await open_page(proxy)
    await live(page)
    await expect(page.locator("#feed-empty")).to_be_visible()
    upstream.queue(Sse(text_chunks("Hel", "lo"), gap=0.6))
    began = time.monotonic()
    request = asyncio.ensure_future(chat(client, proxy, stream=True))
    row = page.locator("#feed tbody tr").first
    await expect(row).to_have_attribute("data-status", "running", timeout=1000)
    assert time.monotonic() - began < 1.0
    await expect(row.locator(".badge")).to_have_text("running")
    status, request_id = await request
    assert status == 200
    await expect(row).to_have_attribute("data-status", "200", timeout=2000)
    await expect(row).to_have_attribute("data-id", request_id)
    await expect(row).not_to_have_class("failed")
    await expect(page.locator("#counters")).to_contain_text("requests1", timeout=3000)


async def test_a_failed_request_stands_out_and_tells_its_story(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    open_page: OpenPage,
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 2}})
    page, _ = await open_page(proxy)
    await live(page)
    await chat(client, proxy)  # one good request to compare with
    overloaded = Json(503, body={"error": {"message": "The model is overloaded"}})
    upstream.queue(overloaded, overloaded, Json(500, body={"error": {"message": "broken"}}))
    status, request_id = await chat(client, proxy)
    assert status == 500
    failed = page.locator(f'#feed tr[data-id="{request_id}"]')
    await expect(failed).to_have_class("failed", timeout=2000)
    await expect(failed.locator(".badge")).to_have_text("500")
    await expect(failed).to_contain_text("503 ×2")
    good = page.locator("#feed tbody tr").nth(1)
    colours = await page.evaluate(
        "([a, b]) => [a, b].map((r) => getComputedStyle(r).backgroundColor)",
        [await failed.element_handle(), await good.element_handle()],
    )
    assert colours[0] != colours[1], "a failed row looks like a good one"

    await failed.click()
    panel = page.locator("#detail")
    await expect(panel).to_be_visible()
    await expect(page.locator("#detail-title")).to_have_text(f"Request {request_id}")
    steps = page.locator("#request-story ol.timeline li")
    await expect(steps).to_have_count(3)
    await expect(page.locator("#request-story h3").first).to_have_text("Attempts")
    await expect(steps.nth(0)).to_contain_text("#1 · 503 · retry")
    await expect(steps.nth(0)).to_contain_text("The model is overloaded")
    await expect(steps.nth(0)).to_contain_text("waited")
    await expect(steps.nth(1)).to_contain_text("#2 · 503 · retry")
    await expect(steps.nth(2)).to_contain_text("#3 · 500 · fail")
    await expect(steps.nth(2)).to_contain_text("broken")
    await expect(page.locator("#request-story")).to_contain_text("Request headers")
    await page.get_by_role("button", name="Show the raw log file").click()
    await expect(page.locator("pre.raw")).to_contain_text(f"Request ID: {request_id}")
    await page.keyboard.press("Escape")
    await expect(panel).to_be_hidden()


async def test_the_upstream_panel_shows_an_open_breaker(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    open_page: OpenPage,
) -> None:
    proxy = await start_proxy(
        {"circuit_breaker": {"failure_threshold": 2}, "error_handling": {"max_retries": 1}}
    )
    page, _ = await open_page(proxy)
    await live(page)
    panel = page.locator('.upstream[data-upstream="default"]')
    await expect(panel).to_have_attribute("data-breaker", "closed")
    upstream.queue(Json(503), Json(503))
    status, _ = await chat(client, proxy)
    assert status == 503
    await expect(panel).to_have_attribute("data-breaker", "open", timeout=3000)
    await expect(panel.locator(".badge")).to_have_text("circuit open")
    await expect(panel).to_contain_text("2 failures in a row")
    status, _ = await chat(client, proxy)  # refused at once by the open breaker
    assert status == 503


async def test_the_error_view_filters(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    open_page: OpenPage,
) -> None:
    proxy = await start_proxy({"error_handling": {"max_retries": 0}})
    upstream.queue(Json(503, body={"error": {"message": "overloaded"}}))
    await chat(client, proxy)
    async with client.post(proxy.url + "/v1/chat/completions", data=b"{oops") as resp:
        assert resp.status == 400
    await settle(proxy)
    page, _ = await open_page(proxy, "/#errors")
    rows = page.locator("#errors tbody tr")
    await expect(rows).to_have_count(2)

    async def choose(name: str, value: str, query: str) -> None:
        """Pick a filter value and wait for the list asked with it."""

        def asked_with_it(response: Response) -> bool:
            return "/dashboard/api/errors?" in response.url and query in response.url

        async with page.expect_response(asked_with_it):
            await page.select_option(f"#error-filters select[name={name}]", value)

    await choose("code", "bad_request", "code=bad_request")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-code", "bad_request")
    await choose("code", "503", "code=503")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("overloaded")
    await expect(rows.first).to_have_attribute("data-code", "503")
    await choose("since", "900", "since=")
    await expect(rows).to_have_count(1)
    await choose("code", "", "since=")
    await expect(rows).to_have_count(2)
    # The bad request never reached an upstream: only the 503 is the upstream's.
    await choose("upstream", "default", "upstream=default")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-code", "503")
    await rows.first.click()
    await expect(page.locator("#detail pre.raw")).to_contain_text("ERROR DETAILS")


async def test_every_view_stays_on_the_proxy_and_logs_no_error(
    tmp_path: Path, open_page: OpenPage
) -> None:
    """The whole page, every tab and the detail view: conftest checks hosts and console."""
    async with story(tmp_path) as proxy:
        page, watch = await open_page(proxy)
        await live(page)
        await expect(page.locator("#feed tbody tr")).to_have_count(8)
        await page.locator("#feed tbody tr.failed").first.click()
        await expect(page.locator("#request-story ol.timeline li")).to_have_count(1)
        await page.get_by_role("button", name="Close").click()
        for tab in ("Errors", "Config", "Live"):
            await page.get_by_role("button", name=tab, exact=True).click()
        await expect(page.locator("#config-text")).to_contain_text("target_proxy")
        await page.locator("#errors tbody tr").count()
        await page.reload()
        await live(page)
        assert watch.requested and all(url.startswith(proxy.url) for url in watch.requested)
        await page.close()  # before the proxy stops: a page left open would try to reconnect


async def test_the_page_asks_for_the_token_once_per_tab(
    start_proxy: StartProxy, client: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    proxy = await start_proxy({"server": {"admin_token": TOKEN}})
    # The refusals the page meets before it has the token show as failed loads.
    page, _ = await open_page(proxy, allowed_console=("401",))
    login = page.locator("#login")
    await expect(login).to_be_visible()
    await expect(page.locator("#conn")).to_have_text("token needed")
    await page.fill("#login-token", "not-the-right-token-123")
    await page.click("#login-form button")
    await expect(page.locator("#login-error")).to_be_visible()
    await page.fill("#login-token", TOKEN)
    await page.click("#login-form button")
    await live(page)
    await expect(login).to_be_hidden()
    await chat(client, proxy)
    await expect(page.locator("#feed tbody tr")).to_have_count(1)
    await page.reload()
    await live(page)  # kept in sessionStorage: not asked again
    await expect(login).to_be_hidden()


async def test_the_feed_keeps_a_bounded_number_of_rows(
    proxy: RunningServer, open_page: OpenPage
) -> None:
    page, _ = await open_page(proxy)
    await live(page)
    hub = state_of(proxy).hub
    for i in range(260):
        record = RequestRecord(f"bulk{i}", "/v1/chat/completions", model="m")
        hub.started(record, Redactor)
        record.finish(200)
        hub.finished(record, "default", 10, Redactor)
    await expect(page.locator("#feed tbody tr").first).to_have_attribute("data-id", "bulk259")
    await expect(page.locator("#feed tbody tr")).to_have_count(200)


async def test_a_phone_sized_screen_in_the_dark(
    proxy: RunningServer, client: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    page, _ = await open_page(
        proxy,
        viewport={"width": 390, "height": 844},
        is_mobile=True,
        has_touch=True,
        color_scheme="dark",
    )
    await live(page)
    await chat(client, proxy)
    row = page.locator("#feed tbody tr").first
    await expect(row).to_have_attribute("data-status", "200")
    await expect(row.locator(".badge")).to_be_visible()
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, "the page scrolls sideways on a phone"
    background, text = await page.evaluate(
        "[getComputedStyle(document.body).backgroundColor, getComputedStyle(document.body).color]"
    )
    assert luminance(background) < 0.1 < 0.6 < luminance(text)


def luminance(css: str) -> float:
    """Relative luminance of an ``rgb(r, g, b)`` colour."""
    r, g, b = (int(x) / 255 for x in css[css.index("(") + 1 : css.index(")")].split(",")[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b
