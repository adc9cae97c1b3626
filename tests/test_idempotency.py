"""Idempotency-Key against real web processes (uvicorn, as the Procfile runs it) sharing a real Redis: a
retried POST is answered from the first one's response, never run twice."""

from __future__ import annotations

import json
import os
import signal
import socket
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from server.embedded_redis import EmbeddedRedis
from server.idempotency import RequestFingerprint
from tests import imagegen
from tests.conftest import Partner
from tests.test_processes import (
    RESIZE_TO_160,
    START_TIMEOUT,
    Child,
    Children,
    answers_health,
    create_account,
    free_port,
    poll,
    procfile_command,
    service_env,
    wait_until_ready,
)
from tests.test_processes import children as children  # the fixture

PHOTO = imagegen.jpeg(320, 240)
CALLBACK = "http://127.0.0.1:9/hook"  # no worker runs here: nothing is ever sent to it


class Web:
    """One web process of the service; `env` is what its processes (and `darkroom accounts`) read."""

    def __init__(self, children: Children, name: str, env: dict[str, str], port: int, *, ready: bool) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self.env = env
        self.child: Child = children.start(name, procfile_command("web", port), env)
        if ready:
            wait_until_ready(self.base_url, [self.child])
        else:  # its storage is down on purpose: it lives, but is not ready
            poll(lambda: answers_health(self.base_url), f"{name} answering", START_TIMEOUT)

    def post(self, path: str, account: Partner, key: str | bytes | None, **request: Any) -> httpx.Response:
        headers = {name.encode(): value.encode() for name, value in account.headers.items()}
        if key is not None:
            headers[b"Idempotency-Key"] = key.encode() if isinstance(key, str) else key
        with httpx.Client(base_url=self.base_url, timeout=30) as http:
            return http.post(path, headers=headers, **request)

    def upload(self, account: Partner, key: str | None, data: bytes = PHOTO) -> httpx.Response:
        return self.post(
            "/v1/images",
            account,
            key,
            files={"file": ("photo.jpg", data, "image/jpeg")},
            data={"operations": json.dumps(RESIZE_TO_160), "callback_url": CALLBACK},
        )

    def image_ids(self, account: Partner) -> list[str]:
        with httpx.Client(base_url=self.base_url, timeout=10) as http:
            listed = http.get("/v1/images", headers=account.headers)
        assert listed.status_code == 200, listed.text
        return [image["id"] for image in listed.json()["data"]]


def start_web(
    children: Children,
    redis_server: EmbeddedRedis,
    data_dir: Path,
    name: str = "web",
    *,
    ready: bool = True,
    settings: dict[str, str] | None = None,
) -> Web:
    port = free_port()
    env = {**service_env(data_dir, port, redis_server.url), **(settings or {})}
    return Web(children, name, env, port, ready=ready)


@pytest.fixture
def flushed(redis_server: EmbeddedRedis) -> EmbeddedRedis:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server


@pytest.fixture
def web(children: Children, flushed: EmbeddedRedis, tmp_path: Path) -> Web:
    return start_web(children, flushed, tmp_path / "data")


@pytest.fixture
def partner(web: Web) -> Partner:
    return create_account(web.env, "partner")


def new_key() -> str:
    return str(uuid.uuid4())


def assert_replays(first: httpx.Response, again: httpx.Response) -> None:
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert (again.status_code, again.content) == (first.status_code, first.content)
    for kept in ("location", "content-type", "content-length"):
        assert again.headers.get(kept) == first.headers.get(kept)
    # The replay is a request of its own, with its own id.
    assert again.headers["x-request-id"] != first.headers["x-request-id"]


def test_a_retried_upload_is_answered_from_the_first_and_makes_one_image(web: Web, partner: Partner) -> None:
    key = new_key()
    first = web.upload(partner, key)
    assert first.status_code == 202, first.text
    # httpx picks a new multipart boundary for each request, as requests and browsers do.
    again = web.upload(partner, key)
    assert_replays(first, again)
    assert web.image_ids(partner) == [first.json()["id"]]
    # Without a key, the same upload is a new image.
    assert web.upload(partner, None).status_code == 202
    assert len(web.image_ids(partner)) == 2


