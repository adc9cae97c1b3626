"""`/dashboard` in a real headless Chromium (Debian's) against real web and worker processes: sign in with
an API key, drop a photo, watch it complete without reloading, see the batch and its archive, send a test
event and retry a delivery to a real receiver, sign out. The key never appears in a URL, a page or a
cookie; a state-changing request without the session's CSRF token is refused. The screenshots the README
shows are taken here (docs/screenshots/).
"""

from __future__ import annotations

import base64
import io
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests import imagegen
from tests.browser import Browsing, browse, needs_chromium
from tests.conftest import Partner
from tests.receiver import Receiver
from tests.test_processes import Stack, create_account
from tests.test_processes import children as children  # the fixture `stack` needs
from tests.test_processes import stack as stack  # the fixture

pytestmark = needs_chromium

# The README's screenshots are refreshed by running this test with DARKROOM_TEST_SCREENSHOTS=1; other runs
# keep theirs in the test's own folder, leaving the checkout as it was.
README_SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
WEBHOOK_TIMEOUT = 30.0


@dataclass(frozen=True)
class Service:
    base_url: str
    partner: Partner
    receiver: Receiver

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.partner.headers, timeout=10)


@pytest.fixture
def service(stack: Stack) -> Iterator[Service]:
    partner = create_account(stack.env, "Lumen Studio")
    receiver = Receiver().start()
    try:
        with httpx.Client(base_url=stack.base_url, headers=partner.headers, timeout=10) as http:
            created = http.post(
                "/v1/webhook-endpoints",
                json={"url": receiver.url, "events": ["*"], "description": "our receiver"},
            )
        assert created.status_code == 201, created.text
        receiver.trust(created.json()["secret"])
        yield Service(stack.base_url, partner, receiver)
    finally:
        receiver.stop()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    return README_SCREENSHOTS if os.environ.get("DARKROOM_TEST_SCREENSHOTS") else tmp_path / "screenshots"


@pytest.fixture
def browsing(service: Service, tmp_path: Path) -> Iterator[Browsing]:
    with browse(service.base_url, tmp_path / "chromium-profile") as browsing:
        yield browsing


def open_tab(page: Page, service: Service, name: str, path: str) -> None:
    """Follow the navigation link, and wait for the page's scripts (htmx) to have set it up."""
    page.get_by_role("link", name=name).click()
    expect(page).to_have_url(f"{service.base_url}{path}")
    page.wait_for_load_state()


