"""End to end with the real processes: `uvicorn server.app:app`, `arq jobs.worker.WorkerSettings`,
`darkroom dev`, `darkroom accounts create` and `darkroom webhooks listen`, each a child process talking
over real sockets, with a real receiver verifying signatures with the `standardwebhooks` package.

Nothing here sleeps for a fixed time: tests wait on the receiver, on a child's output, or poll an
endpoint until a bounded deadline. Every child runs in its own session and is stopped (its whole process
group killed if need be) when the test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import pyvips
import redis

from jobs.settings import Settings
from server import cli, dev
from server.children import child_process_options
from server.embedded_redis import EmbeddedRedis, find_redis_server
from tests import imagegen
from tests.conftest import CORPUS, Partner
from tests.receiver import Answer, Delivery, Receiver
from tests.s3server import REGION, S3Server
from tests.sources import Reply, SourceServer
from tests.test_observability import parsed_metrics, sample

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0
WEBHOOK_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
RETRY_SCHEDULE = "0.05,0.05,0.05"

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Child:
    """A child process whose combined stdout and stderr are read line by line on a thread."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str]) -> None:
        self.name = name
        self.process = subprocess.Popen(
            list(args),
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own process group, so teardown can stop every descendant; gone if pytest is killed.
            **child_process_options(),
        )
        self.lines: list[str] = []
        self._new_lines: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None
        self._stdout: IO[bytes] = self.process.stdout
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        for raw in self._stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            self._new_lines.put(line)
        self._new_lines.put(None)

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first line (from now on) matching `pattern`; fails when the child exits or time runs out."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._new_lines.get(timeout=max(remaining, 0))
            except queue.Empty:
                raise AssertionError(
                    f"{self.name}: no line matching {pattern!r} within {timeout:g} s:\n{self.output()}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"{self.name} exited ({self.process.poll()}) before {pattern!r}:\n{self.output()}"
                )
            match = compiled.search(line)
            if match:
                return match

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the process only (not its group)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def stop(self) -> None:
        """SIGINT, then SIGKILL to the whole group if it lingers; always reaps and closes the pipe."""
        try:
            self.interrupt()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT)
        finally:
            _kill_group(self.process.pid)
            self.process.wait()
            self._reader.join(STOP_TIMEOUT)
            self._stdout.close()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # gone: every member has exited
        os.killpg(pgid, signal.SIGKILL)


class Children:
    """Starts children for one test; stops all of them at teardown, whatever happened."""

    def __init__(self) -> None:
        self.started: list[Child] = []

    def start(self, name: str, args: Sequence[str], env: dict[str, str]) -> Child:
        child = Child(name, args, env)
        self.started.append(child)
        return child

    def stop_all(self) -> None:
        errors: list[BaseException] = []
        for child in reversed(self.started):
            try:
                child.stop()
            except BaseException as exc:  # stop the others before reporting
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def children() -> Iterator[Children]:
    started = Children()
    try:
        yield started
    finally:
        started.stop_all()


def base_env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DARKROOM_", "REDIS_URL", "PORT"))}
    return {
        **env,
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
        "DARKROOM_DATA_DIR": str(data_dir),
        "PORT": str(port),
        "DARKROOM_RETRY_SCHEDULE": RETRY_SCHEDULE,
    }


ALLOW_PRIVATE = {"DARKROOM_ALLOW_PRIVATE_CALLBACKS": "1"}  # our receivers listen on loopback


def service_env(data_dir: Path, port: int, redis_url: str) -> dict[str, str]:
    """What web and worker processes of a test service share: its Redis, its own URL for links, and
    callbacks to loopback receivers allowed."""
    return {
        **base_env(data_dir, port),
        "REDIS_URL": redis_url,
        "DARKROOM_PUBLIC_URL": f"http://127.0.0.1:{port}",
        **ALLOW_PRIVATE,
    }


def procfile_command(process: str, port: int) -> list[str]:
    """The Procfile's line for `process`, run from this venv and listening on loopback only."""
    for line in (REPO / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name == process:
            words = command.replace("${PORT:-8000}", str(port)).replace("0.0.0.0", "127.0.0.1").split()
            return [str(BIN / words[0]), *words[1:]]
    raise AssertionError(f"the Procfile has no {process!r} line")


def wait_until_ready(base_url: str, watched: Sequence[Child], timeout: float = START_TIMEOUT) -> None:
    """Poll /readyz until it answers 200 (bounded); fail early if a child exits."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, timeout=2) as http:
        while True:
            for child in watched:
                if child.process.poll() is not None:
                    raise AssertionError(
                        f"{child.name} exited with {child.process.returncode}:\n{child.output()}"
                    )
            try:
                if http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {child.name}\n{child.output()}" for child in watched)
                raise AssertionError(f"{base_url}/readyz not ready within {timeout:g} s\n{logs}")
            time.sleep(0.05)


def poll(check: Callable[[], Any], what: str, timeout: float = WEBHOOK_TIMEOUT) -> Any:
    """`check()` until it returns something truthy, within a bounded deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout:g} s")
        time.sleep(0.05)


