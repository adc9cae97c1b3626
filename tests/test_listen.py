"""`darkroom webhooks listen`'s receiver in-process: malformed requests, and whole lines under load."""

from __future__ import annotations

import http.client
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from webhooks.listen import ListenServer, make_handler
from webhooks.signing import generate_secret, sign_headers

SECRET = generate_secret()


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


@pytest.fixture
def listener() -> Iterator[tuple[int, RecordedWrites]]:
    out = RecordedWrites()
    server = ListenServer(("127.0.0.1", 0), make_handler(SECRET, out))
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server.server_address[1], out
    server.shutdown()
    server.server_close()


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
