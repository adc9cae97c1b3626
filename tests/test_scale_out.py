"""Several machines: 2 web and 2 worker processes, each with its own empty DARKROOM_DATA_DIR, sharing only
Redis and an S3 bucket (a real S3 API server, moto's, as a separate process), one worker killed -9; every
way in (multipart, direct upload by PUT and by the bucket's form, by URL) spread over both webs."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pyvips
import redis

from server.embedded_redis import EmbeddedRedis
from tests import imagegen
from tests.receiver import Receiver
from tests.s3server import REGION, S3Server
from tests.sources import Reply, SourceServer
from tests.test_processes import (
    RESIZE_TO_160,
    WEBHOOK_TIMEOUT,
    Children,
    create_account,
    free_port,
    poll,
    procfile_command,
    service_env,
    upload,
    wait_until_ready,
)
from tests.test_processes import children as children  # the fixture

PART_SIZE = 5 * 1024 * 1024
# A killed worker's image job is run again once its lock lapses: the job time limit + 40 s.
JOB_TIMEOUT = 1


def on_web(base: str, url: str) -> str:
    """`url` (made with DARKROOM_PUBLIC_URL, the load balancer) sent to the web process at `base`."""
    return base + httpx.URL(url).raw_path.decode()


def create_direct_upload(
    http: httpx.Client, base: str, filename: str, data: bytes, batch_id: str, callback_url: str
) -> dict[str, Any]:
    declared = {"filename": filename, "content_type": "image/jpeg", "size": len(data)}
    created = http.post(
        f"{base}/v1/uploads",
        json={**declared, "operations": RESIZE_TO_160, "batch_id": batch_id, "callback_url": callback_url},
    )
    assert created.status_code == 201, created.text
    upload: dict[str, Any] = created.json()
    return upload


def post_to_bucket(form: dict[str, Any], filename: str, data: bytes) -> str:
    """The form POST an app makes straight to the bucket; the Location the bucket redirects it to."""
    posted = httpx.post(form["url"], data=form["fields"], files={"file": (filename, data)}, timeout=10)
    assert posted.status_code == 303, posted.text
    return posted.headers["location"]


@pytest.fixture
def unanswering_url() -> Iterator[str]:
    """A loopback URL whose port takes connections (the kernel's backlog) and never answers them."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"


def test_two_webs_and_two_workers_share_only_redis_and_the_bucket(
    children: Children,
    redis_server: EmbeddedRedis,
    s3_server: S3Server,
    tmp_path: Path,
    unanswering_url: str,
) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    bucket = s3_server.new_bucket()
    web_ports = [free_port(), free_port()]
    public_url = f"http://127.0.0.1:{web_ports[0]}"

    def env_of(name: str, port: int) -> dict[str, str]:
        return {
            **service_env(tmp_path / name, port, redis_server.url),  # its own data dir, empty
            "DARKROOM_PUBLIC_URL": public_url,
            "DARKROOM_STORAGE_URL": f"s3://{bucket}/shared",
            "DARKROOM_S3_ENDPOINT_URL": s3_server.url,
            "DARKROOM_S3_REGION": REGION,
            "DARKROOM_S3_PART_SIZE": str(PART_SIZE),
            "DARKROOM_MAX_UPLOAD_BYTES": str(4 * PART_SIZE),
            "DARKROOM_JOB_TIMEOUT": str(JOB_TIMEOUT),
        }

    webs = [
        children.start(f"web{i}", procfile_command("web", port), env_of(f"web{i}", port))
        for i, port in enumerate(web_ports)
    ]
    # The first worker reaches the bucket through a port that takes connections and never answers: it
    # is surely mid-job (reading the original) when killed, where a quick render on a loaded machine
    # could end between two looks at the image's status.
    doomed_env = {**env_of("worker0", 0), "DARKROOM_S3_ENDPOINT_URL": unanswering_url}
    doomed = children.start("worker0", procfile_command("worker", 0), doomed_env)
    bases = [f"http://127.0.0.1:{port}" for port in web_ports]
    for base in bases:
        wait_until_ready(base, [*webs, doomed])
    account = create_account(env_of("cli", 0), "scale-out")
    receiver = Receiver(account.webhook_secret).start()
    source = SourceServer().start()
    try:
        noise = pyvips.Image.gaussnoise(1800, 1400).bandjoin([pyvips.Image.gaussnoise(1800, 1400)] * 2)
        large = noise.cast("uchar").jpegsave_buffer(Q=100)
        assert len(large) > PART_SIZE  # goes up in parts
        first = upload(bases[1], account, large, RESIZE_TO_160, receiver.url)
        with httpx.Client(timeout=10, headers=account.headers) as http:
            poll(
                lambda: http.get(f"{bases[0]}/v1/images/{first['id']}").json()["status"] == "processing",
                "the first worker holding the large image",
            )
        os.kill(doomed.pid, signal.SIGKILL)  # mid-job: another worker runs it again once its lock lapses
        # The second worker, and the first one restarted (as a supervisor would) on its own data dir.
        workers = [
            children.start(name, procfile_command("worker", 0), env_of(folder, 0))
            for name, folder in (("worker1", "worker1"), ("worker0-again", "worker0"))
        ]
        images = [first] + [
            upload(bases[index % 2], account, imagegen.jpeg(640, 480), RESIZE_TO_160, receiver.url)
            for index in range(7)
        ]
        assert all(worker.process.poll() is None for worker in workers)

        with httpx.Client(timeout=10, headers=account.headers) as http:
            batch = http.post(f"{bases[0]}/v1/batches", json={"archive": True, "callback_url": receiver.url})
            batch_id = batch.json()["id"]
            parts = [("file", (f"p{i}.jpg", imagegen.jpeg(320, 240), "image/jpeg")) for i in range(3)]
            added = http.post(
                f"{bases[1]}/v1/batches/{batch_id}/images",
                files=parts,
                data={"operations": json.dumps(RESIZE_TO_160), "callback_url": receiver.url},
            )
            assert added.status_code == 202, added.text
            images += added.json()["data"]
            for index in range(2):  # created on one web, the bytes PUT to the other
                name = f"put{index}.jpg"
                photo = imagegen.jpeg(320, 240)
                made = create_direct_upload(http, bases[index], name, photo, batch_id, receiver.url)
                put = http.put(on_web(bases[1 - index], made["upload_url"]), content=photo)
                assert put.status_code == 200, put.text
                images.append(made["image"])
            for index in range(2):  # straight to the bucket, the redirect followed on the other web
                name = f"form{index}.jpg"
                photo = imagegen.jpeg(320, 240)
                made = create_direct_upload(http, bases[index], name, photo, batch_id, receiver.url)
                landed = http.get(on_web(bases[1 - index], post_to_bucket(made["upload_form"], name, photo)))
                assert landed.status_code == 200, landed.text
                images.append(made["image"])
            for index in range(2):
                url = source.serve(f"/listing/url{index}.jpg", Reply(body=imagegen.jpeg(320, 240)))
                fetched = http.post(
                    f"{bases[index]}/v1/images",
                    json={
                        "source_url": url,
                        "operations": RESIZE_TO_160,
                        "batch_id": batch_id,
                        "callback_url": receiver.url,
                    },
                )
                assert fetched.status_code == 202, fetched.text
                images.append(fetched.json())
            assert http.post(f"{bases[0]}/v1/batches/{batch_id}/seal").status_code == 200

            def settled() -> bool:
                arrived = {(d.event["type"], d.event["data"]["id"]) for d in receiver.deliveries}
                wanted = {("image.completed", image["id"]) for image in images}
                return wanted <= arrived and ("batch.archive.ready", batch_id) in arrived

            poll(settled, "every webhook", WEBHOOK_TIMEOUT + 2 * (JOB_TIMEOUT + 40))
            ids_by_event: dict[tuple[str, str], set[str]] = defaultdict(set)
            for delivery in receiver.deliveries:
                assert delivery.verified
                event = delivery.event
                ids_by_event[(event["type"], event["data"]["id"])].add(delivery.headers["webhook-id"])
            assert all(len(ids) == 1 for ids in ids_by_event.values()), ids_by_event
            rerun = http.get(f"{bases[0]}/v1/images/{first['id']}").json()
            assert rerun["status"] == "completed" and rerun["attempts"] == 2  # the killed run, then one more

            for index, image in enumerate(images):  # every output from the web that did not take it
                output = http.get(f"{bases[(index + 1) % 2]}/v1/images/{image['id']}/output")
                assert output.status_code == 200
                assert pyvips.Image.new_from_buffer(output.content, "").width == 160
            original = http.get(f"{bases[1]}/v1/images/{images[0]['id']}/original")
            assert original.content == large

            archive_url = poll(
                lambda: http.get(f"{bases[1]}/v1/batches/{batch_id}").json()["archive"]["url"], "archive url"
            )
            whole = http.get(on_web(bases[1], archive_url))  # the batch was made on web 0
            with zipfile.ZipFile(io.BytesIO(whole.content)) as archive:
                names = ["p0.jpg", "p1.jpg", "p2.jpg", "put0.jpg", "put1.jpg", "form0.jpg", "form1.jpg"]
                assert sorted(archive.namelist()) == sorted(["_report.json", *names, "url0.jpg", "url1.jpg"])
                assert json.loads(archive.read("_report.json"))["archived"] == 9
            part = http.get(on_web(bases[1], archive_url), headers={"Range": "bytes=100-199"})
            assert part.status_code == 206 and part.content == whole.content[100:200]
    finally:
        receiver.stop()
        source.stop()
    for folder in ("web0", "web1", "worker0", "worker1"):  # each one's scratch, and nothing else
        assert {p.name for p in (tmp_path / folder).iterdir()} <= {".staging"}