def test_a_retried_batch_and_endpoint_create_return_the_same_resource(web: Web, partner: Partner) -> None:
    batch_key, endpoint_key = new_key(), new_key()
    batch = web.post("/v1/batches", partner, batch_key, json={"metadata": {"shoot": "spring"}})
    assert batch.status_code == 201, batch.text
    again = web.post("/v1/batches", partner, batch_key, json={"metadata": {"shoot": "spring"}})
    assert_replays(batch, again)
    # A replay is a request: counted against the rate limit, and told what is left of it.
    assert again.headers["x-ratelimit-limit"] == batch.headers["x-ratelimit-limit"]
    assert int(again.headers["x-ratelimit-remaining"]) >= 0

    endpoint = {"url": "https://hooks.example.com/darkroom"}
    created = web.post("/v1/webhook-endpoints", partner, endpoint_key, json=endpoint)
    assert created.status_code == 201, created.text
    again = web.post("/v1/webhook-endpoints", partner, endpoint_key, json=endpoint)
    assert_replays(created, again)
    with httpx.Client(base_url=web.base_url, timeout=10) as http:
        listed = http.get("/v1/webhook-endpoints", headers=partner.headers).json()["data"]
    assert [each["id"] for each in listed] == [created.json()["id"]]

    # A refusal of the request itself is its answer too: kept, and the fix is a new key.
    bad_key, bad = new_key(), {"callback_url": "ftp://hooks.example.com"}
    refused = web.post("/v1/batches", partner, bad_key, json=bad)
    assert refused.status_code == 422 and refused.json()["code"] == "validation_failed", refused.text
    assert_replays(refused, web.post("/v1/batches", partner, bad_key, json=bad))


def test_a_retried_seal_is_answered_from_the_first(web: Web, partner: Partner) -> None:
    batch = web.post("/v1/batches", partner, None, json={}).json()
    added = web.post(f"/v1/batches/{batch['id']}/images", partner, None, files={"file": ("a.jpg", PHOTO)})
    assert added.status_code == 202, added.text
    key = new_key()
    sealed = web.post(f"/v1/batches/{batch['id']}/seal", partner, key)
    assert sealed.status_code == 200, sealed.text
    assert_replays(sealed, web.post(f"/v1/batches/{batch['id']}/seal", partner, key))
    assert web.post(f"/v1/batches/{batch['id']}/seal", partner, None).json()["code"] == "batch_sealed"

    # Refused before its bytes were read: not kept (the client need not send them), so a retry runs.
    upload_key = new_key()
    for _ in range(2):
        late = web.post(
            f"/v1/batches/{batch['id']}/images",
            partner,
            upload_key,
            files={"file": ("big.jpg", bytes(200_000))},
        )
        assert late.status_code == 409 and late.json()["code"] == "batch_sealed", late.text
        assert "idempotent-replayed" not in late.headers


def test_the_same_key_for_another_request_is_refused(web: Web, partner: Partner) -> None:
    key = new_key()
    assert web.upload(partner, key).status_code == 202
    for refused in (
        web.upload(partner, key, imagegen.jpeg(321, 240)),
        web.post("/v1/batches", partner, key, json={}),
        web.post("/v1/images?batch=1", partner, key, files={"file": ("photo.jpg", PHOTO)}),
    ):
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "idempotency_key_reused"
        assert "idempotent-replayed" not in refused.headers
    assert len(web.image_ids(partner)) == 1


def test_a_key_we_cannot_keep_is_refused_before_anything_runs(web: Web, partner: Partner) -> None:
    for key in ("", "x" * 256, "tab\there", "caf\u00e9".encode("latin-1")):
        refused = web.post("/v1/batches", partner, key, json={})
        assert refused.status_code == 400, refused.text
        assert refused.json()["code"] == "invalid_idempotency_key"
    assert web.post("/v1/batches", partner, "x" * 255, json={}).status_code == 201


def test_twenty_at_once_make_one_image(web: Web, partner: Partner) -> None:
    key = new_key()
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: web.upload(partner, key), range(20)))
    statuses = Counter(answer.status_code for answer in answers)
    assert set(statuses) <= {202, 409}, [answer.text for answer in answers]
    accepted = [answer for answer in answers if answer.status_code == 202]
    fresh = [answer for answer in accepted if "idempotent-replayed" not in answer.headers]
    assert len(fresh) == 1
    assert {answer.json()["id"] for answer in accepted} == {fresh[0].json()["id"]}
    for busy in (answer for answer in answers if answer.status_code == 409):
        assert busy.json()["code"] == "idempotency_key_in_use"
        assert busy.headers["retry-after"] == "1"
    assert web.image_ids(partner) == [fresh[0].json()["id"]]
    assert_replays(fresh[0], web.upload(partner, key))


def test_keys_belong_to_an_account(web: Web, partner: Partner) -> None:
    other = create_account(web.env, "other partner")
    key = new_key()
    mine, theirs = web.upload(partner, key), web.upload(other, key)
    assert mine.status_code == theirs.status_code == 202
    assert "idempotent-replayed" not in theirs.headers
    assert mine.json()["id"] != theirs.json()["id"]
    assert web.image_ids(partner) == [mine.json()["id"]]
    assert web.image_ids(other) == [theirs.json()["id"]]


def test_two_web_processes_share_the_keys(
    children: Children, flushed: EmbeddedRedis, tmp_path: Path, web: Web, partner: Partner
) -> None:
    second = start_web(children, flushed, tmp_path / "data", "second web")
    key = new_key()
    first = web.upload(partner, key)
    assert first.status_code == 202, first.text
    assert_replays(first, second.upload(partner, key))
    assert second.image_ids(partner) == [first.json()["id"]]


