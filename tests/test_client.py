"""The Python client and the upload CLI against the real service: `uvicorn` and an arq worker as the
Procfile runs them (tests/test_processes.py's `stack`), over real sockets.

What is not ours is real too; where a test needs the network to misbehave (an answer lost after the
service ran the request, a download cut partway) an httpx transport wraps the real one and breaks exactly
that exchange.
"""

from __future__ import annotations

import email.utils
import io
import json
import os
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pyvips
import redis
from darkroom_client import (
    AsyncDarkroom,
    AuthenticationError,
    Batch,
    Conflict,
    Darkroom,
    NotFound,
    RateLimited,
    RetryPolicy,
    TransportError,
    ValidationFailed,
    WaitTimeout,
    WebhookListener,
)
from darkroom_client.cli import parse_operation
from darkroom_client.core import Core, Send, Sleep, parse_retry_after
from darkroom_client.flows import LONG_POLL_SECONDS, ImageFlows
from darkroom_client.webhooks import generate_secret, sign_headers

from server.embedded_redis import EmbeddedRedis
from tests import imagegen
from tests.conftest import Partner
from tests.s3server import REGION, S3Server
from tests.sources import Reply, SourceServer
from tests.test_processes import (
    BIN,
    REPO,
    START_TIMEOUT,
    Children,
    Stack,
    create_account,
    free_port,
    procfile_command,
    service_env,
    wait_until_ready,
)
from tests.test_processes import children as children  # the fixture
from tests.test_processes import stack as stack  # the fixture

THUMBNAIL = [{"type": "resize", "params": {"width": 32}}, {"type": "convert", "params": {"format": "png"}}]
QUICK_RETRIES = RetryPolicy(max_retries=4, backoff=0.05)


def size_of(data: bytes) -> tuple[int, int]:
    decoded = pyvips.Image.new_from_buffer(data, "")
    return decoded.width, decoded.height


@pytest.fixture
def partner(stack: Stack) -> Partner:
    return create_account(stack.env, "client")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "shoot"
    folder.mkdir()
    for index in range(3):
        (folder / f"photo-{index}.jpg").write_bytes(imagegen.jpeg(64 + index, 48))
    return folder


def test_upload_wait_download_list_and_delete(stack: Stack, partner: Partner, tmp_path: Path) -> None:
    source = tmp_path / "beach.jpg"
    source.write_bytes(imagegen.jpeg(64, 48))
    sent: list[int] = []
    with Darkroom(partner.api_key, stack.base_url) as darkroom:
        queued = darkroom.images.upload(
            source, operations=THUMBNAIL, metadata={"shoot": "s1"}, progress=sent.append
        )
        assert queued.status == "queued" and queued.metadata == {"shoot": "s1"}
        assert sum(sent) == source.stat().st_size

        image = darkroom.images.wait(queued.id, timeout=30)
        assert image.status == "completed" and image.filename == "beach.jpg"
        assert size_of(darkroom.images.download(image.id)) == (32, 24)
        assert size_of(darkroom.images.download(image.id, format="webp", width=16)) == (16, 12)
        assert darkroom.images.download(image.id, original=True) == source.read_bytes()
        with pytest.raises(ValueError, match="variant of the result"):
            darkroom.images.download(image.id, original=True, format="webp")
        saved = darkroom.images.download_to(image.id, tmp_path)
        assert saved.parent == tmp_path and saved.suffix == ".png"
        assert size_of(saved.read_bytes()) == (32, 24)

        assert [listed.id for listed in darkroom.images.list()] == [image.id]
        darkroom.images.delete(image.id)
        with pytest.raises(NotFound) as missing:
            darkroom.images.get(image.id)
    assert missing.value.status == 404 and missing.value.code == "not_found"
    assert missing.value.request_id


