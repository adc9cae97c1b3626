"""`POST /v1/images` with a JSON `source_url`: a real arq worker fetches the photo from a real HTTP server
on 127.0.0.1, and every way a source can fail ends the image with its own code, in the resource and in
its signed webhook."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.worker import Worker

from jobs import fetch, processing
from jobs.settings import Settings
from server import destinations
from tests import imagegen
from tests.conftest import Partner, api_client, run_burst, with_settings, worker_deps
from tests.receiver import Receiver
from tests.sources import Reply, SourceServer
from tests.test_addresses import fake_resolver
from tests.test_processes import free_port
from tests.test_upload_validation import assert_problem
from webhooks import addresses, transport
from webhooks.addresses import IPAddress

PHOTO = imagegen.jpeg(64, 48)
UPLOAD_CAP = 200_000


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return with_settings(settings, source_timeout=3.0, max_upload_bytes=UPLOAD_CAP)


@pytest.fixture
def source() -> Iterator[SourceServer]:
    server = SourceServer().start()
    yield server
    server.stop()


async def submit(client: httpx.AsyncClient, account: Partner, source_url: str, **fields: Any) -> Any:
    response = await client.post(
        "/v1/images", headers=account.headers, json={"source_url": source_url, **fields}
    )
    assert response.status_code == 202, response.text
    return response.json()


async def finished(client: httpx.AsyncClient, account: Partner, settings: Settings, image_id: str) -> Any:
    await run_burst(settings)
    response = await client.get(f"/v1/images/{image_id}", headers=account.headers)
    return response.json()


async def test_a_photo_by_url_is_fetched_processed_and_announced(
    client: httpx.AsyncClient, account: Partner, settings: Settings, source: SourceServer, receiver: Receiver
) -> None:
    url = source.serve("/listing/front%20door.jpg", Reply(body=PHOTO, headers={"Content-Type": "image/jpeg"}))
    accepted = await submit(
        client,
        account,
        url,
        operations=[{"type": "resize", "params": {"width": 32}}],
        callback_url=receiver.url,
        metadata={"listing_id": "L-1"},
    )
    assert accepted["status"] == "queued"
    assert accepted["input"] is None
    assert accepted["source"] == {"url": url}

    image = await finished(client, account, settings, accepted["id"])

    assert image["status"] == "completed", image["error"]
    assert image["input"]["format"] == "jpeg"
    assert (image["input"]["width"], image["input"]["height"]) == (64, 48)
    assert image["input"]["bytes"] == len(PHOTO)
    assert image["input"]["filename"] == "front door.jpg"
    assert image["output"]["width"] == 32
    original = await client.get(f"/v1/images/{image['id']}/original", headers=account.headers)
    assert original.content == PHOTO
    (delivery,) = await receiver.arrivals(1)
    assert delivery.verified
    assert delivery.event["type"] == "image.completed"
    assert delivery.event["data"]["source"] == {"url": url}
    assert delivery.event["data"]["input"]["format"] == "jpeg"
    (_, headers) = source.requests[0]
    assert headers["host"] == f"127.0.0.1:{source.port}"
    assert headers["accept-encoding"] == "identity"


async def test_a_source_compressed_anyway_is_inflated(
    client: httpx.AsyncClient, account: Partner, settings: Settings, source: SourceServer
) -> None:
    url = source.serve("/gz.jpg", Reply(body=gzip.compress(PHOTO), headers={"Content-Encoding": "gzip"}))
    image = await finished(client, account, settings, (await submit(client, account, url))["id"])
    assert image["status"] == "completed", image["error"]
    assert image["input"]["bytes"] == len(PHOTO)


async def test_five_redirects_are_followed(
    client: httpx.AsyncClient, account: Partner, settings: Settings, source: SourceServer
) -> None:
    url = _redirect_chain(source, 5)
    image = await finished(client, account, settings, (await submit(client, account, url))["id"])
    assert image["status"] == "completed", image["error"]
    assert source.hits("/photo.jpg") == 1


async def test_a_server_error_then_the_photo_is_retried_within_the_job(
    client: httpx.AsyncClient, account: Partner, settings: Settings, source: SourceServer
) -> None:
    url = source.serve(
        "/flaky.jpg", Reply(500, b"oops"), Reply(429, headers={"Retry-After": "1"}), Reply(body=PHOTO)
    )
    image = await finished(client, account, settings, (await submit(client, account, url))["id"])
    assert image["status"] == "completed", image["error"]
    assert image["attempts"] == 1
    assert source.hits("/flaky.jpg") == 3
    first, second, third = source.arrived_at
    assert 0.5 <= second - first < 1.0  # the first backoff
    assert third - second >= 1.0  # Retry-After: 1


def _redirect_chain(source: SourceServer, redirects: int) -> str:
    source.serve("/photo.jpg", Reply(body=PHOTO))
    for hop in range(redirects, 0, -1):
        target = "/photo.jpg" if hop == redirects else f"/hop{hop + 1}"
        # Relative and absolute Locations alike.
        location = target if hop % 2 else source.url(target)
        source.serve(f"/hop{hop}", Reply(302, headers={"Location": location}))
    return source.url("/hop1")


def _refused_port() -> str:
    return f"http://127.0.0.1:{free_port()}/photo.jpg"


# Each: how the source misbehaves (it returns the URL to submit), the code and a part of the message.
FAILURES: dict[str, tuple[Callable[[SourceServer], str], str, str]] = {
    "not found": (lambda s: s.serve("/gone.jpg", Reply(404, b"no")), "source_http_error", "404 Not Found"),
    "server error every time": (
        lambda s: s.serve("/down.jpg", Reply(503, b"down")),
        "source_http_error",
        "503 Service Unavailable",
    ),
    "connection refused": (lambda s: _refused_port(), "source_unreachable", "cannot fetch from 127.0.0.1"),
    "a Retry-After past the time left": (
        lambda s: s.serve("/busy.jpg", Reply(429, headers={"Retry-After": "3600"})),
        "source_http_error",
        "429 Too Many Requests",
    ),
    "a redirect to another scheme": (
        lambda s: s.serve("/ftp.jpg", Reply(301, headers={"Location": "ftp://photos.example/a.jpg"})),
        "source_invalid_url",
        "redirect 1 (to ftp://photos.example/a.jpg)",
    ),
    "six redirects": (lambda s: _redirect_chain(s, 6), "source_too_many_redirects", "more than 5"),
    "over the cap, declared": (
        # It stalls after its first bytes: only a cap read from Content-Length ends it at once.
        lambda s: s.serve("/big.jpg", Reply(body=PHOTO + b"\0" * UPLOAD_CAP, stall_after=100)),
        "source_too_large",
        "200,000 bytes",
    ),
    "over the cap, undeclared": (
        lambda s: s.serve("/big.jpg", Reply(body=PHOTO + b"\0" * UPLOAD_CAP, content_length=False)),
        "source_too_large",
        "200,000 bytes",
    ),
    "a gzip bomb": (
        lambda s: s.serve(
            "/bomb.jpg",
            Reply(body=gzip.compress(PHOTO + b"\0" * 50_000_000), headers={"Content-Encoding": "gzip"}),
        ),
        "source_too_large",
        "200,000 bytes",
    ),
    "stalls mid-body": (
        lambda s: s.serve("/slow.jpg", Reply(body=PHOTO, stall_after=1000)),
        "source_timeout",
        "longer than 3 s",
    ),
    "not an image": (
        lambda s: s.serve(
            "/page.jpg", Reply(body=b"<html>hello</html>", headers={"Content-Type": "text/html"})
        ),
        "unsupported_format",
        "not an image",
    ),
    "empty": (lambda s: s.serve("/empty.jpg", Reply(body=b"")), "empty_file", "empty"),
    "unreadable": (
        lambda s: s.serve("/cut.png", Reply(body=imagegen.png(8, 8)[:30])),
        "unreadable_image",
        "png",
    ),
}


@pytest.mark.parametrize("case", FAILURES)
async def test_a_failing_source_ends_the_image_with_its_code_and_webhook(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    source: SourceServer,
    receiver: Receiver,
    case: str,
) -> None:
    misbehave, code, message = FAILURES[case]
    accepted = await submit(client, account, misbehave(source), callback_url=receiver.url)
    image = await finished(client, account, settings, accepted["id"])
    assert image["status"] == "failed"
    assert image["error"]["code"] == code
    assert message in image["error"]["message"]
    assert image["input"] is None
    (delivery,) = await receiver.arrivals(1)
    assert delivery.event["type"] == "image.failed"
    assert delivery.event["data"]["error"] == image["error"]
    original = await client.get(f"/v1/images/{image['id']}/original", headers=account.headers)
    assert_problem(original, 409, "image_failed")


# --- the SSRF guard, with private addresses not allowed -----------------------------------------------

# DNS would leave the machine, so the tests answer it: names the guard takes for public that lead to our
# servers on 127.0.0.1, and one the system resolver (faked) answers with a loopback address.
PUBLIC_NAMES = frozenset({"photos.example", "hooks.example"})
PRIVATE_NAME = "rebind.example"


@pytest.fixture
def guarded(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    real_resolve = addresses.resolve
    fake_resolver(monkeypatch, {PRIVATE_NAME: ["127.0.0.1"]})

    async def resolve(host: str, port: int, *, allow_private: bool) -> list[IPAddress]:
        if host in PUBLIC_NAMES:
            return [IPv4Address("127.0.0.1")]
        return await real_resolve(host, port, allow_private=allow_private)

    for module in (fetch, transport, destinations):
        monkeypatch.setattr(module, "resolve", resolve)
    return with_settings(settings, allow_private_callbacks=False)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/photo.jpg",
        "http://[::ffff:127.0.0.1]/photo.jpg",
        "http://[64:ff9b::7f00:1]/photo.jpg",
        "http://[2002:7f00:1::]/photo.jpg",
        "http://169.254.169.254/latest/meta-data",
        "http://localhost:8000/photo.jpg",
        "http://2130706433/photo.jpg",
    ],
)
async def test_a_private_source_address_is_refused_at_submit(
    guarded: Settings, account: Partner, url: str
) -> None:
    async with api_client(guarded) as client:
        response = await client.post("/v1/images", headers=account.headers, json={"source_url": url})
    problem = assert_problem(response, 422, "validation_failed")
    assert [error["field"] for error in problem["errors"]] == ["source_url"]


@pytest.mark.parametrize(
    ("location", "blocked"),
    [
        ("http://127.0.0.1:{port}/photo.jpg", "127.0.0.1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]:{port}/photo.jpg", "hiding 127.0.0.1"),
        ("http://[64:ff9b::a00:1]/photo.jpg", "hiding 10.0.0.1"),
        ("http://rebind.example:{port}/photo.jpg", "127.0.0.1 is a loopback address"),
    ],
)
async def test_a_redirect_to_a_private_address_is_blocked(
    guarded: Settings, account: Partner, source: SourceServer, receiver: Receiver, location: str, blocked: str
) -> None:
    source.serve("/photo.jpg", Reply(body=PHOTO))
    source.serve("/public.jpg", Reply(302, headers={"Location": location.format(port=source.port)}))
    hooks = f"http://hooks.example:{receiver.port}/hooks"
    async with api_client(guarded) as client:
        accepted = await submit(
            client, account, source.url("/public.jpg", "photos.example"), callback_url=hooks
        )
        image = await finished(client, account, guarded, accepted["id"])
    assert image["error"]["code"] == "source_blocked"
    assert image["error"]["message"].startswith("redirect 1 ")
    assert blocked in image["error"]["message"]
    assert source.hits("/photo.jpg") == 0
    (delivery,) = await receiver.arrivals(1)
    assert delivery.event["data"]["error"] == image["error"]


async def test_a_name_resolving_to_a_private_address_is_blocked(
    guarded: Settings, account: Partner, source: SourceServer
) -> None:
    source.serve("/photo.jpg", Reply(body=PHOTO))
    async with api_client(guarded) as client:
        accepted = await submit(client, account, source.url("/photo.jpg", PRIVATE_NAME))
        image = await finished(client, account, guarded, accepted["id"])
    assert image["error"]["code"] == "source_blocked"
    assert "127.0.0.1 is a loopback address" in image["error"]["message"]
    assert source.hits("/photo.jpg") == 0


# --- submit-time validation ------------------------------------------------------------------------------


async def test_every_problem_of_the_json_body_is_named_at_once(
    client: httpx.AsyncClient, account: Partner
) -> None:
    response = await client.post(
        "/v1/images",
        headers=account.headers,
        json={
            "source_url": "ftp://photos.example/a.jpg",
            "operations": [{"type": "resize", "params": {"width": 0}}],
            "metadata": [],
            "retention": 5,
            "colour": "blue",
        },
    )
    problem = assert_problem(response, 422, "validation_failed")
    assert [error["field"] for error in problem["errors"]] == [
        "source_url",
        "operations[0].params.width",
        "metadata",
        "retention",
        "colour",
    ]


@pytest.mark.parametrize(
    ("source_url", "message"),
    [
        (42, "must be a string"),
        ("https://user:secret@photos.example/a.jpg", "user name or password"),
        ("https://photos.example/" + "a" * 2048, "at most 2048 characters"),
        ("photos.example/a.jpg", "http:// or https://"),
    ],
)
async def test_a_bad_source_url_is_422(
    client: httpx.AsyncClient, account: Partner, source_url: object, message: str
) -> None:
    response = await client.post("/v1/images", headers=account.headers, json={"source_url": source_url})
    problem = assert_problem(response, 422, "validation_failed")
    (error,) = problem["errors"]
    assert error["field"] == "source_url"
    assert message in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"operations": []},
        {"upload_id": "upl_01m94xrkk62k8ej3t560hsrf7c", "source_url": "http://127.0.0.1/a.jpg"},
    ],
    ids=["neither", "both"],
)
async def test_a_json_image_naming_neither_or_both_of_upload_id_and_source_url_is_422(
    client: httpx.AsyncClient, account: Partner, body: dict[str, object]
) -> None:
    """The two JSON forms of POST /v1/images are told apart by these fields: one of them, exactly."""
    response = await client.post("/v1/images", headers=account.headers, json=body)
    problem = assert_problem(response, 422, "validation_failed")
    assert [error["field"] for error in problem["errors"]] == ["upload_id", "source_url"]
    assert all("exactly one of upload_id" in error["message"] for error in problem["errors"])


async def test_a_source_url_joins_a_batch_that_completes(
    client: httpx.AsyncClient, account: Partner, settings: Settings, source: SourceServer
) -> None:
    batch = (await client.post("/v1/batches", headers=account.headers, json={"archive": True})).json()
    url = source.serve("/a.jpg", Reply(body=PHOTO))
    accepted = await submit(client, account, url, batch_id=batch["id"], retention=3600)
    sealed = await client.post(f"/v1/batches/{batch['id']}/seal", headers=account.headers)
    assert sealed.status_code == 200, sealed.text
    image = await finished(client, account, settings, accepted["id"])
    assert image["status"] == "completed", image["error"]
    assert image["batch_id"] == batch["id"]
    done = (await client.get(f"/v1/batches/{batch['id']}", headers=account.headers)).json()
    assert done["status"] == "completed"
    assert done["counts"]["completed"] == 1


async def test_a_source_that_fails_is_named_in_its_batch_by_the_urls_file_name(
    client: httpx.AsyncClient, account: Partner, settings: Settings, source: SourceServer, receiver: Receiver
) -> None:
    """Never fetched, it has no input to name it, but the partner knows it by its URL's file name."""
    batch = (
        await client.post("/v1/batches", headers=account.headers, json={"callback_url": receiver.url})
    ).json()
    url = source.serve("/listing/front%20door.jpg", Reply(status=404))
    accepted = await submit(client, account, url, batch_id=batch["id"])
    await client.post(f"/v1/batches/{batch['id']}/seal", headers=account.headers)
    image = await finished(client, account, settings, accepted["id"])
    assert (image["status"], image["input"]) == ("failed", None)
    (completed,) = await receiver.arrivals(1)
    assert completed.event["type"] == "batch.completed"
    (failure,) = completed.event["data"]["failures"]
    assert (failure["image_id"], failure["filename"]) == (image["id"], "front door.jpg")
    assert failure["error"]["code"] == "source_http_error"


