"""Schemathesis against a live `uvicorn server.app:app`: every operation of `/openapi.json`, fed
generated valid and invalid requests, answers without a 5xx and as the description says (a documented
status, content type and body schema).

Each operation with ids in its path is fuzzed twice: with generated ids, and with the ids of real
resources (a completed 1x1 image, a batch with an archive, an endpoint and its test message), so that
the checks behind the 404 are reached too. Deletions run last, so the others still find their resource.
Generating the cases is CPU in the test's own process (the server idles on most of them), so the
operations are fuzzed by two processes, one a core: those on images and batches, and the others.

Bounded and repeatable: a fixed number of examples per operation and mode, derandomized (the same cases
on every run), no example database, no shrinking. No worker runs while fuzzing: endpoints the fuzzer
registers (any host, private callbacks being allowed) are never called, and Redis is emptied afterwards.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.transport.requests import ManagedCookiesSession

from server.embedded_redis import EmbeddedRedis
from tests import imagegen
from tests.conftest import Partner
from tests.test_processes import (
    Children,
    create_account,
    free_port,
    poll,
    procfile_command,
    service_env,
    wait_until_ready,
)

EXAMPLES_PER_OPERATION = 50
# No shrinking: a failure is reported as found (with its curl command), within the time bound.
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Nothing listens on the discard port: a delivery there (none is made: no worker runs) would be refused.
UNREACHABLE_URL = "http://127.0.0.1:9/hooks"
# The operations fuzzed in the second process: those on images and batches, about half the time.
OWN_SHARE = ("/v1/images", "/v1/batches")

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")


@dataclass(frozen=True)
class LiveApi:
    base_url: str
    partner: Partner
    # A real resource for each path parameter.
    ids: dict[str, str]


def _seed(base_url: str, partner: Partner) -> dict[str, str]:
    with httpx.Client(base_url=base_url, headers=partner.headers, timeout=10) as http:
        image = http.post("/v1/images", files={"file": ("dot.png", imagegen.png(1, 1), "image/png")})
        assert image.status_code == 202, image.text
        direct = http.post("/v1/uploads", json={"filename": "a.png", "content_type": "image/png", "size": 9})
        assert direct.status_code == 201, direct.text
        batch = http.post("/v1/batches", json={"archive": True})
        assert batch.status_code == 201, batch.text
        endpoint = http.post("/v1/webhook-endpoints", json={"url": UNREACHABLE_URL, "events": ["*"]})
        assert endpoint.status_code == 201, endpoint.text
        message = http.post(f"/v1/webhook-endpoints/{endpoint.json()['id']}/test")
        assert message.status_code == 202, message.text
        image_id = image.json()["id"]
        poll(lambda: http.get(f"/v1/images/{image_id}").json()["status"] == "completed", "processed")
    return {
        "image_id": image_id,
        "upload_id": direct.json()["id"],
        "batch_id": batch.json()["id"],
        "endpoint_id": endpoint.json()["id"],
        "msg_id": message.json()["id"],
    }


@pytest.fixture
def live_api(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[LiveApi]:
    store = redis.Redis.from_url(redis_server.url)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    # A long poll the fuzzer asks for (Prefer: wait=N on a batch never completed) waits 1 s at most.
    env = {**service_env(tmp_path / "data", port, redis_server.url), "DARKROOM_LONG_POLL_MAX_WAIT": "1"}
    children = Children()
    try:
        store.flushall()
        web = children.start("web", procfile_command("web", port), env)
        worker = children.start("worker", procfile_command("worker", port), env)
        wait_until_ready(base_url, [web, worker])
        # Every example is a request: the biggest tier (500 a second), which the fuzzing cannot use up.
        partner = create_account(env, "fuzzer", "--plan", "scale")
        ids = _seed(base_url, partner)
        worker.stop()
        yield LiveApi(base_url, partner, ids)
    finally:
        children.stop_all()
        store.flushall()
        store.close()


def _operations(base_url: str) -> list[Any]:
    """Every operation of the live document, deletions last, so the others still find their resource."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    return sorted(
        (result.ok() for result in schema.get_all_operations()), key=lambda op: op.method == "delete"
    )


def _fuzz(
    api: LiveApi,
    session: ManagedCookiesSession,
    operation: Any,
    mode: GenerationMode,
    path_parameters: dict[str, str],
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @FUZZ_SETTINGS
    def answers_as_described(case: schemathesis.Case) -> None:
        case.call_and_validate(session=session, headers=api.partner.headers, checks=CHECKS, timeout=30)

    answers_as_described()


def _fuzz_share(api: LiveApi, labels: list[str]) -> list[str]:
    """Fuzz the operations named, in the document's order: one share, run in a process of its own."""
    failures: list[str] = []
    # One keep-alive connection for every case: a new one a request was a sixth of the run. Cookies a
    # response sets are dropped after it, as without a session.
    with ManagedCookiesSession() as session:
        for operation in _operations(api.base_url):
            if operation.label not in labels:
                continue
            names = [parameter.name for parameter in operation.path_parameters]
            real = {name: api.ids[name] for name in names}
            runs = [({}, GenerationMode.POSITIVE), ({}, GenerationMode.NEGATIVE)]
            if real:
                runs += [(real, GenerationMode.POSITIVE), (real, GenerationMode.NEGATIVE)]
            for path_parameters, mode in runs:
                try:
                    _fuzz(api, session, operation, mode, path_parameters)
                except (Failure, FailureGroup) as failure:  # one report naming every failing operation
                    ids = f" on {json.dumps(path_parameters)}" if path_parameters else ""
                    failures.append(f"{operation.label} ({mode.value}{ids}): {failure}")
    return failures


def test_every_operation_answers_as_described_without_a_server_error(live_api: LiveApi) -> None:
    operations = _operations(live_api.base_url)
    assert len(operations) > 20
    # Each share holds every operation on its real resources, so that whatever changes one (seal,
    # delete, rotate) runs after the others using it, in the same order as when run one by one.
    shares: tuple[list[str], list[str]] = ([], [])
    for operation in operations:
        shares[operation.path.startswith(OWN_SHARE)].append(operation.label)
    with ProcessPoolExecutor(len(shares), mp_context=multiprocessing.get_context("spawn")) as pool:
        failures = [
            found for share in pool.map(_fuzz_share, [live_api] * len(shares), shares) for found in share
        ]
    assert not failures, "\n\n".join(failures)
