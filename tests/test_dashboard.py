"""The dashboard in a real headless Chromium (Debian's, driven by Playwright)."""

import os
import shutil
from pathlib import Path

import pytest

from kloudmeter_py.worker import Worker
from tests.helpers import Http, create_meter, post_event

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed here")
    return CHROMIUM


async def test_dashboard_shows_meters_and_live_readings(
    http: Http, worker: Worker, chromium: str, tmp_path: Path
) -> None:
    """The page loads, lists a meter created through the API, and a reading changes on the
    page after an event is posted, without a reload."""
    from playwright.async_api import async_playwright

    await create_meter(http, id="api-calls", eventType="req", aggregation="count")
    base = str(http.make_url("/"))
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(base)
            await page.wait_for_selector('#meters tr[data-meter="api-calls"]', timeout=15_000)
            await page.wait_for_selector("#status.live", timeout=15_000)
            await post_event(http, id="e1", eventType="req", subject="acme")
            cell = '#readings tr[data-key="api-calls.acme"] td.value'
            await page.wait_for_function(
                f"document.querySelector('{cell}')?.textContent === '1'", timeout=15_000
            )
            await post_event(http, id="e2", eventType="req", subject="acme")
            await page.wait_for_function(
                f"document.querySelector('{cell}')?.textContent === '2'", timeout=15_000
            )
            assert await page.text_content("#meter-count") == "1"
            # The windows chart (redrawn every few seconds) shows the subject's hour window.
            await page.wait_for_selector("#chart rect.bar", state="attached", timeout=15_000)
            assert "acme" in (await page.text_content("#legend") or "")
            await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            assert errors == []
        finally:
            await browser.close()
