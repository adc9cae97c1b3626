"""Direct upload against a multipart upload of the same photo: upload → webhook latency, same run.

    python benchmarks/direct_upload.py [--rounds 30] [--photo-source corpus|tiny|2k] [--cpu-requests 300]
                                       [--storage local|s3] [--profile web]

It starts what production runs (an embedded redis-server, `uvicorn server.app:app`, one arq worker) as
child processes (benchmarks/throughput.py's), then, one image at a time, taking turns:

- multipart: `POST /v1/images` with the file and the operations, sent → signed webhook received;
- direct: `POST /v1/uploads` with the operations, then `PUT` of the bytes to its upload_url, create sent
  → webhook received (and the create's own round trip, and PUT sent → webhook);
- a plain API request, `GET /v1/images/{id}`, timed the same way (its JSON answer decoded, as the
  create's is): the unit "one request of latency".

Same photo, same resize-to-512 + JPEG q80 chain, one keep-alive connection. Prints one JSON object;
issue 12's goal: direct p50 - multipart p50 ≤ one request's p50 (`extra_over_multipart_ms` against
`plain_request_ms`); read strictly, the create itself costs at most one request (`create_in_requests`
≤ 1). Those are latencies of a few ms, which a loaded machine moves by as much. After the rounds,
--cpu-requests creates (their bytes never sent) and plain GETs taking turns with nothing else in flight
(`create_in_requests_idle`: in the rounds each request follows a webhook, while the service still ends
that image's job and records its delivery on the same cores), also as the web's request log times them
(`create_in_requests_idle_in_service`: request start to answer sent, without the client library's
encoding of the create's body and decoding of its 2.5 KB answer), then `web_cpu_ms_per_request`, the web's
CPU per create and per plain GET, --cpu-requests of each: the handler's own work. `--profile web` runs
the web under py-spy and keeps its stacks. `--storage s3` stores blobs on an S3 API server (moto's, a
separate process, as the tests start it): the create then also signs the upload's presigned POST form;
the PUT goes through Darkroom to the bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from photos import find_photos
from throughput import (
    BOUNDARY,
    OPERATIONS,
    Receiver,
    Service,
    create_account,
    log,
    multipart_body,
    percentile,
    running_service,
    wait_ready,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' S3 server helper, reused rather than copied
from tests.s3server import CREDENTIALS, REGION, S3Server  # noqa: E402

# The request ids of the idle phase's requests, found again in the web's request log.
IDLE_CREATE, IDLE_PLAIN = "bench-idle-create-", "bench-idle-plain-"


def summary(seconds: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(seconds) * 1000, 2),
        "p95": round(percentile(seconds, 0.95) * 1000, 2),
    }


def declared_upload(size: int, callback_url: str) -> dict[str, Any]:
    """The body of `POST /v1/uploads` for the photo."""
    return {
        "filename": "photo.jpg",
        "content_type": "image/jpeg",
        "size": size,
        "operations": json.loads(OPERATIONS),
        "callback_url": callback_url,
    }


async def multipart_once(
    session: aiohttp.ClientSession, base_url: str, headers: dict[str, str], body: bytes, receiver: Receiver
) -> float:
    sent = time.time()
    form = {**headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    async with session.post(f"{base_url}/v1/images", data=body, headers=form) as response:
        assert response.status == 202, await response.text()
        image_id = (await response.json())["id"]
    return await receiver.wait(image_id) - sent


async def direct_once(
    session: aiohttp.ClientSession,
    base_url: str,
    headers: dict[str, str],
    photo: bytes,
    receiver: Receiver,
) -> tuple[float, float, float]:
    """(create sent → webhook, the create's round trip, PUT sent → webhook)."""
    create = declared_upload(len(photo), receiver.url)
    sent = time.time()
    async with session.post(f"{base_url}/v1/uploads", json=create, headers=headers) as response:
        assert response.status == 201, await response.text()
        created = await response.json()
    put_sent = time.time()
    async with session.put(created["upload_url"], data=photo, headers=created["upload_headers"]) as response:
        assert response.status == 200, await response.text()
    arrived = await receiver.wait(created["image"]["id"])
    return arrived - sent, put_sent - sent, arrived - put_sent


async def plain_request_once(
    session: aiohttp.ClientSession, base_url: str, headers: dict[str, str], image_id: str
) -> float:
    sent = time.perf_counter()
    async with session.get(f"{base_url}/v1/images/{image_id}", headers=headers) as response:
        assert response.status == 200
        # Read as the create's answer is read (a client uses either): decoded JSON.
        await response.json()
    return time.perf_counter() - sent


async def idle_latencies(
    session: aiohttp.ClientSession,
    base_url: str,
    headers: dict[str, str],
    image_id: str,
    receiver_url: str,
    count: int,
) -> tuple[list[float], list[float]]:
    """`count` creates (their bytes never sent) and plain GETs, taking turns with nothing else in flight:
    in the rounds, each request follows a webhook, and the service's work on that image (the worker
    ending its job, the dispatcher recording the delivery) still shares the cores with it."""
    create = declared_upload(1000, receiver_url)
    creates: list[float] = []
    plain: list[float] = []
    for index in range(count):
        tagged = {**headers, "X-Request-Id": f"{IDLE_CREATE}{index}"}
        sent = time.perf_counter()
        async with session.post(f"{base_url}/v1/uploads", json=create, headers=tagged) as response:
            assert response.status == 201, await response.text()
            await response.json()
        creates.append(time.perf_counter() - sent)
        tagged = {**headers, "X-Request-Id": f"{IDLE_PLAIN}{index}"}
        plain.append(await plain_request_once(session, base_url, tagged, image_id))
    return creates, plain


def in_service_seconds(web_log: Path) -> dict[str, list[float]]:
    """The idle creates' and plain GETs' time in the web (its request log's `latency_ms`: from the
    request's start to its answer's last byte handed to the socket), by the request ids they were sent
    with. What the client library spends sending and decoding is not in it."""
    seconds: dict[str, list[float]] = {IDLE_CREATE: [], IDLE_PLAIN: []}
    for line in web_log.read_text(errors="replace").splitlines():
        if '"latency_ms"' not in line:
            continue
        entry = json.loads(line)
        for tag, found in seconds.items():
            if entry.get("request_id", "").startswith(tag):
                found.append(entry["latency_ms"] / 1000)
    return seconds


async def web_cpu_per_request(
    session: aiohttp.ClientSession,
    service: Service,
    headers: dict[str, str],
    image_id: str,
    receiver_url: str,
    count: int,
) -> dict[str, float]:
    """The web process's CPU ms per create (`POST /v1/uploads`, its bytes never sent) and per plain
    `GET /v1/images/{id}`, `count` of each one after another: latency under a loaded machine varies
    more than the handler's own work."""
    create = declared_upload(1000, receiver_url)
    before = service.cpu()["web"]
    for _ in range(count):
        async with session.post(f"{service.base_url}/v1/uploads", json=create, headers=headers) as response:
            assert response.status == 201, await response.text()
            await response.read()
    creates = service.cpu()["web"] - before
    before = service.cpu()["web"]
    for _ in range(count):
        async with session.get(f"{service.base_url}/v1/images/{image_id}", headers=headers) as response:
            assert response.status == 200
            await response.read()
    gets = service.cpu()["web"] - before
    return {"create": round(creates * 1000 / count, 2), "get": round(gets * 1000 / count, 2)}


async def run(
    rounds: int,
    photo_path: Path,
    work_dir: Path,
    cpu_requests: int,
    profile: str | None,
    storage_env: dict[str, str],
) -> dict[str, Any]:
    photo = await asyncio.to_thread(photo_path.read_bytes)
    with running_service(work_dir, None, profile, extra_env=storage_env) as service:
        account = create_account(service.env)
        headers = {"Authorization": f"Bearer {account['api_key']}"}
        receiver = Receiver(account["webhook_secret"])
        await receiver.start()
        body = multipart_body(photo, receiver.url)
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, service)
            # Warm-up: the first of each kind pays for imports and connections.
            await multipart_once(session, service.base_url, headers, body, receiver)
            await direct_once(session, service.base_url, headers, photo, receiver)
            multipart: list[float] = []
            direct: list[float] = []
            creates: list[float] = []
            after_put: list[float] = []
            plain: list[float] = []
            image_id = ""
            for round_index in range(rounds):
                multipart.append(await multipart_once(session, service.base_url, headers, body, receiver))
                total, create, put_to_hook = await direct_once(
                    session, service.base_url, headers, photo, receiver
                )
                direct.append(total)
                creates.append(create)
                after_put.append(put_to_hook)
                if not image_id:
                    image_id = next(iter(receiver.arrived))
                plain.append(await plain_request_once(session, service.base_url, headers, image_id))
                log(f"round {round_index + 1}/{rounds}")
            idle_creates, idle_plain = await idle_latencies(
                session, service.base_url, headers, image_id, receiver.url, cpu_requests
            )
            web_cpu_ms = await web_cpu_per_request(
                session, service, headers, image_id, receiver.url, cpu_requests
            )
        await receiver.stop()
    in_service = in_service_seconds(service.logs / "web.log")
    multipart_ms, direct_ms, plain_ms = summary(multipart), summary(direct), summary(plain)
    extra = round(direct_ms["p50"] - multipart_ms["p50"], 2)
    return {
        "photo": str(photo_path),
        "photo_bytes": len(photo),
        "rounds": rounds,
        "multipart_upload_to_webhook_ms": multipart_ms,
        "direct_create_to_webhook_ms": direct_ms,
        "direct_create_request_ms": summary(creates),
        "direct_put_to_webhook_ms": summary(after_put),
        "plain_request_ms": plain_ms,
        "extra_over_multipart_ms": extra,
        "extra_in_requests": round(extra / plain_ms["p50"], 2) if plain_ms["p50"] else None,
        "create_in_requests": round(statistics.median(creates) / statistics.median(plain), 2),
        "goal_met": extra <= plain_ms["p50"],
        "idle_create_request_ms": summary(idle_creates),
        "idle_plain_request_ms": summary(idle_plain),
        "create_in_requests_idle": round(statistics.median(idle_creates) / statistics.median(idle_plain), 2),
        "idle_in_service_ms": {
            "create": summary(in_service[IDLE_CREATE]),
            "plain_request": summary(in_service[IDLE_PLAIN]),
        },
        "create_in_requests_idle_in_service": round(
            statistics.median(in_service[IDLE_CREATE]) / statistics.median(in_service[IDLE_PLAIN]), 2
        ),
        "web_cpu_ms_per_request": web_cpu_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--photo-source", choices=["corpus", "tiny", "2k"], default="corpus")
    parser.add_argument(
        "--cpu-requests", type=int, default=300, help="creates, then GETs, whose web CPU is measured"
    )
    parser.add_argument("--storage", choices=["local", "s3"], default="local")
    parser.add_argument("--profile", choices=["web"], help="run the web under py-spy (stacks kept in /tmp)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="darkroom-direct-upload-"))
        photos, where = find_photos(Path(scratch) / "photos", args.photo_source)
        log(f"photo: {photos[0]} (from {where})")
        storage_env: dict[str, str] = {}
        if args.storage == "s3":
            os.environ.update(CREDENTIALS)  # the AWS chain of the service's processes reads them
            s3_server = S3Server().start()
            stack.callback(s3_server.stop)
            storage_env = {
                "DARKROOM_STORAGE_URL": f"s3://{s3_server.new_bucket()}/darkroom",
                "DARKROOM_S3_ENDPOINT_URL": s3_server.url,
                "DARKROOM_S3_REGION": REGION,
            }
        kept = tempfile.mkdtemp(prefix="darkroom-direct-upload-profile-") if args.profile else None
        service_dir = None if kept is None else Path(kept)
        result = asyncio.run(
            run(
                args.rounds,
                photos[0],
                service_dir or Path(scratch) / "service",
                args.cpu_requests,
                args.profile,
                storage_env,
            )
        )
        result["storage"] = args.storage
        if service_dir is not None:
            log(f"profile in {service_dir / 'logs' / 'web.folded'}")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