def sign_in(page: Page, service: Service) -> None:
    page.goto(f"{service.base_url}/dashboard")
    expect(page).to_have_url(f"{service.base_url}/dashboard/sign-in")
    page.get_by_label("API key").fill(service.partner.api_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{service.base_url}/dashboard")
    page.wait_for_load_state()


def drop_files(page: Page, selector: str, files: list[tuple[str, bytes, str]]) -> None:
    """Files (name, bytes, media type) dropped on `selector` as the user's drag-and-drop does: a `drop`
    event with a DataTransfer."""
    transfer = page.evaluate_handle(
        """(files) => {
            const transfer = new DataTransfer();
            for (const [name, encoded, type] of files) {
                const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name, { type }));
            }
            return transfer;
        }""",
        [[name, base64.b64encode(data).decode(), media_type] for name, data, media_type in files],
    )
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def downloaded_archive(page: Page, service: Service, batch_id: str) -> bytes:
    """The ZIP behind the batch's Download ZIP link, once its row shows it completed."""
    batch_row = page.locator(f"tr#{batch_id}")
    expect(batch_row.locator(".badge").first).to_have_text("completed")
    download = batch_row.get_by_role("link", name="Download ZIP")
    expect(download).to_be_visible()
    archive = page.request.get(service.base_url + (download.get_attribute("href") or ""))
    assert archive.status == 200 and archive.body()[:2] == b"PK"
    return archive.body()


def screenshot(page: Page, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def test_a_partner_signs_in_drops_a_photo_watches_it_complete_retries_a_delivery_and_signs_out(
    service: Service, browsing: Browsing, screenshots: Path
) -> None:
    page = browsing.page
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(f"{service.base_url}/dashboard/sign-in")
    screenshot(page, screenshots, "sign-in")
    sign_in(page, service)

    # Drop a photo, asking for 320 px WebP; the page is never reloaded: the marker stays.
    page.evaluate("window.stillTheSamePage = true")
    page.get_by_label("Resize to width").fill("320")
    page.get_by_label("Convert to").select_option("webp")
    drop_files(page, "#drop-zone", [("harbour.jpg", imagegen.jpeg(1200, 800), "image/jpeg")])
    expect(page.locator("#upload-status")).to_contain_text("1 uploaded")
    row = page.locator("#image-rows tr", has_text="harbour.jpg")
    expect(row.locator(".badge")).to_have_text("completed")
    assert page.evaluate("window.stillTheSamePage") is True
    thumbnail = row.locator("img")
    expect(thumbnail).to_be_visible()
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())
    with service.api() as http:
        (image,) = http.get("/v1/images").json()["data"]
    resize, convert = image["operations"]
    assert (resize["type"], resize["params"]["width"]) == ("resize", 320)
    assert (convert["type"], convert["params"]["format"]) == ("convert", "webp")
    assert image["output"]["format"] == "webp" and image["output"]["width"] == 320
    screenshot(page, screenshots, "images")

    # A batch with an archive, made through the API, shows its progress and its ZIP.
    with service.api() as http:
        batch = http.post("/v1/batches", json={"archive": True}).json()
        added = http.post(
            f"/v1/batches/{batch['id']}/images",
            files=[
                ("file", (f"{name}.jpg", imagegen.jpeg(640, 480), "image/jpeg"))
                for name in ("dunes", "pier", "lighthouse")
            ],
        )
        assert added.status_code == 202, added.text
        assert http.post(f"/v1/batches/{batch['id']}/seal").status_code == 200
    open_tab(page, service, "Batches", "/dashboard/batches")
    downloaded_archive(page, service, batch["id"])
    screenshot(page, screenshots, "batch")

    # The image's webhook reached the receiver; Send test and Retry send again, from the page.
    service.receiver.wait_for(1, WEBHOOK_TIMEOUT)
    open_tab(page, service, "Webhooks", "/dashboard/webhooks")
    page.get_by_role("button", name="Send test").click()
    expect(page.locator("#flash")).to_contain_text("A test event")
    test_row = page.locator("#delivery-rows tr", has_text="webhook.test")
    expect(test_row.locator(".badge").first).to_have_text("delivered")
    message_id = image["webhooks"][0]["id"]
    delivery_row = page.locator(f"tr#{message_id}")
    expect(delivery_row.locator(".attempts").first).to_have_text("1 attempt")
    delivery_row.get_by_role("button", name="Retry").click()
    expect(delivery_row.locator(".attempts").first).to_have_text("2 attempts")
    assert [each.id for each in service.receiver.deliveries].count(message_id) == 2
    delivery_row.locator("summary").first.click()
    expect(delivery_row.locator(".attempt-list li")).to_have_count(2)
    assert any(each.event["type"] == "webhook.test" for each in service.receiver.deliveries)
    screenshot(page, screenshots, "deliveries")

    # CSRF: the session's cookie alone does not change anything.
    refused = page.request.post(f"{service.base_url}/dashboard/deliveries/{message_id}/retry")
    assert refused.status == 403 and refused.json()["code"] == "csrf_failed"
    forged = page.request.post(
        f"{service.base_url}/dashboard/deliveries/{message_id}/retry",
        headers={"X-CSRF-Token": "not-the-token"},
    )
    assert forged.status == 403

    # The key went into the sign-in form only: no URL, page or cookie has it.
    assert not [url for url in browsing.requested if service.partner.api_key in url]
    assert service.partner.api_key not in page.content()
    cookies = page.context.cookies()
    assert not [cookie for cookie in cookies if service.partner.api_key in cookie["value"]]
    (session_cookie,) = [cookie for cookie in cookies if cookie["name"] == "dr_session"]
    assert session_cookie["httpOnly"] and session_cookie["sameSite"] == "Strict"

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{service.base_url}/dashboard/sign-in")
    page.goto(f"{service.base_url}/dashboard/webhooks")
    expect(page).to_have_url(f"{service.base_url}/dashboard/sign-in")
    signed_out = {"dr_session": session_cookie["value"]}
    with httpx.Client(base_url=service.base_url, cookies=signed_out, timeout=10) as http:
        stale = http.get("/dashboard/events?table=images")
    assert stale.status_code == 401

    assert browsing.elsewhere == []
    assert browsing.console_errors == []


def test_a_partner_adds_and_deletes_an_endpoint_and_fills_and_seals_a_batch_from_the_pages(
    service: Service, browsing: Browsing, screenshots: Path
) -> None:
    page = browsing.page
    page.set_viewport_size({"width": 1280, "height": 800})
    sign_in(page, service)

    # An endpoint for image.completed only; its secret is shown once, and signs what it is sent.
    other = Receiver().start()
    try:
        open_tab(page, service, "Webhooks", "/dashboard/webhooks")
        page.get_by_label("URL").fill(other.url)
        page.get_by_label("Description").fill("the archive's mirror")
        page.get_by_label("every event").uncheck()
        page.get_by_label("image.completed").check()
        page.get_by_role("button", name="Add endpoint").click()
        secret = page.get_by_label("Signing secret")
        expect(secret).to_be_visible()
        with service.api() as http:
            added = next(e for e in http.get("/v1/webhook-endpoints").json()["data"] if e["url"] == other.url)
            assert added["events"] == ["image.completed"] and added["description"] == "the archive's mirror"
            assert (
                secret.input_value()
                == http.get(f"/v1/webhook-endpoints/{added['id']}/secret").json()["secret"]
            )
        other.trust(secret.input_value())
        row = page.locator(f"tr#{added['id']}")
        row.get_by_role("button", name="Send test").click()
        expect(page.locator("#flash")).to_contain_text("A test event")
        other.wait_for(1, WEBHOOK_TIMEOUT)
        screenshot(page, screenshots, "endpoint-added")

        # A refusal is the API's, shown with the field it names.
        page.get_by_label("URL").fill("https://example.com/hooks")
        page.get_by_label("every event").uncheck()
        page.get_by_role("button", name="Add endpoint").click()
        expect(page.locator("#flash")).to_contain_text("events")

        page.once("dialog", lambda dialog: dialog.accept())
        row.get_by_role("button", name="Delete").click()
        expect(row).to_have_count(0)
        expect(page.get_by_label("Signing secret")).to_have_count(0)
        with service.api() as http:
            assert [e["url"] for e in http.get("/v1/webhook-endpoints").json()["data"]] == [
                service.receiver.url
            ]
    finally:
        other.stop()

    # A batch of 200 px photos with a JPEG archive, filled from its drop zone, sealed, then its ZIP.
    open_tab(page, service, "Batches", "/dashboard/batches")
    page.get_by_label("Resize to width").fill("200")
    page.get_by_label("ZIP of the results").select_option("jpeg")
    page.get_by_role("button", name="Create batch").click()
    expect(page.locator("#batch-drop-zone")).to_be_visible()
    photos = [(f"{name}.jpg", imagegen.jpeg(640, 480), "image/jpeg") for name in ("dunes", "pier")]
    drop_files(page, "#batch-drop-zone", photos)
    expect(page.locator("#batch-upload-status")).to_contain_text("2 uploaded")
    page.get_by_role("button", name="Seal the batch").click()
    expect(page.get_by_role("status").filter(has_text="is sealed with 2 images")).to_be_visible()
    with service.api() as http:
        (batch,) = http.get("/v1/batches").json()["data"]
    assert batch["archive"] is not None and batch["operations"][0]["params"]["width"] == 200
    with zipfile.ZipFile(io.BytesIO(downloaded_archive(page, service, batch["id"]))) as zipped:
        assert {"dunes.jpg", "pier.jpg"} <= set(zipped.namelist())

    assert browsing.elsewhere == []
    # Only the refusal asked for above: the browser's line for the 422, and htmx's.
    assert len(browsing.console_errors) == 2, browsing.console_errors
    assert all("422" in line or "Unprocessable" in line for line in browsing.console_errors), (
        browsing.console_errors
    )