async def test_a_batch_takes_several_source_urls_at_once(
    client: httpx.AsyncClient, account: Partner, settings: Settings, source: SourceServer
) -> None:
    operations = [{"type": "resize", "params": {"width": 16}}]
    batch = (
        await client.post("/v1/batches", headers=account.headers, json={"operations": operations})
    ).json()
    urls = [
        source.serve("/a.jpg", Reply(body=PHOTO)),
        source.serve("/b.png", Reply(body=imagegen.png(20, 10))),
    ]
    response = await client.post(
        f"/v1/batches/{batch['id']}/images",
        headers=account.headers,
        json={"images": [{"source_url": urls[0]}, {"source_url": urls[1], "metadata": {"n": 2}}]},
    )
    assert response.status_code == 202, response.text
    added = response.json()["data"]
    assert [image["source"]["url"] for image in added] == urls
    assert [image["metadata"] for image in added] == [{}, {"n": 2}]
    await client.post(f"/v1/batches/{batch['id']}/seal", headers=account.headers)
    await run_burst(settings)
    listed = (await client.get(f"/v1/images?batch_id={batch['id']}", headers=account.headers)).json()["data"]
    assert sorted(image["input"]["filename"] for image in listed) == ["a.jpg", "b.png"]
    assert all(image["output"]["width"] == 16 for image in listed)
    done = (await client.get(f"/v1/batches/{batch['id']}", headers=account.headers)).json()
    assert done["counts"]["completed"] == 2


