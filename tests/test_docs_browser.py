"""`/docs` in a real headless Chromium (Debian's) against a real `uvicorn server.app:app`: the page renders
every operation from assets Darkroom serves itself, under its own strict Content-Security-Policy, and
"Try it out" works with the API key given to Authorize. The browser may reach the test server only:
every other request is aborted and counted, and none may be attempted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import expect

from server.embedded_redis import EmbeddedRedis
from tests import imagegen
from tests.browser import Browsing, browse, needs_chromium
from tests.conftest import Partner
from tests.test_processes import Children, create_account, free_port, procfile_command, service_env
from tests.test_processes import wait_until_ready as wait_for_readyz

pytestmark = needs_chromium


@dataclass(frozen=True)
class LiveWeb:
    base_url: str
    partner: Partner


@pytest.fixture
def live_web(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[LiveWeb]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = service_env(tmp_path / "data", port, redis_server.url)
    children = Children()
    try:
        web = children.start("web", procfile_command("web", port), env)
        wait_for_readyz(base_url, [web])
        yield LiveWeb(base_url, create_account(env, "docs-reader"))
    finally:
        children.stop_all()


@pytest.fixture
def browsing(live_web: LiveWeb, tmp_path: Path) -> Iterator[Browsing]:
    with browse(live_web.base_url, tmp_path / "chromium-profile") as browsing:
        yield browsing


def test_docs_render_offline_and_try_it_out_lists_images_with_the_api_key(
    live_web: LiveWeb, browsing: Browsing
) -> None:
    with httpx.Client(base_url=live_web.base_url, headers=live_web.partner.headers, timeout=10) as http:
        uploaded = http.post("/v1/images", files={"file": ("dot.png", imagegen.png(4, 4), "image/png")})
    assert uploaded.status_code == 202, uploaded.text
    page = browsing.page

    page.goto(f"{live_web.base_url}/docs")
    list_images = page.locator(".opblock-get", has=page.locator('[data-path="/v1/images"]'))
    expect(list_images).to_be_visible()
    assert page.locator(".opblock").count() > 20

    page.get_by_role("button", name="Authorize").first.click()
    bearer = page.locator(".auth-container", has_text="bearer")
    bearer.locator("input").fill(live_web.partner.api_key)
    bearer.get_by_role("button", name="Apply credentials").click()
    expect(bearer.get_by_role("heading", name="Authorized")).to_be_visible()
    bearer.get_by_role("button", name="Close").click()

    list_images.locator(".opblock-summary").click()
    list_images.get_by_role("button", name="Try it out").click()
    with page.expect_response(lambda response: urlsplit(response.url).path == "/v1/images") as answered:
        list_images.get_by_role("button", name="Execute").click()
    response = answered.value
    assert response.request.headers["authorization"] == f"Bearer {live_web.partner.api_key}"
    assert response.status == 200
    expect(list_images.locator(".live-responses-table tr.response .response-col_status")).to_have_text("200")
    expect(list_images.locator(".live-responses-table")).to_contain_text(uploaded.json()["id"])

    assert browsing.elsewhere == []
    assert browsing.console_errors == []