class RecordGets(httpx.HTTPTransport):
    """Records each GET and the answer's headers."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: list[tuple[httpx.Request, httpx.Headers]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "GET":
            self.gets.append((request, response.headers))
        return response


def test_wait_is_answered_as_the_image_finishes_without_polling(stack: Stack, partner: Partner) -> None:
    recording = RecordGets()
    with Darkroom(partner.api_key, stack.base_url, http_client=httpx.Client(transport=recording)) as darkroom:
        queued = darkroom.images.upload(imagegen.jpeg(64, 48), operations=THUMBNAIL)
        image = darkroom.images.wait(queued.id, timeout=60)
    assert image.status == "completed"
    # One long poll, answered when the worker finished the image.
    ((asked, answered),) = recording.gets
    assert asked.url.path == f"/v1/images/{queued.id}"
    assert asked.headers["prefer"] == f"wait={LONG_POLL_SECONDS}"
    assert answered["preference-applied"] == f"wait={LONG_POLL_SECONDS}"


def test_wait_polls_a_service_that_does_not_apply_the_wait_preference() -> None:
    flows = ImageFlows(Core("sk_live_x", "http://darkroom.test", RETRY_TWICE))
    flow = flows.wait("img_1", timeout=60, interval=0.5)
    asked = next(flow)
    assert isinstance(asked, Send) and asked.request.headers["prefer"] == f"wait={LONG_POLL_SECONDS}"
    # The long poll may take its while: the request's read timeout allows for it.
    assert asked.request.extensions["timeout"]["read"] > LONG_POLL_SECONDS
    queued = {"id": "img_1", "status": "queued"}
    applied = httpx.Response(200, headers={"Preference-Applied": "wait=25"}, json=queued)
    assert isinstance(flow.send(applied), Send)  # asked again at once: the service waited
    assert flow.send(httpx.Response(200, json=queued)) == Sleep(0.5)  # it did not: back off
    assert isinstance(flow.send(None), Send)
    with pytest.raises(StopIteration) as done:
        flow.send(httpx.Response(200, json={"id": "img_1", "status": "completed"}))
    assert done.value.value.status == "completed"


async def test_async_client_uploads_by_url_and_directly_and_waits_for_both(
    stack: Stack, partner: Partner
) -> None:
    source = SourceServer().start()
    try:
        url = source.serve(
            "/front.jpg", Reply(body=imagegen.jpeg(80, 60), headers={"Content-Type": "image/jpeg"})
        )
        async with AsyncDarkroom(partner.api_key, stack.base_url) as darkroom:
            by_url = await darkroom.images.from_url(url, operations=THUMBNAIL)
            direct = await darkroom.images.direct_upload(
                imagegen.png(40, 40), filename="square.png", operations=THUMBNAIL
            )
            assert direct.input is not None and direct.input["format"] == "png"
            finished = await darkroom.images.wait_many([by_url.id, direct.id], timeout=30)
            assert [image.status for image in finished] == ["completed", "completed"]
            assert size_of(await darkroom.images.download(by_url.id)) == (32, 24)
            assert size_of(await darkroom.images.download(direct.id)) == (32, 32)
            listed = [image.id async for image in darkroom.images.list(limit=1)]
    finally:
        source.stop()
    assert sorted(listed) == sorted([by_url.id, direct.id])  # two pages of one


def test_wait_by_webhook_returns_on_the_event_without_polling(stack: Stack, partner: Partner) -> None:
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    with (
        WebhookListener(partner.webhook_secret) as listener,
        Darkroom(partner.api_key, stack.base_url, http_client=http) as darkroom,
    ):
        queued = darkroom.images.upload(
            imagegen.jpeg(64, 48),
            filename="hook.jpg",
            operations=THUMBNAIL,
            callback_url=listener.callback_url,
        )
        forged = signed_event(
            generate_secret(), "msg_forged", "image.failed", {**queued.raw, "status": "failed"}
        )
        assert httpx.post(listener.callback_url, **forged).status_code == 401
        image = darkroom.images.wait(queued.id, listener=listener, timeout=60)

    assert image.id == queued.id and image.status == "completed" and image.output is not None
    assert [request.method for request in sent] == ["POST"], "nothing asked after the upload"
    assert (listener.accepted, listener.refused) == (1, 1)


async def test_async_wait_by_webhook_awaits_the_events_on_the_loop(stack: Stack, partner: Partner) -> None:
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request)

    http = httpx.AsyncClient(event_hooks={"request": [record]})
    with WebhookListener([generate_secret(), partner.webhook_secret]) as listener:
        async with AsyncDarkroom(partner.api_key, stack.base_url, http_client=http) as darkroom:
            first = await darkroom.images.upload(
                imagegen.jpeg(64, 48), operations=THUMBNAIL, callback_url=listener.callback_url
            )
            second = await darkroom.images.upload(
                imagegen.png(40, 40), operations=THUMBNAIL, callback_url=listener.callback_url
            )
            finished = await darkroom.images.wait_many([first.id, second.id], listener=listener, timeout=60)

    assert [image.id for image in finished] == [first.id, second.id]
    assert [image.status for image in finished] == ["completed", "completed"]
    assert [request.method for request in sent] == ["POST", "POST"], "nothing asked after the uploads"


def test_a_batch_waited_by_webhook_returns_once_its_archive_is_ready(
    stack: Stack, partner: Partner, photos: Path
) -> None:
    sent: list[httpx.Request] = []
    polled: list[Batch] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    with (
        WebhookListener(partner.webhook_secret) as listener,
        Darkroom(partner.api_key, stack.base_url, http_client=http) as darkroom,
    ):
        batch = darkroom.batches.create(
            operations=THUMBNAIL, archive=True, callback_url=listener.callback_url
        )
        darkroom.batches.add(batch.id, photos)
        darkroom.batches.seal(batch.id)
        finished = darkroom.batches.wait(batch.id, listener=listener, timeout=60, on_poll=polled.append)

    assert finished.counts["completed"] == 3
    assert finished.archive is not None and finished.archive.status == "ready"
    assert [request.method for request in sent] == ["POST", "POST", "POST"] and polled == []


def test_a_lost_webhook_still_ends_by_asking_the_service(stack: Stack, partner: Partner) -> None:
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    with (
        WebhookListener(partner.webhook_secret) as listener,
        WebhookListener(partner.webhook_secret) as elsewhere,
        Darkroom(partner.api_key, stack.base_url, http_client=http) as darkroom,
    ):
        queued = darkroom.images.upload(
            imagegen.jpeg(), operations=THUMBNAIL, callback_url=elsewhere.callback_url
        )
        image = darkroom.images.wait(queued.id, listener=listener, timeout=60, check_every=0.2)
        with pytest.raises(WaitTimeout, match="no webhook"):
            listener.wait_for(queued.id, timeout=0.1)

    assert image.status == "completed"
    assert {request.method for request in sent[1:]} == {"GET"} and listener.accepted == 0


def signed_event(secret: str, message_id: str, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """What `httpx.post` sends as a delivery of the event signed with `secret`."""
    body = json.dumps({"type": kind, "timestamp": "2026-01-01T00:00:00Z", "data": data}).encode()
    return {"content": body, "headers": sign_headers([secret], message_id, body)}


def test_the_listener_answers_by_signature_and_counts_a_redelivery_once() -> None:
    secret = generate_secret()
    image = {"id": "img_1", "status": "completed", "created_at": "2026-01-01T00:00:00Z"}
    delivery = signed_event(secret, "msg_1", "image.completed", image)
    with WebhookListener(secret) as listener:
        assert not listener.finished("img_1").done()
        assert (
            httpx.post(
                listener.callback_url, **signed_event(generate_secret(), "msg_2", "image.completed", image)
            ).status_code
            == 401
        )
        stale = {**delivery, "headers": {**delivery["headers"], "webhook-timestamp": "1"}}
        assert httpx.post(listener.callback_url, **stale).status_code == 400
        assert httpx.post(listener.callback_url, content=delivery["content"]).status_code == 400
        assert not listener.finished("img_1").done()

        assert httpx.post(listener.callback_url, **delivery).status_code == 204
        assert httpx.post(listener.callback_url, **delivery).status_code == 204
        assert listener.wait_for("img_1", timeout=5).status == "completed"
    assert (listener.accepted, listener.duplicates, listener.refused) == (1, 1, 3)
    with pytest.raises(ValueError, match="secret"):
        WebhookListener([])
    with WebhookListener(secret, public_url="https://tunnel.example/hooks") as tunnelled:
        assert tunnelled.callback_url == "https://tunnel.example/hooks"


def test_on_s3_a_direct_upload_goes_by_the_form_and_downloads_follow_presigned_urls(
    children: Children, redis_server: EmbeddedRedis, s3_server: S3Server, tmp_path: Path
) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    port = free_port()
    env = {
        **service_env(tmp_path / "data", port, redis_server.url),
        "DARKROOM_STORAGE_URL": f"s3://{s3_server.new_bucket()}/client",
        "DARKROOM_S3_ENDPOINT_URL": s3_server.url,
        "DARKROOM_S3_REGION": REGION,
        "DARKROOM_S3_PRESIGNED_DOWNLOADS": "1",
    }
    base_url = f"http://127.0.0.1:{port}"
    web = children.start("web", procfile_command("web", port), env)
    worker = children.start("worker", procfile_command("worker", port), env)
    wait_until_ready(base_url, [web, worker])
    partner = create_account(env, "s3")
    square = imagegen.png(40, 40)
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    with Darkroom(partner.api_key, base_url, http_client=http) as darkroom:
        landed = darkroom.images.direct_upload(square, filename="square.png", operations=THUMBNAIL)
        assert landed.raw["upload"]["status"] == "started"
        assert darkroom.images.wait(landed.id, timeout=30).status == "completed"
        assert size_of(darkroom.images.download(landed.id)) == (32, 32)
        assert darkroom.images.download(landed.id, original=True) == square
    to_bucket = [
        (request.method, request.headers.get("authorization"))
        for request in sent
        if str(request.url).startswith(s3_server.url)
    ]
    assert to_bucket == [("POST", None), ("GET", None), ("GET", None)]  # the form, two presigned downloads


class CutFirstDownload(httpx.HTTPTransport):
    """Cuts the connection after `keep` bytes of the first whole-file answer (no `Range` asked) whose
    path ends with `suffix`; records every GET of such paths."""

    def __init__(self, suffix: str, keep: int) -> None:
        super().__init__()
        self.suffix, self.keep = suffix, keep
        self.requests: list[httpx.Request] = []
        self.statuses: list[int] = []
        self.cut = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if not request.url.path.endswith(self.suffix) or request.method != "GET":
            return response
        self.requests.append(request)
        self.statuses.append(response.status_code)
        if self.cut or "range" in request.headers or not response.is_success:
            return response
        self.cut = True
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_Cut(response, self.keep)
        )


class _Cut(httpx.SyncByteStream):
    def __init__(self, response: httpx.Response, keep: int) -> None:
        self.response, self.keep = response, keep

    def __iter__(self) -> Iterator[bytes]:
        body = self.response.read()
        yield body[: self.keep]
        raise httpx.ReadError("connection cut by the test")

    def close(self) -> None:
        self.response.close()


def test_batch_from_a_folder_completes_and_its_archive_download_resumes(
    stack: Stack, partner: Partner, photos: Path, tmp_path: Path
) -> None:
    cutting = CutFirstDownload("/archive", keep=100)
    with Darkroom(partner.api_key, stack.base_url, http_client=httpx.Client(transport=cutting)) as darkroom:
        batch = darkroom.batches.create(operations=THUMBNAIL, archive=True)
        with pytest.raises(Conflict) as early:
            darkroom.batches.download_archive(batch.id, tmp_path / "shoot.zip")
        assert early.value.code == "not_ready" and early.value.retry_after == 5
        cutting.requests.clear()
        cutting.statuses.clear()
        added = darkroom.batches.add(batch.id, photos)
        assert [image.filename for image in added] == ["photo-0.jpg", "photo-1.jpg", "photo-2.jpg"]
        assert darkroom.batches.seal(batch.id).status in ("sealed", "processing", "completed")
        finished = darkroom.batches.wait(batch.id, timeout=60)
        assert finished.counts["completed"] == 3 and finished.archive is not None
        assert finished.archive.status == "ready"
        saved = darkroom.batches.download_archive(batch.id, tmp_path / "shoot.zip")

    probe, first, resumed = cutting.requests
    assert probe.headers["range"] == "bytes=0-0" and "range" not in first.headers
    assert resumed.headers["range"] == "bytes=100-" and resumed.headers["if-range"]
    assert cutting.statuses == [206, 200, 206]
    whole = httpx.get(f"{stack.base_url}/v1/batches/{batch.id}/archive", headers=partner.headers).content
    assert saved.read_bytes() == whole and not list(tmp_path.glob(".*.part"))
    with zipfile.ZipFile(saved) as archive:
        assert sorted(archive.namelist()) == ["_report.json", "photo-0.png", "photo-1.png", "photo-2.png"]


def test_a_refused_file_is_reported_and_the_rest_sent_again_each_byte_counted_once(
    stack: Stack, partner: Partner, photos: Path
) -> None:
    (photos / "notes.jpg").write_bytes(b"not a photo at all")
    sent: list[int] = []
    refusals: list[tuple[str, str]] = []
    with Darkroom(partner.api_key, stack.base_url) as darkroom:
        batch = darkroom.batches.create()
        added = darkroom.batches.add(
            batch.id, photos, progress=sent.append, refused=lambda name, why: refusals.append((name, why))
        )
    assert sorted(image.filename for image in added) == ["photo-0.jpg", "photo-1.jpg", "photo-2.jpg"]
    ((name, why),) = refusals
    assert (name, why.split(":")[0]) == ("notes.jpg", "unsupported_format")  # named once, not in `why` again
    # The first request carried all four files; the second, the three photos again: a bar of bytes sent
    # that counted them twice would end past its total.
    assert sum(sent) == sum(photo.stat().st_size for photo in photos.iterdir())


class LoseFirstAnswer(httpx.HTTPTransport):
    """Lets the first POST reach the service, then drops its answer as a broken connection would."""

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[httpx.Request] = []
        self.answers: list[httpx.Response] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST":
            self.posts.append(request)
            response.read()
            self.answers.append(response)
            if len(self.posts) == 1:
                raise httpx.RemoteProtocolError("server disconnected without sending a response")
        return response


def test_a_lost_answer_is_retried_under_the_same_key_and_runs_once(stack: Stack, partner: Partner) -> None:
    losing = LoseFirstAnswer()
    retry = RetryPolicy(backoff=0.01)
    with Darkroom(
        partner.api_key, stack.base_url, retry=retry, http_client=httpx.Client(transport=losing)
    ) as darkroom:
        image = darkroom.images.upload(imagegen.jpeg(), filename="once.jpg", operations=THUMBNAIL)
        assert [found.id for found in darkroom.images.list()] == [image.id]
        other = darkroom.images.upload(imagegen.jpeg(), filename="twice.jpg")

    keys = [request.headers["idempotency-key"] for request in losing.posts]
    assert keys[0] == keys[1] != keys[2]  # one key per call, the same on its retry
    assert [answer.headers.get("idempotent-replayed") for answer in losing.answers] == [None, "true", None]
    assert losing.answers[0].json()["id"] == image.id != other.id


def test_429_is_waited_out_as_retry_after_says(stack: Stack) -> None:
    partner = create_account(stack.env, "tiny", "--requests-per-minute", "60")
    statuses: list[tuple[float, int, str | None]] = []

    def record(response: httpx.Response) -> None:
        statuses.append((time.monotonic(), response.status_code, response.headers.get("retry-after")))

    http = httpx.Client(event_hooks={"response": [record]})
    with Darkroom(partner.api_key, stack.base_url, retry=QUICK_RETRIES, http_client=http) as darkroom:
        while not any(status == 429 for _, status, _ in statuses):
            darkroom.images.list_page(None)
        limited = next(index for index, (_, status, _) in enumerate(statuses) if status == 429)
        assert statuses[-1][1] == 200, "the limited call was retried until it passed"
        waited = statuses[limited + 1][0] - statuses[limited][0]
        assert waited >= float(statuses[limited][2] or 0) - 0.05

    impatient = RetryPolicy(max_retries=0)
    with (
        Darkroom(partner.api_key, stack.base_url, retry=impatient) as darkroom,
        pytest.raises(RateLimited) as refused,
    ):
        for _ in range(100):
            darkroom.images.list_page(None)
    assert refused.value.code == "rate_limited" and refused.value.retry_after is not None


def test_problems_become_typed_errors(stack: Stack, partner: Partner) -> None:
    with Darkroom(partner.api_key, stack.base_url) as darkroom:
        with pytest.raises(ValidationFailed) as invalid:
            darkroom.images.upload(imagegen.jpeg(), operations=[{"type": "resize", "params": {"width": 0}}])
        assert invalid.value.status == 422
        assert [error["field"] for error in invalid.value.errors] == ["operations[0].params.width"]
        # Its message (what a traceback and the CLI print) names the field, not just "see errors".
        assert "(operations[0].params.width: must be between 1 and 16384)" in str(invalid.value)
    with Darkroom("sk_live_wrong", stack.base_url) as stranger, pytest.raises(AuthenticationError) as refused:
        stranger.images.list_page(None)
    assert refused.value.code == "invalid_api_key"


def test_operations_are_written_type_colon_params() -> None:
    assert parse_operation("resize:width=800,fit=cover") == {
        "type": "resize",
        "params": {"width": 800, "fit": "cover"},
    }
    assert parse_operation("grayscale") == {"type": "grayscale", "params": {}}
    assert parse_operation('{"type": "blur", "params": {"sigma": 1.5}}')["params"] == {"sigma": 1.5}


def run_cli(stack: Stack, partner: Partner, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "DARKROOM_API_KEY": partner.api_key, "DARKROOM_URL": stack.base_url}
    return subprocess.run(
        [str(BIN / "darkroom"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT * 2,
        check=False,
    )


def test_cli_uploads_waits_saves_and_names_what_failed(
    stack: Stack, partner: Partner, photos: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "notes.jpg"
    broken.write_bytes(b"not a photo at all")
    out = tmp_path / "out"
    done = run_cli(
        stack, partner, "upload", str(photos), str(broken),
        "--op", "resize:width=32", "--op", "convert:format=webp", "--wait", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "3 completed, 1 failed" in done.stderr
    assert "notes.jpg" in done.stderr and "unsupported_format" in done.stderr
    assert sorted(path.name for path in out.iterdir()) == ["photo-0.webp", "photo-1.webp", "photo-2.webp"]


def test_cli_without_wait_gives_the_ids_to_look_up_later(
    stack: Stack, partner: Partner, photos: Path
) -> None:
    done = run_cli(stack, partner, "upload", str(photos / "photo-0.jpg"), "--op", "resize:width=32")
    assert done.returncode == 0, done.stderr
    with Darkroom(partner.api_key, stack.base_url) as darkroom:
        (image,) = darkroom.images.list()
    assert f"photo-0.jpg: {image.id} queued" in done.stderr


def test_cli_sends_a_folder_as_a_batch_and_downloads_its_zip(
    stack: Stack, partner: Partner, photos: Path, tmp_path: Path
) -> None:
    (photos / "notes.jpg").write_bytes(b"not a photo at all")  # refused; the others still go in
    target = tmp_path / "shoot.zip"
    done = run_cli(
        stack,
        partner,
        "batch",
        str(photos),
        "--op",
        "resize:width=32",
        "--archive",
        "--wait",
        "--download",
        str(target),
    )
    assert done.returncode == 1, done.stderr
    assert "3 completed, 1 failed" in done.stderr and "notes.jpg" in done.stderr
    with zipfile.ZipFile(io.BytesIO(target.read_bytes())) as archive:
        assert sorted(archive.namelist()) == ["_report.json", "photo-0.jpg", "photo-1.jpg", "photo-2.jpg"]


def test_cli_without_a_key_says_how_to_give_one(photos: Path) -> None:
    env = {name: value for name, value in os.environ.items() if name != "DARKROOM_API_KEY"}
    done = subprocess.run(
        [str(BIN / "darkroom"), "upload", str(photos), "--url", "http://127.0.0.1:9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert done.returncode == 2 and "DARKROOM_API_KEY" in done.stderr


def test_cli_stops_at_a_refused_key_and_says_how_to_give_another(
    stack: Stack, partner: Partner, photos: Path
) -> None:
    """Every photo would be refused alike: one line says so, not one per photo."""
    stranger = Partner(partner.id, "sk_live_" + "x" * 43, partner.webhook_secret)
    for command in (["upload", str(photos), "--wait"], ["batch", str(photos)]):
        done = run_cli(stack, stranger, *command)
        assert done.returncode == 2, done.stderr
        (line,) = [line for line in done.stderr.splitlines() if "invalid_api_key" in line]
        assert line.startswith(f"darkroom {command[0]}: 401 invalid_api_key") and "--api-key" in line
        assert "photo-0.jpg" not in done.stderr


def test_cli_with_no_service_at_its_url_says_so(stack: Stack, partner: Partner, photos: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    done = run_cli(stack, partner, "upload", str(photos), "--url", nowhere)
    assert done.returncode == 2, done.stderr
    assert f"darkroom upload: no answer from {nowhere} (ConnectError" in done.stderr
    assert "is the service running there? (--url or DARKROOM_URL)" in done.stderr


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("127.0.0.1:9", "starts with http:// or https:// (given: '127.0.0.1:9')"),
        ("http://127.0.0.1:9/v1/", "is its base, without /v1 (given: 'http://127.0.0.1:9/v1/')"),
    ],
)
def test_cli_with_a_url_that_is_not_the_services_base_says_so_at_once(
    photos: Path, url: str, said: str
) -> None:
    """`--url 127.0.0.1:8000` was retried for seconds as a transport error, then called no service;
    `--url http://…/v1` answered '404 not_found: Not Found' for every photo."""
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "darkroom"), "upload", str(photos), "--url", url, "--api-key", "sk_live_x"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert f"{said} (--url or DARKROOM_URL)" in done.stderr
    assert time.monotonic() - started < 3, "refused before any request, not after the retries"


# The retry loop, stepped by hand: the sans-IO core yields what it would send and takes the answers, so
# these run without a network.

RETRY_TWICE = RetryPolicy(max_retries=2, backoff=1.0, max_wait=60)


def test_a_503_is_sent_again_under_the_same_key_after_retry_after() -> None:
    core = Core("sk_live_x", "http://darkroom.test", RETRY_TWICE)
    flow = core.send(core.request("POST", "/v1/images", json_body={"source_url": "https://x.test/a.jpg"}))
    first = next(flow)
    assert isinstance(first, Send) and first.request.headers["idempotency-key"]
    unavailable = httpx.Response(503, headers={"Retry-After": "7"}, json={"code": "store_unavailable"})
    assert flow.send(unavailable) == Sleep(7.0)
    again = flow.send(None)
    assert isinstance(again, Send) and again.request is first.request  # the same key, the same bytes
    with pytest.raises(StopIteration) as done:
        flow.send(httpx.Response(202, json={"id": "img_1"}))
    assert done.value.value.json() == {"id": "img_1"}


def test_retries_end_in_the_typed_error_or_a_transport_error() -> None:
    core = Core("sk_live_x", "http://darkroom.test", RETRY_TWICE)
    limited = httpx.Response(
        429, headers={"Retry-After": "1"}, json={"code": "rate_limited", "detail": "wait"}
    )
    flow = core.send(core.request("GET", "/v1/images"))
    next(flow)
    for _ in range(2):
        assert flow.send(limited) == Sleep(1.0)
        next(flow)
    with pytest.raises(RateLimited) as refused:
        flow.send(limited)
    assert refused.value.retry_after == 1.0 and refused.value.detail == "wait"

    too_long = httpx.Response(429, headers={"Retry-After": "3600"}, json={"code": "rate_limited"})
    flow = core.send(core.request("GET", "/v1/images"))
    next(flow)
    with pytest.raises(RateLimited):
        flow.send(too_long)  # an hour is not waited out inside a call

    flow = core.send(core.request("GET", "/v1/images"))
    next(flow)
    for _ in range(2):
        pause = flow.throw(httpx.ConnectError("refused"))
        assert isinstance(pause, Sleep) and 0 < pause.seconds <= 2.0
        next(flow)
    with pytest.raises(TransportError, match="ConnectError"):
        flow.throw(httpx.ConnectError("refused"))


def test_a_wait_that_would_ask_in_a_tight_loop_is_refused_before_asking() -> None:
    with Darkroom("sk_live_unused", "http://127.0.0.1:9") as darkroom:
        with pytest.raises(ValueError, match="above 0 s"):
            darkroom.images.wait("img_01m96nfpm2vepvk2tj0yr4mcya", interval=0)
        with WebhookListener(generate_secret()) as listener, pytest.raises(ValueError, match="above 0 s"):
            darkroom.batches.wait("bat_01m96nfpm2vepvk2tj0yr4mcya", listener=listener, check_every=0)


def test_retry_after_may_be_an_http_date() -> None:
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 58 <= (parse_retry_after(in_a_minute) or 0) <= 60
    assert parse_retry_after("soon") is None and parse_retry_after("5") == 5.0