async def test_one_bad_entry_refuses_the_whole_list_naming_each_problem(
    client: httpx.AsyncClient, account: Partner
) -> None:
    batch = (await client.post("/v1/batches", headers=account.headers, json={})).json()
    response = await client.post(
        f"/v1/batches/{batch['id']}/images",
        headers=account.headers,
        json={
            "images": [
                {"source_url": "https://photos.example/a.jpg"},
                {"source_url": "gopher://photos.example/b.jpg", "batch_id": batch["id"]},
                "https://photos.example/c.jpg",
            ]
        },
    )
    problem = assert_problem(response, 422, "validation_failed")
    assert [error["field"] for error in problem["errors"]] == [
        "images[1].source_url",
        "images[1].batch_id",
        "images[2]",
    ]
    listed = (await client.get(f"/v1/images?batch_id={batch['id']}", headers=account.headers)).json()["data"]
    assert listed == []


async def test_a_job_stopped_mid_fetch_fetches_again_when_it_runs_again(
    client: httpx.AsyncClient, account: Partner, settings: Settings, source: SourceServer
) -> None:
    url = source.serve("/photo.jpg", Reply(body=PHOTO, stall_after=100), Reply(body=PHOTO))
    image_id = (await submit(client, account, url))["id"]
    async with worker_deps(settings) as deps:
        first_run = asyncio.create_task(processing.process_image(deps, image_id, 1))
        await asyncio.to_thread(source.wait_for_hits, "/photo.jpg", 1)
        first_run.cancel()  # as a worker killed mid-fetch: arq runs the job again
        with pytest.raises(asyncio.CancelledError):
            await first_run
        await processing.process_image(deps, image_id, 2)
    image = (await client.get(f"/v1/images/{image_id}", headers=account.headers)).json()
    assert image["status"] == "completed", image["error"]
    assert image["input"]["bytes"] == len(PHOTO)
    assert source.hits("/photo.jpg") == 2
    assert list((settings.storage_root / ".staging").iterdir()) == []


