"""Debian's chromium, headless, driven by Playwright, for tests of the pages the web process serves.

The browser may reach the test server only: every other request is aborted and counted, and a test
asserts none was attempted. Console errors (a Content-Security-Policy refusal is one) are collected too.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import ConsoleMessage, Page, Request, Route, expect, sync_playwright

CHROMIUM = shutil.which("chromium")
# Quiet: no updates, syncing or other background traffic of the browser's own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 30_000

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)",
)


@dataclass
class Browsing:
    page: Page
    # Requests for anywhere but the test server, aborted; console errors (a CSP refusal is one).
    elsewhere: list[str]
    console_errors: list[str]
    # Every URL the page asked for, in order.
    requested: list[str]


@contextmanager
def browse(base_url: str, profile: Path, *, also: Sequence[str] = ()) -> Iterator[Browsing]:
    """A fresh browser profile with one page, allowed to reach `base_url` only (and the sites `also`
    names by their base URL: a partner's page, say)."""
    reachable = {urlsplit(url).netloc for url in (base_url, *also)}
    elsewhere: list[str] = []
    console_errors: list[str] = []
    requested: list[str] = []

    def only_the_server(route: Route) -> None:
        if urlsplit(route.request.url).netloc in reachable:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    def note_error(message: ConsoleMessage) -> None:
        if message.type == "error":
            console_errors.append(message.text)

    def note_request(request: Request) -> None:
        requested.append(request.url)

    with sync_playwright() as playwright:
        assert CHROMIUM is not None
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            context.set_default_timeout(UI_TIMEOUT_MS)
            # expect()'s own default is 5 s: short for a page waiting on a worker on a loaded machine.
            expect.set_options(timeout=UI_TIMEOUT_MS)
            context.route("**/*", only_the_server)
            page = context.new_page()
            page.on("console", note_error)
            page.on("request", note_request)
            yield Browsing(page, elsewhere, console_errors, requested)
        finally:
            context.close()