def test_a_failure_of_ours_is_not_kept_and_the_retry_runs(
    children: Children, flushed: EmbeddedRedis, tmp_path: Path, web: Web, partner: Partner
) -> None:
    with socket.socket() as nothing_listens:
        nothing_listens.bind(("127.0.0.1", 0))
        dead_s3 = f"http://127.0.0.1:{nothing_listens.getsockname()[1]}"
        broken = start_web(
            children,
            flushed,
            tmp_path / "broken",
            "web with its storage down",
            ready=False,
            settings={
                "DARKROOM_STORAGE_URL": "s3://photos",
                "DARKROOM_S3_ENDPOINT_URL": dead_s3,
                "DARKROOM_S3_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "darkroom-test",
                "AWS_SECRET_ACCESS_KEY": "darkroom-test-secret",
            },
        )
        key = new_key()
        failed = broken.upload(partner, key)
    assert failed.status_code == 503, failed.text
    assert failed.json()["code"] == "storage_unavailable"
    retried = web.upload(partner, key)
    assert retried.status_code == 202, retried.text
    assert "idempotent-replayed" not in retried.headers
    assert_replays(retried, web.upload(partner, key))


def half_sent_batch_create(web: Web, partner: Partner, key: str) -> socket.socket:
    """A connection that sent the headers and the start of a JSON body, the rest never coming."""
    connection = socket.create_connection(("127.0.0.1", int(web.base_url.rsplit(":", 1)[1])))
    connection.sendall(
        b"POST /v1/batches HTTP/1.1\r\nHost: darkroom\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {partner.api_key}\r\nIdempotency-Key: {key}\r\n".encode()
        + b"Content-Length: 100\r\n\r\n{"
    )
    return connection


def test_a_client_gone_mid_body_frees_its_key_at_once(
    web: Web, partner: Partner, flushed: EmbeddedRedis
) -> None:
    key = new_key()
    with redis.Redis.from_url(flushed.url) as store:
        with half_sent_batch_create(web, partner, key):
            poll(lambda: store.keys("idempotency:*"), "the key claimed", timeout=10)
        # Released when the connection closed, not 6 minutes later when the claim would lapse.
        poll(lambda: not store.keys("idempotency:*"), "the key released", timeout=10)
    created = web.post("/v1/batches", partner, key, json={})
    assert created.status_code == 201, created.text
    assert "idempotent-replayed" not in created.headers


def test_the_key_of_a_web_process_killed_mid_request_frees_itself(
    children: Children, flushed: EmbeddedRedis, tmp_path: Path
) -> None:
    timeouts = {"DARKROOM_BODY_TIMEOUT": "4", "DARKROOM_IDEMPOTENCY_LOCK_TIMEOUT": "5"}
    doomed = start_web(children, flushed, tmp_path / "data", "doomed web", settings=timeouts)
    survivor = start_web(children, flushed, tmp_path / "data", "surviving web", settings=timeouts)
    partner = create_account(survivor.env, "partner")
    key = new_key()
    with redis.Redis.from_url(flushed.url) as store, half_sent_batch_create(doomed, partner, key):
        poll(lambda: store.keys("idempotency:*"), "the key claimed", timeout=10)
        os.kill(doomed.child.pid, signal.SIGKILL)
        busy = survivor.post("/v1/batches", partner, key, json={})
        assert busy.status_code == 409, busy.text
        assert busy.json()["code"] == "idempotency_key_in_use"
        created = poll(
            lambda: (
                (answer := survivor.post("/v1/batches", partner, key, json={})).status_code != 409 and answer
            ),
            "the claim lapsed",
            timeout=10,
        )
    assert created.status_code == 201, created.text
    assert "idempotent-replayed" not in created.headers


def multipart_fingerprint(boundary: str, body: bytes, cuts: list[int]) -> str:
    """The fingerprint of `body` arriving in pieces ending at `cuts`, as TCP may deliver it."""
    scope = {"method": "POST", "path": "/v1/images", "query_string": b""}
    fingerprint = RequestFingerprint(scope, f"multipart/form-data; boundary={boundary}")
    pieces = [body[start:end] for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    for index, piece in enumerate(pieces):
        fingerprint.add({"type": "http.request", "body": piece, "more_body": index < len(pieces) - 1})
    assert fingerprint.complete
    return fingerprint.hexdigest()


def test_the_same_parts_match_whatever_the_boundary_and_however_they_arrive() -> None:
    def encoded(boundary: str, photo: bytes) -> bytes:
        return (
            f"--{boundary}\r\nContent-Disposition: form-data; name=file; filename=a.jpg\r\n\r\n".encode()
            + photo
            + f"\r\n--{boundary}--\r\n".encode()
        )

    first = encoded("a1b2c3", PHOTO)
    expected = multipart_fingerprint("a1b2c3", first, [])
    again = encoded("ffee99887766", PHOTO)
    for cut in range(1, len(again) - 1, 7):
        assert multipart_fingerprint("ffee99887766", again, [cut, min(cut + 3, len(again) - 1)]) == expected
    assert multipart_fingerprint("ffee99887766", encoded("ffee99887766", PHOTO[:-1]), []) != expected