async def test_an_image_deleted_during_its_fetch_leaves_no_original(
    client: httpx.AsyncClient, account: Partner, settings: Settings, source: SourceServer, receiver: Receiver
) -> None:
    url = source.serve("/photo.jpg", Reply(body=PHOTO, stall_after=100))
    image_id = (await submit(client, account, url, callback_url=receiver.url))["id"]
    async with worker_deps(settings) as deps:
        run = asyncio.create_task(processing.process_image(deps, image_id, 1))
        await asyncio.to_thread(source.wait_for_hits, "/photo.jpg", 1)
        deleted = await client.delete(f"/v1/images/{image_id}", headers=account.headers)
        assert deleted.status_code == 204
        source.release()
        await run
        await deps.dispatcher.run_until_idle()
    assert not (settings.storage_root / account.id / image_id).exists()
    assert receiver.deliveries == []


async def test_stalled_sources_holding_every_job_slot_do_not_hold_up_webhooks(
    client: httpx.AsyncClient,
    account: Partner,
    settings: Settings,
    source: SourceServer,
    receiver: Receiver,
    worker: Worker,
) -> None:
    url = source.serve("/slow.jpg", Reply(body=PHOTO, stall_after=100))
    for _ in range(settings.worker_concurrency):
        await submit(client, account, url)
    await asyncio.to_thread(source.wait_for_hits, "/slow.jpg", settings.worker_concurrency)
    endpoint = await client.post(
        "/v1/webhook-endpoints", headers=account.headers, json={"url": receiver.url, "events": ["*"]}
    )
    receiver.trust(endpoint.json()["secret"])
    started = time.monotonic()
    await client.post(f"/v1/webhook-endpoints/{endpoint.json()['id']}/test", headers=account.headers)
    (delivery,) = await receiver.arrivals(1)
    # Well before the fetches give up (DARKROOM_SOURCE_TIMEOUT, 3 s here).
    assert time.monotonic() - started < 1.5
    assert delivery.event["type"] == "webhook.test"


