"""`darkroom webhooks listen`'s receiver in-process: malformed requests, whole lines under load, and
several secrets at once, each delivery printed with the label of the one that verified it."""

from __future__ import annotations

import http.client
import io
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from server import cli
from webhooks.listen import ListenSecret, ListenServer, listen_secrets, make_handler
from webhooks.signing import generate_secret, sign_headers

SECRET = generate_secret()
ENDPOINT_SECRET = generate_secret()


class RecordedWrites(io.StringIO):
    """Keeps each write as it came, to tell one whole line from pieces of several."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self.writes.append(text)
        return len(text)


def listening(secrets: list[ListenSecret]) -> Iterator[tuple[int, RecordedWrites]]:
    out = RecordedWrites()
    server = ListenServer(("127.0.0.1", 0), make_handler(secrets, out))
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server.server_address[1], out
    server.shutdown()
    server.server_close()


@pytest.fixture
def listener() -> Iterator[tuple[int, RecordedWrites]]:
    yield from listening(listen_secrets([SECRET]))


@pytest.fixture
def callback_and_endpoint_listener() -> Iterator[tuple[int, RecordedWrites]]:
    yield from listening(listen_secrets([f"callback={SECRET}", f"ep_01={ENDPOINT_SECRET}"]))


def post(port: int, body: bytes, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.putrequest("POST", "/", skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("length", ["-5", "abc", "1e3", "²"])
def test_an_invalid_content_length_is_a_400(listener: tuple[int, RecordedWrites], length: str) -> None:
    port, out = listener
    assert post(port, b"{}", {"content-length": length}) == 400
    assert out.writes == []


def test_each_delivery_is_printed_in_whole_lines_when_many_arrive_at_once(
    listener: tuple[int, RecordedWrites],
) -> None:
    port, out = listener

    def deliver(n: int) -> int:
        body = f'{{"type":"image.completed","data":{{"id":"img_{n}","status":"completed"}}}}'.encode()
        headers = dict(sign_headers([SECRET], f"msg_{n}", body))
        if n % 2:
            headers["webhook-signature"] = "v1,Zm9yZ2Vk"  # half of them forged
        return post(port, body, {**headers, "content-length": str(len(body))})

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(deliver, range(64)))

    assert sorted(statuses) == [200] * 32 + [400] * 32
    assert len(out.writes) == 64
    assert all(write.endswith("\n") for write in out.writes), out.writes
    assert sum(write.startswith("✗ rejected msg_") for write in out.writes) == 32
    assert sum(write.startswith("✓ image.completed msg_") for write in out.writes) == 32


def signed_event(
    secrets: list[str], msg_id: str, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    body = b'{"type":"image.completed","data":{"id":"img_1","status":"completed"}}'
    headers = sign_headers(secrets, msg_id, body, timestamp)
    return body, {**headers, "content-length": str(len(body))}


def test_one_listener_verifies_callbacks_and_endpoints_and_says_which_secret_matched(
    callback_and_endpoint_listener: tuple[int, RecordedWrites],
) -> None:
    port, out = callback_and_endpoint_listener

    assert post(port, *signed_event([SECRET], "msg_1")) == 200
    assert post(port, *signed_event([ENDPOINT_SECRET], "msg_1")) == 200
    assert post(port, *signed_event([generate_secret()], "msg_forged")) == 400
    assert post(port, *signed_event([ENDPOINT_SECRET], "msg_old", timestamp=1_000_000_000)) == 400

    lines = [write.splitlines()[0] for write in out.writes]
    assert lines == [
        "✓ image.completed msg_1 img_1 completed [callback]",
        "✓ image.completed msg_1 img_1 completed [ep_01]",
        "✗ rejected msg_forged: no signature matches any of the 2 secrets",
        "✗ rejected msg_old: webhook-timestamp is outside the tolerance window",
    ]


def test_a_lone_secret_is_not_labelled_and_several_unlabelled_ones_are_numbered() -> None:
    assert listen_secrets([SECRET]) == [ListenSecret("", SECRET)]
    assert listen_secrets([SECRET, f"ep_01={ENDPOINT_SECRET}"]) == [
        ListenSecret("#1", SECRET),
        ListenSecret("ep_01", ENDPOINT_SECRET),
    ]


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (["callback=whsec_not base64"], "callback: a webhook secret is 'whsec_' followed by base64"),
        (["whsec_"], "--secret #1: a webhook secret must not be empty"),
        ([f"a={SECRET}", f"a={ENDPOINT_SECRET}"], "the label 'a' is given twice"),
        ([], "at least one"),
    ],
)
def test_malformed_or_repeated_secrets_are_refused(values: list[str], complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        listen_secrets(values)


def test_the_command_refuses_a_malformed_secret_before_listening(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["webhooks", "listen", "--secret", f"callback={SECRET}", "--secret", "ep_01=whsec_"]) == 2
    assert "--secret ep_01: a webhook secret must not be empty" in capsys.readouterr().err