def answers_health(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def create_account(env: dict[str, str], name: str, *plan: str) -> Partner:
    """An account made with `darkroom accounts create`; `plan` its plan flags (`--plan scale`, …)."""
    done = subprocess.run(
        [str(BIN / "darkroom"), "accounts", "create", "--name", name, "--json", *plan],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    assert set(created) == {"account_id", "api_key", "webhook_secret"}
    assert created["api_key"].startswith("sk_live_")
    assert created["webhook_secret"].startswith("whsec_")
    return Partner(created["account_id"], created["api_key"], created["webhook_secret"])


def upload(
    base_url: str, account: Partner, data: bytes, operations: list[dict[str, Any]], callback_url: str
) -> dict[str, Any]:
    with httpx.Client(base_url=base_url, timeout=10) as http:
        response = http.post(
            "/v1/images",
            headers=account.headers,
            files={"file": ("photo.jpg", data, "image/jpeg")},
            data={"operations": json.dumps(operations), "callback_url": callback_url},
        )
    assert response.status_code == 202, response.text
    image: dict[str, Any] = response.json()
    return image


RESIZE_TO_160 = [
    {"type": "resize", "params": {"width": 160}},
    {"type": "convert", "params": {"format": "jpeg"}},
]


def check_output(base_url: str, account: Partner, image_id: str, size: tuple[int, int]) -> None:
    with httpx.Client(base_url=base_url, timeout=10) as http:
        output = http.get(f"/v1/images/{image_id}/output", headers=account.headers)
    assert output.status_code == 200, output.text
    assert output.headers["content-type"] == "image/jpeg"
    decoded = pyvips.Image.new_from_buffer(output.content, "")
    assert (decoded.width, decoded.height) == size


@dataclass(frozen=True)
class Stack:
    """`web` and `worker` as the Procfile runs them."""

    base_url: str
    env: dict[str, str]
    web: Child
    worker: Child


@pytest.fixture
def stack(children: Children, redis_server: EmbeddedRedis, tmp_path: Path) -> Stack:
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()  # nothing left over from in-process tests reaches these workers
    finally:
        client.close()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = service_env(tmp_path / "data", port, redis_server.url)
    web = children.start("web", procfile_command("web", port), env)
    worker = children.start("worker", procfile_command("worker", port), env)
    wait_until_ready(base_url, [web, worker])
    return Stack(base_url, env, web, worker)


def test_web_and_worker_processes_deliver_a_signed_webhook(stack: Stack) -> None:
    account = create_account(stack.env, "partner")
    receiver = Receiver(account.webhook_secret).start()
    try:
        image = upload(stack.base_url, account, imagegen.jpeg(640, 480), RESIZE_TO_160, receiver.url)
        (delivery,) = receiver.wait_for(1, WEBHOOK_TIMEOUT)
    finally:
        receiver.stop()
    assert delivery.verified
    assert delivery.answered == 200
    assert delivery.headers["webhook-id"].startswith("msg_")
    event = delivery.event
    assert event["type"] == "image.completed"
    assert event["data"]["id"] == image["id"]
    assert event["data"]["status"] == "completed"
    assert event["data"]["output"]["url"] == f"{stack.base_url}/v1/images/{image['id']}/output"
    check_output(stack.base_url, account, image["id"], (160, 120))


def test_the_procfile_worker_fetches_a_source_url(stack: Stack) -> None:
    """As deployed: `arq jobs.worker.WorkerSettings` on uvloop, its fetch pool made at start-up."""
    account = create_account(stack.env, "partner")
    receiver = Receiver(account.webhook_secret).start()
    source = SourceServer().start()
    try:
        url = source.serve("/big/photo.jpg", Reply(body=imagegen.jpeg(640, 480)))
        with httpx.Client(base_url=stack.base_url, headers=account.headers, timeout=10) as http:
            accepted = http.post(
                "/v1/images",
                json={"source_url": url, "operations": RESIZE_TO_160, "callback_url": receiver.url},
            )
            assert accepted.status_code == 202, accepted.text
            (delivery,) = receiver.wait_for(1, WEBHOOK_TIMEOUT)
    finally:
        receiver.stop()
        source.stop()
    assert delivery.verified
    assert delivery.event["type"] == "image.completed", delivery.event["data"]["error"]
    assert delivery.event["data"]["input"]["filename"] == "photo.jpg"
    check_output(stack.base_url, account, accepted.json()["id"], (160, 120))


def test_the_worker_renders_a_single_photo_in_its_express_lane_beside_a_backlog(stack: Stack) -> None:
    """The Procfile's worker runs a bulk lane as its child, at a lower CPU priority: another account's
    backlog goes there, a single photo to the worker's own express lane; and the lane ends with it."""
    bulk_lane = poll(lambda: bulk_lane_of(stack.worker.pid), "the worker's bulk lane")
    lowered_by = Settings.from_env(stack.env).bulk_nice
    lowered = min(os.getpriority(os.PRIO_PROCESS, stack.worker.pid) + lowered_by, 19)
    # It lowers its own priority as it starts.
    poll(lambda: os.getpriority(os.PRIO_PROCESS, bulk_lane) == lowered, "the bulk lane's lower priority")
    flood, single = create_account(stack.env, "flood"), create_account(stack.env, "single")
    receivers = [Receiver(flood.webhook_secret).start(), Receiver(single.webhook_secret).start()]
    photo = imagegen.jpeg(1600, 1200)
    # Work enough at full size that the flood's images are in processing together.
    slow = [{"type": "denoise", "params": {"level": 1}}, *RESIZE_TO_160]
    try:
        with ThreadPoolExecutor(max_workers=6) as senders:
            flood_url = receivers[0].url
            sent = [senders.submit(upload, stack.base_url, flood, photo, slow, flood_url) for _ in range(6)]
            alone = upload(stack.base_url, single, photo, RESIZE_TO_160, receivers[1].url)
            backlog = [sending.result() for sending in sent]
        receivers[0].wait_for(len(backlog), WEBHOOK_TIMEOUT)
        receivers[1].wait_for(1, WEBHOOK_TIMEOUT)
    finally:
        for receiver in receivers:
            receiver.stop()

    lanes = {image["id"]: lane_that_processed(stack.worker, image["id"]) for image in [*backlog, alone]}
    assert lanes[alone["id"]] == "express", lanes
    assert "bulk" in {lanes[image["id"]] for image in backlog}, lanes
    os.kill(stack.worker.pid, signal.SIGKILL)
    poll(lambda: not alive(bulk_lane), "the bulk lane to end with its worker")


def bulk_lane_of(worker: int) -> int | None:
    commands = descendants(worker).items()
    return next((pid for pid, command in commands if "jobs.worker.BulkWorkerSettings" in command), None)


def lane_that_processed(worker: Child, image_id: str) -> str | None:
    """From the worker's log line as the job starts (its bulk lane logs to the same output)."""
    for line in json_lines(worker):
        if line.get("image_id") == image_id and line["message"].startswith("processing"):
            return str(line.get("lane"))
    return None


def test_failed_delivery_is_retried_with_the_same_message_id(stack: Stack) -> None:
    account = create_account(stack.env, "flaky")
    receiver = Receiver(account.webhook_secret).start()
    receiver.script(500)
    try:
        upload(stack.base_url, account, imagegen.jpeg(320, 240), RESIZE_TO_160, receiver.url)
        first, second = receiver.wait_for(2, WEBHOOK_TIMEOUT)
    finally:
        receiver.stop()
    assert (first.answered, second.answered) == (500, 200)
    assert first.verified and second.verified
    msg_id = first.headers["webhook-id"]
    assert second.headers["webhook-id"] == msg_id
    assert first.body == second.body

    def delivered() -> dict[str, Any] | None:
        with httpx.Client(base_url=stack.base_url, timeout=5) as http:
            log: dict[str, Any] = http.get(f"/v1/deliveries/{msg_id}", headers=account.headers).json()
        return log if log["status"] == "delivered" else None

    # The receiver sees the second attempt a moment before the worker records its answer.
    log = poll(delivered, "recorded as delivered")
    assert [attempt["status_code"] for attempt in log["destinations"][0]["attempts"]] == [500, 200]


def json_lines(child: Child) -> list[dict[str, Any]]:
    """The child's log lines, each a JSON object (what else it printed left out)."""
    return [json.loads(line) for line in child.lines if line.startswith("{")]


def test_a_request_id_follows_an_image_into_worker_and_dispatcher_logs(stack: Stack) -> None:
    """Web and worker log JSON lines (no DARKROOM_LOG_FORMAT: the default outside `darkroom dev`); the
    request id a client sends is in the web's line for its request, and in the worker's lines for the
    job and for each webhook attempt."""
    account = create_account(stack.env, "traced")
    receiver = Receiver(account.webhook_secret).start()
    receiver.script(500)
    try:
        with httpx.Client(base_url=stack.base_url, timeout=10) as http:
            accepted = http.post(
                "/v1/images",
                headers={**account.headers, "X-Request-Id": "trace-42"},
                files={"file": ("photo.jpg", imagegen.jpeg(320, 240), "image/jpeg")},
                data={"operations": json.dumps(RESIZE_TO_160), "callback_url": receiver.url},
            )
        assert accepted.status_code == 202, accepted.text
        assert accepted.headers["x-request-id"] == "trace-42"
        image_id = accepted.json()["id"]
        first, _ = receiver.wait_for(2, WEBHOOK_TIMEOUT)
    finally:
        receiver.stop()
    msg_id = first.headers["webhook-id"]

    def attempts_logged() -> list[dict[str, Any]]:
        attempts = [line for line in json_lines(stack.worker) if line.get("msg_id") == msg_id]
        return attempts if len([line for line in attempts if "status_code" in line]) == 2 else []

    attempts = [line for line in poll(attempts_logged, "both attempts logged") if "status_code" in line]
    assert [(line["status_code"], line["outcome"]) for line in attempts] == [
        (500, "pending"),
        (200, "delivered"),
    ]
    for line in attempts:
        assert line["request_id"] == "trace-42"
        assert line["image_id"] == image_id
        assert line["latency_ms"] >= 0

    job = [line for line in json_lines(stack.worker) if line.get("image_id") == image_id]
    started = next(line for line in job if "queue_wait_ms" in line)
    finished = next(line for line in job if "render_ms" in line)
    assert started["request_id"] == finished["request_id"] == "trace-42"
    assert started["account_id"] == finished["account_id"] == account.id
    assert started["queue_wait_ms"] >= 0
    assert finished["outcome"] == "completed"
    assert finished["render_ms"] > 0
    assert finished["msg_id"] == msg_id

    (request_line,) = [line for line in json_lines(stack.web) if line.get("request_id") == "trace-42"]
    assert request_line["method"] == "POST"
    assert request_line["route"] == "/v1/images"
    assert request_line["status"] == 202
    assert request_line["account_id"] == account.id
    assert request_line["latency_ms"] > 0
    assert request_line["bytes_in"] > 0
    assert request_line["bytes_out"] == len(accepted.content)
    # uvicorn's own access line is off: ours is the only one for the request.
    assert not any("POST /v1/images" in line for line in stack.web.lines if not line.startswith("{"))

    # The web's /metrics shows what the worker, another process, observed.
    with httpx.Client(base_url=stack.base_url, timeout=5) as http:
        samples = parsed_metrics(http.get("/metrics").text)
    assert samples[sample("darkroom_upload_to_webhook_seconds_count")] == 1
    assert samples[sample("darkroom_webhook_attempt_seconds_count")] == 2
    assert samples[sample("darkroom_render_seconds_count")] == 1


def test_webhooks_listen_verifies_and_prints_callback_and_endpoint_deliveries(
    stack: Stack, children: Children
) -> None:
    """The README's tour: one listener, given the callback secret and an endpoint's, hears both."""
    account = create_account(stack.env, "listener")
    port = free_port()
    listener_url = f"http://127.0.0.1:{port}/"
    with httpx.Client(base_url=stack.base_url, headers=account.headers, timeout=10) as http:
        created = http.post(
            "/v1/webhook-endpoints", json={"url": listener_url, "events": ["image.completed"]}
        )
    assert created.status_code == 201, created.text
    endpoint = created.json()
    listener = children.start(
        "listen",
        [
            str(BIN / "darkroom"),
            "webhooks",
            "listen",
            "--secret",
            f"callback={account.webhook_secret}",
            "--secret",
            f"{endpoint['id']}={endpoint['secret']}",
            "--port",
            str(port),
        ],
        stack.env,
    )
    listener.wait_for_line(rf"Listening for Darkroom webhooks on http://127\.0\.0\.1:{port}/")

    forged = httpx.post(
        listener_url,
        content=b'{"type":"image.completed"}',
        headers={
            "webhook-id": "msg_forged",
            "webhook-timestamp": str(int(time.time())),
            "webhook-signature": "v1,AAAA",
        },
    )
    assert forged.status_code == 400
    listener.wait_for_line(r"✗ rejected msg_forged: no signature matches any of the 2 secrets")

    image = upload(stack.base_url, account, imagegen.jpeg(320, 240), RESIZE_TO_160, listener_url)
    heard = r"✓ image\.completed (msg_\S+) (img_\S+) completed \[(\S+)\]"
    first = listener.wait_for_line(heard, WEBHOOK_TIMEOUT)
    second = listener.wait_for_line(heard, WEBHOOK_TIMEOUT)
    assert {first.group(3), second.group(3)} == {"callback", endpoint["id"]}
    assert first.group(1) == second.group(1)
    assert first.group(2) == second.group(2) == image["id"]
    listener.wait_for_line(r'"type": "image.completed"')


def descendants(root: int) -> dict[int, str]:
    """Every live descendant of `root`, with its command line (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = _cmdline(pid)
                frontier.append(pid)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass(frozen=True)
class DevSession:
    child: Child
    base_url: str
    account: Partner
    created: bool


def start_dev(children: Children, data_dir: Path, *, as_a_script_would: bool = False) -> DevSession:
    """`darkroom dev` with nothing but a data dir and a port: its own Redis, web and worker. A script
    running it in its background (`darkroom dev &`) starts it with SIGINT ignored, as a shell does."""
    port = free_port()
    env = base_env(data_dir, port)
    command = [str(BIN / "darkroom"), "dev", "--port", str(port)]
    if as_a_script_would:
        command = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command]
    child = children.start("darkroom dev", command, env)
    created = child.wait_for_line(r"(Created|Using) the dev account").group(1) == "Created"
    key = child.wait_for_line(r"API key:\s+(sk_live_\S+)").group(1)
    secret = child.wait_for_line(r"Webhook secret:\s+(whsec_\S+)").group(1)
    base_url = f"http://127.0.0.1:{port}"
    wait_until_ready(base_url, [child])
    return DevSession(child, base_url, Partner("", key, secret), created)


def stop_dev(dev: DevSession, *, whole_group: bool, signum: int = signal.SIGINT) -> None:
    """Ctrl-C (to the process, or to its process group as a terminal does), or another signal to the
    process; everything must exit."""
    running = descendants(dev.child.pid)
    commands = " | ".join(running.values())
    assert "redis-server" in commands and "uvicorn" in commands and "arq" in commands, commands
    if whole_group:
        os.killpg(dev.child.pid, signum)
    else:
        dev.child.process.send_signal(signum)
    try:
        code = dev.child.process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"darkroom dev still running {STOP_TIMEOUT:g} s after {signal.Signals(signum).name}:\n"
            f"{dev.child.output()}"
        ) from None
    assert code == 0, dev.child.output()
    left = {pid: command for pid, command in running.items() if alive(pid)}
    assert not left, f"still running after darkroom dev exited: {left}"


def upload_and_hear(dev: DevSession) -> tuple[dict[str, Any], Delivery]:
    """A photo uploaded to the dev session, and its webhook as a receiver of ours heard it."""
    receiver = Receiver(dev.account.webhook_secret).start()
    try:
        image = upload(dev.base_url, dev.account, imagegen.jpeg(640, 480), RESIZE_TO_160, receiver.url)
        (delivery,) = receiver.wait_for(1, WEBHOOK_TIMEOUT)
    finally:
        receiver.stop()
    return image, delivery


def test_darkroom_dev_runs_everything_and_stops_on_ctrl_c(children: Children, tmp_path: Path) -> None:
    data_dir = tmp_path / "dev-data"
    dev = start_dev(children, data_dir)
    assert dev.created
    assert (data_dir / "dev-account.json").stat().st_mode & 0o777 == 0o600  # holds the API key
    image, delivery = upload_and_hear(dev)
    assert delivery.verified
    assert delivery.event["data"]["id"] == image["id"]
    assert delivery.event["data"]["output"]["url"].startswith(dev.base_url)
    check_output(dev.base_url, dev.account, image["id"], (160, 120))
    # arq's line for the job, without the 'delayed=4505396273699.83s' it made of the fair queue's tag.
    started = f"process:{image['id']}:process_image('{image['id']}')"
    assert re.search(rf"→ {re.escape(started)}$", dev.child.output(), re.MULTILINE), dev.child.output()
    with httpx.Client(base_url=dev.base_url, headers=dev.account.headers, timeout=10) as http:
        rotated = http.post("/v1/webhook-secret/rotate").json()["secret"]

    stop_dev(dev, whole_group=False)
    assert list((data_dir / "redis").glob("**/*.aof")), sorted(map(str, data_dir.rglob("*")))

    # A second run on the same data dir replays the AOF: same dev account, the image is still there,
    # and the banner names the secret that signs now, not the one saved before the rotation.
    again = start_dev(children, data_dir)
    assert not again.created
    assert again.account.api_key == dev.account.api_key
    assert again.account.webhook_secret == rotated
    assert json.loads((data_dir / "dev-account.json").read_text())["webhook_secret"] == rotated
    assert (data_dir / "dev-account.json").stat().st_mode & 0o777 == 0o600
    check_output(again.base_url, again.account, image["id"], (160, 120))
    stop_dev(again, whole_group=True)


def test_darkroom_dev_stops_in_order_on_sigterm_and_on_sigint_from_a_script(
    children: Children, tmp_path: Path
) -> None:
    """SIGTERM (a process manager, `kill`) stops the session as Ctrl-C does: web and workers first, Redis
    last. It used to end `darkroom dev` alone, its children all told at once, so web and workers lost
    Redis while stopping. And SIGINT stops a session a script started in its background."""
    dev = start_dev(children, tmp_path / "dev-data", as_a_script_would=True)
    stop_dev(dev, whole_group=False)
    again = start_dev(children, tmp_path / "dev-data")
    upload_and_hear(again)
    stop_dev(again, whole_group=False, signum=signal.SIGTERM)
    assert "cannot reach Redis" not in again.child.output()
    assert "change notifications lost" not in again.child.output()


def test_darkroom_dev_starts_a_killed_worker_again(children: Children, tmp_path: Path) -> None:
    """A worker killed (by the OOM killer, say) does not end the session: it comes back and works."""
    dev = start_dev(children, tmp_path / "dev-data")
    commands = descendants(dev.child.pid).items()
    (worker_pid,) = [pid for pid, command in commands if "jobs.worker.WorkerSettings" in command]
    bulk_lane = poll(lambda: bulk_lane_of(worker_pid), "the worker's bulk lane")
    os.kill(worker_pid, signal.SIGKILL)
    dev.child.wait_for_line(r"arq jobs\.worker\.WorkerSettings exited with -9; starting it again")
    image, delivery = upload_and_hear(dev)
    assert delivery.event["data"]["id"] == image["id"]
    assert not alive(worker_pid)
    poll(lambda: not alive(bulk_lane), "the killed worker's bulk lane to end")
    stop_dev(dev, whole_group=False)


def test_a_worker_that_will_not_stop_is_killed_with_the_processes_it_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a worker whose bulk lane is still stopping, niced, on a starved machine: once its grace is
    over, `darkroom dev` leaves nothing of it running (it had left the lane to outlive the session)."""
    monkeypatch.setattr(dev, "STOP_GRACE_SECONDS", 0.5)
    stubborn = (
        "import signal, subprocess, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "print(subprocess.Popen(['sleep', '600']).pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    command = [sys.executable, "-c", stubborn]
    with subprocess.Popen(command, stdout=subprocess.PIPE, **child_process_options()) as worker:
        try:
            assert worker.stdout is not None
            lane = int(worker.stdout.readline())
            dev.stop_in_order([worker])
            assert worker.returncode == -signal.SIGKILL
            poll(lambda: not alive(lane), "the worker's own child killed", timeout=5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)


def test_darkroom_dev_starts_a_killed_redis_again(children: Children, tmp_path: Path) -> None:
    """Redis killed mid-session comes back on its port and AOF: the image accepted before is still
    there, and the same web and worker processes take the next upload to its webhook."""
    dev = start_dev(children, tmp_path / "dev-data")
    before, _ = upload_and_hear(dev)
    processes = descendants(dev.child.pid)
    (redis_pid,) = [pid for pid, command in processes.items() if "redis-server" in command]
    others = [pid for pid in processes if pid != redis_pid]
    os.kill(redis_pid, signal.SIGKILL)
    dev.child.wait_for_line(r"redis-server stopped; starting it again")
    wait_until_ready(dev.base_url, [dev.child])
    image, delivery = upload_and_hear(dev)
    assert delivery.event["data"]["id"] == image["id"]
    with httpx.Client(base_url=dev.base_url, headers=dev.account.headers, timeout=10) as http:
        assert http.get(f"/v1/images/{before['id']}").json()["status"] == "completed"
    assert all(alive(pid) for pid in others)
    stop_dev(dev, whole_group=False)


def test_darkroom_dev_on_a_busy_port_says_so_and_starts_nothing(children: Children, tmp_path: Path) -> None:
    """Another server answering on the port must not pass for ours (its banner would hand out a key
    that server does not know)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data_dir = tmp_path / "dev-data"
        child = children.start(
            "darkroom dev", [str(BIN / "darkroom"), "dev", "--port", str(port)], base_env(data_dir, port)
        )
        code = child.process.wait(STOP_TIMEOUT)
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in child.output()
    assert "API key" not in child.output()
    assert not (data_dir / "redis").exists()


def test_darkroom_dev_names_the_check_that_keeps_the_service_from_being_ready(
    children: Children,
    redis_server: EmbeddedRedis,
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A web process that answers but is not ready, as with an S3 bucket nobody created, is named by its
    failing check and what to do about it, where `darkroom dev` said the web process did not start."""
    port = free_port()
    env = {
        **service_env(tmp_path / "web", port, redis_server.url),
        "DARKROOM_STORAGE_URL": "s3://nobody-made-it/darkroom",
        "DARKROOM_S3_ENDPOINT_URL": s3_server.url,
        "DARKROOM_S3_REGION": REGION,
    }
    web = children.start("web", procfile_command("web", port), env)
    base_url = f"http://127.0.0.1:{port}"
    poll(lambda: answers(f"{base_url}/healthz"), "the web process answering", START_TIMEOUT)
    monkeypatch.setattr(dev, "READY_TIMEOUT_SECONDS", 1)
    assert dev.readiness_problem(f"{base_url}/readyz", [web.process]) == (
        f"not ready after 1 s ({base_url}/readyz): "
        "storage: unreachable: there is no bucket named nobody-made-it; create it first"
    )


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_webhooks_listen_on_a_busy_port_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(
            ["webhooks", "listen", "--secret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "--port", str(port)]
        )
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.skipif(not (CORPUS / "bad").is_dir(), reason=f"no corpus at {CORPUS}")
def test_every_hostile_corpus_file_leaves_the_worker_process_running(stack: Stack) -> None:
    """The corpus' bad files through the real web and worker processes: each is refused with a 4xx
    or ends failed with a code (or, for a file libvips reads after all, completed), and the worker that
    started is the worker still running at the end."""
    account = create_account(stack.env, "corpus")
    worker_pid = stack.worker.process.pid
    queued = []
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        for path in sorted((CORPUS / "bad").iterdir()):
            response = http.post(
                "/v1/images",
                headers=account.headers,
                files={"file": (path.name, path.read_bytes(), "application/octet-stream")},
                data={"operations": json.dumps(RESIZE_TO_160)},
            )
            assert response.status_code == 202 or 400 <= response.status_code < 500, (
                path.name,
                response.text,
            )
            if response.status_code == 202:
                queued.append((path.name, response.json()["id"]))

        def all_finished() -> list[dict[str, Any]] | None:
            images = [
                http.get(f"/v1/images/{image_id}", headers=account.headers).json() for _, image_id in queued
            ]
            return images if all(image["status"] in ("completed", "failed") for image in images) else None

        finished = poll(all_finished, "every queued corpus file finished", timeout=120)
    for (name, _), image in zip(queued, finished, strict=True):
        assert image["status"] == "completed" or image["error"]["code"], (name, image)
    assert stack.worker.process.poll() is None, stack.worker.output()
    assert alive(worker_pid)


UPLOADS_BEFORE = 12
UPLOADS_AFTER = 6
HELD_WEBHOOKS = 3  # in flight when Redis dies: their outcome can only be recorded once it is back
SETTLE_TIMEOUT = 60.0


def start_redis(children: Children, port: int, directory: Path) -> Child:
    """redis-server as a plain child (so the test can SIGKILL it), persisting every write before it
    answers, as a production Redis with `appendfsync always` does."""
    server = children.start(
        "redis-server",
        [
            find_redis_server(),
            *("--port", str(port)),
            *("--bind", "127.0.0.1"),
            *("--dir", str(directory)),
            *("--appendonly", "yes"),
            *("--appendfsync", "always"),
            *("--save", ""),
        ],
        dict(os.environ),
    )
    server.wait_for_line("Ready to accept connections")
    return server


def post_image(http: httpx.Client, headers: dict[str, str], callback_url: str) -> httpx.Response:
    return http.post(
        "/v1/images",
        headers=headers,
        files={"file": ("photo.jpg", imagegen.jpeg(1200, 900), "image/jpeg")},
        data={"operations": json.dumps(RESIZE_TO_160), "callback_url": callback_url},
    )


def test_a_redis_outage_mid_load_loses_nothing_and_stops_no_process(
    children: Children, tmp_path: Path
) -> None:
    """`redis-server` (AOF, fsync on every write) SIGKILLed mid-load and started again on the same port
    and file: the web and worker processes that were running carry on, and every accepted image
    completes with one webhook-id."""
    redis_port, web_port = free_port(), free_port()
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis = start_redis(children, redis_port, redis_dir)
    base_url = f"http://127.0.0.1:{web_port}"
    env = service_env(tmp_path / "data", web_port, f"redis://127.0.0.1:{redis_port}/0")
    web = children.start("web", procfile_command("web", web_port), env)
    worker = children.start("worker", procfile_command("worker", web_port), env)
    wait_until_ready(base_url, [web, worker])
    account = create_account(env, "outage")
    receiver = Receiver(account.webhook_secret).start()
    receiver.script(*[Answer(200, hold=True)] * HELD_WEBHOOKS)
    accepted: list[str] = []
    try:
        with httpx.Client(base_url=base_url, timeout=10) as http:
            for _ in range(UPLOADS_BEFORE):
                response = post_image(http, account.headers, receiver.url)
                assert response.status_code == 202, response.text
                accepted.append(response.json()["id"])
            held = [delivery.id for delivery in receiver.wait_for(HELD_WEBHOOKS)]

            os.kill(redis.pid, signal.SIGKILL)
            redis.process.wait()
            worker.wait_for_line(r"Redis is unreachable")
            receiver.release()  # answered while Redis is down: recorded once it is back
            poll(lambda: receiver.in_flight == 0, "the held webhooks answered")

            refused = post_image(http, account.headers, receiver.url)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"]
            assert refused.json()["code"] == "store_unavailable"
            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["redis"].startswith("unreachable")

            start_redis(children, redis_port, redis_dir)
            worker.wait_for_line(r"Redis is reachable again after \d+\.\d s")
            for _ in range(UPLOADS_AFTER):
                response = post_image(http, account.headers, receiver.url)
                assert response.status_code == 202, response.text
                accepted.append(response.json()["id"])

            def all_completed() -> list[dict[str, Any]] | None:
                assert worker.process.poll() is None, worker.output()
                images = [http.get(f"/v1/images/{id_}", headers=account.headers).json() for id_ in accepted]
                return images if all(image["status"] == "completed" for image in images) else None

            poll(all_completed, "every accepted image completed", SETTLE_TIMEOUT)

            def held_ones_recorded() -> list[dict[str, Any]] | None:
                logs = [
                    http.get(f"/v1/deliveries/{msg_id}", headers=account.headers).json() for msg_id in held
                ]
                return logs if all(log["status"] == "delivered" for log in logs) else None

            # Answered while Redis was down, recorded (once each) when it was back.
            recorded = poll(held_ones_recorded, "the held webhooks recorded as delivered")
            assert all(len(log["destinations"][0]["attempts"]) == 1 for log in recorded), recorded
        heard = poll(lambda: heard_from_all(receiver, accepted), "a webhook for every image", SETTLE_TIMEOUT)
    finally:
        receiver.stop()

    assert all(len(ids) == 1 for ids in heard.values()), heard
    assert web.process.poll() is None and worker.process.poll() is None
    # Once for each of the worker's processes (its express lane and its bulk lane), which both rode it.
    assert sum("Redis is unreachable" in line for line in worker.lines) == 2, worker.output()
    assert not any("the bulk lane" in line for line in worker.lines), worker.output()


def heard_from_all(receiver: Receiver, image_ids: list[str]) -> dict[str, set[str]] | None:
    """Each image's webhook-ids as the receiver heard them, once it heard from every image."""
    ids: dict[str, set[str]] = defaultdict(set)
    for delivery in list(receiver.deliveries):
        assert delivery.verified
        ids[delivery.event["data"]["id"]].add(delivery.id)
    return dict(ids) if set(ids) >= set(image_ids) else None


@pytest.mark.parametrize("redis_late", [False, True], ids=["redis-up", "redis-starts-after-them"])
def test_a_worker_without_a_public_url_links_to_the_web_not_to_its_own_port(
    children: Children, tmp_path: Path, redis_late: bool
) -> None:
    """Neither process has DARKROOM_PUBLIC_URL, and each has its own PORT (as honcho gives them): the
    worker serves no HTTP, so its webhooks link to the web that announced itself, localhost and the
    web's PORT, never to the worker's; also when Redis comes up only after both started."""
    redis_port, web_port, worker_port = free_port(), free_port(), free_port()
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    if not redis_late:
        start_redis(children, redis_port, redis_dir)
    web_env, worker_env = (
        {**base_env(tmp_path / "data", port), "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
        | ALLOW_PRIVATE
        for port in (web_port, worker_port)
    )
    web = children.start("web", procfile_command("web", web_port), web_env)
    worker = children.start("worker", procfile_command("worker", worker_port), worker_env)
    if redis_late:
        poll(lambda: answers_health(f"http://127.0.0.1:{web_port}"), "the web serving without Redis")
        start_redis(children, redis_port, redis_dir)
    wait_until_ready(f"http://127.0.0.1:{web_port}", [web, worker])
    account = create_account(web_env, "partner")
    receiver = Receiver(account.webhook_secret).start()
    try:
        image = upload(
            f"http://127.0.0.1:{web_port}", account, imagegen.jpeg(64, 48), RESIZE_TO_160, receiver.url
        )
        (delivery,) = receiver.wait_for(1, WEBHOOK_TIMEOUT)
    finally:
        receiver.stop()
    expected = f"http://localhost:{web_port}/v1/images/{image['id']}/output"
    assert delivery.event["data"]["output"]["url"] == expected