# --- https ----------------------------------------------------------------------------------------------


@pytest.fixture
def tls_source(certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[SourceServer]:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # trust our certificate, made for localhost
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    server = SourceServer(tls=context).start()
    yield server
    server.stop()


async def test_https_connects_to_the_checked_address_and_verifies_the_url_host_name(
    client: httpx.AsyncClient, account: Partner, settings: Settings, tls_source: SourceServer
) -> None:
    tls_source.serve("/photo.jpg", Reply(body=PHOTO))
    by_name = await submit(client, account, tls_source.url("/photo.jpg", "localhost"))
    by_address = await submit(client, account, tls_source.url("/photo.jpg"))
    await run_burst(settings)
    named = (await client.get(f"/v1/images/{by_name['id']}", headers=account.headers)).json()
    assert named["status"] == "completed", named["error"]
    # The certificate names localhost, not 127.0.0.1: the name is what is checked, not the address.
    addressed = (await client.get(f"/v1/images/{by_address['id']}", headers=account.headers)).json()
    assert addressed["error"]["code"] == "source_unreachable"
    assert addressed["error"] == {
        "code": "source_unreachable",
        "message": f"the TLS certificate of 127.0.0.1:{tls_source.port} was rejected: "
        "IP address mismatch, certificate is not valid for '127.0.0.1'.",
    }
    assert tls_source.hits("/photo.jpg") == 1
