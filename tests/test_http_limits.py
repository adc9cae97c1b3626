"""How requests may arrive, against the web process as the Procfile runs it, over real loopback sockets:
a header block too large, too slow or one of too many waiting, and a body that stops arriving."""

from __future__ import annotations

import json
import re
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from server.embedded_redis import EmbeddedRedis
from tests.conftest import Partner
from tests.test_processes import (
    Child,
    Children,
    base_env,
    children,  # noqa: F401  (the fixture that stops the web process)
    free_port,
    procfile_command,
    wait_until_ready,
)

HEADER_TIMEOUT = 2.0
MAX_PENDING = 200
BODY_IDLE_TIMEOUT = 1.0
SLOW_CLIENTS = 2000
# Far above a loopback round trip on a busy machine, far below any limit's wait.
QUICKLY = 2.0


@pytest.fixture
def web(web_process: tuple[str, Child]) -> str:
    return web_process[0]


@pytest.fixture
def web_process(
    children: Children,  # noqa: F811
    redis_server: EmbeddedRedis,
    tmp_path: Path,
) -> Iterator[tuple[str, Child]]:
    """The web process's base URL, and the process, whose log a test reads."""
    port = free_port()
    env = {
        **base_env(tmp_path / "data", port),
        "REDIS_URL": redis_server.url,
        "DARKROOM_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "DARKROOM_MAX_PENDING_CONNECTIONS": str(MAX_PENDING),
        "DARKROOM_BODY_IDLE_TIMEOUT": str(BODY_IDLE_TIMEOUT),
    }
    child = children.start("web", procfile_command("web", port), env)
    base_url = f"http://127.0.0.1:{port}"
    wait_until_ready(base_url, [child])
    yield base_url, child


def address(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").split(":")
    return host, int(port)


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pass
    return received


def half_sent_requests(base_url: str, count: int) -> list[socket.socket]:
    """`count` connections, each sending a request line and one header, then nothing more."""
    opened = []
    for _ in range(count):
        sock = socket.create_connection(address(base_url))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: darkroom\r\n")
        opened.append(sock)
    return opened


def closed_by_server(sockets: list[socket.socket], within: float) -> set[socket.socket]:
    """The sockets the server closes (end of stream) within `within` seconds."""
    closed: set[socket.socket] = set()
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + within
        while len(closed) < len(sockets) and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(remaining):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    ended = sock.recv(4096) == b""
                except ConnectionResetError:
                    ended = True
                if ended:
                    closed.add(sock)
                    selector.unregister(sock)
    return closed


def test_a_150_mb_header_is_refused_after_its_first_kilobytes(web: str) -> None:
    started = time.monotonic()
    sent = 0
    with socket.create_connection(address(web)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: darkroom\r\nX-Padding: ")
        try:
            while sent < 150_000_000:
                sock.sendall(b"a" * 1_000_000)
                sent += 1_000_000
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = read_response(sock, QUICKLY)
    elapsed = time.monotonic() - started
    assert sent < 10_000_000, f"the server read {sent:,} bytes of header"
    assert elapsed < QUICKLY + 1, elapsed
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), response[:200]
    assert b"content-type: application/problem+json" in head
    problem = json.loads(body)
    assert problem["status"] == 431 and problem["code"] == "header_too_large"


@pytest.mark.parametrize("padding", [66_000, 120_000])
@pytest.mark.parametrize("kept_alive", [False, True], ids=["first-request", "kept-alive"])
def test_a_header_block_over_the_limit_that_arrives_whole_is_refused(
    web: str, padding: int, kept_alive: bool
) -> None:
    """Arriving in one piece, the block is complete before its bytes were counted: still 431."""
    oversized = b"GET /healthz HTTP/1.1\r\nHost: darkroom\r\nX-Padding: " + b"a" * padding + b"\r\n\r\n"
    with socket.create_connection(address(web)) as sock:
        if kept_alive:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: darkroom\r\n\r\n")
            served = b""
            while not served.endswith(b'{"status":"ok"}'):
                served += sock.recv(65536)
            assert served.startswith(b"HTTP/1.1 200 ")
        sock.sendall(oversized)
        response = read_response(sock, QUICKLY)
    assert response.startswith(b"HTTP/1.1 431 "), response[:200]


@pytest.mark.parametrize(
    "header", [b"Content-Length: -1", b"Content-Length: 1\r\nContent-Length: 2", b"Transfer-Encoding;"]
)
def test_a_request_the_parser_cannot_read_is_a_problem_document(web: str, header: bytes) -> None:
    with socket.create_connection(address(web)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: darkroom\r\n" + header + b"\r\n\r\n")
        response = read_response(sock, QUICKLY)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), response[:200]
    assert b"content-type: application/problem+json" in head
    assert json.loads(body)["code"] == "malformed_request"


def test_a_header_block_within_the_limit_is_served(web: str) -> None:
    response = httpx.get(f"{web}/healthz", headers={"X-Padding": "a" * 60_000}, timeout=QUICKLY)
    assert response.status_code == 200


def test_two_thousand_half_sent_headers_neither_stay_open_nor_keep_a_request_out(web: str) -> None:
    slow = half_sent_requests(web, SLOW_CLIENTS)
    try:
        # Each one past the limit of waiting connections closed the longest waiting one at once.
        evicted = closed_by_server(slow, QUICKLY)
        assert len(evicted) >= SLOW_CLIENTS - MAX_PENDING, len(evicted)

        started = time.monotonic()
        response = httpx.get(f"{web}/healthz", timeout=QUICKLY * 2)
        assert response.status_code == 200
        assert time.monotonic() - started < QUICKLY

        still_open = [sock for sock in slow if sock not in evicted]
        timed_out = closed_by_server(still_open, HEADER_TIMEOUT + QUICKLY)
        assert len(timed_out) == len(still_open)
    finally:
        for sock in slow:
            sock.close()


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(web: str) -> None:
    with socket.create_connection(address(web)) as sock:
        started = time.monotonic()
        assert read_response(sock, HEADER_TIMEOUT + QUICKLY) == b""
        assert HEADER_TIMEOUT - 0.5 < time.monotonic() - started < HEADER_TIMEOUT + QUICKLY


def test_a_body_that_stops_arriving_is_408(web: str, account: Partner) -> None:
    with socket.create_connection(address(web)) as sock:
        sock.sendall(
            b"POST /v1/images HTTP/1.1\r\nHost: darkroom\r\n"
            + f"Authorization: Bearer {account.api_key}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=cut\r\nContent-Length: 100000\r\n\r\n"
            + b'--cut\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n\xff\xd8'
        )
        started = time.monotonic()
        response = read_response(sock, BODY_IDLE_TIMEOUT + QUICKLY * 2)
    assert time.monotonic() - started < BODY_IDLE_TIMEOUT + QUICKLY
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), response[:300]
    problem = json.loads(body)
    assert problem["code"] == "request_timeout"
    assert f"stopped arriving for {BODY_IDLE_TIMEOUT:g} s" in problem["detail"]


def test_a_client_gone_mid_body_is_logged_as_its_doing_without_a_traceback(
    web_process: tuple[str, Child], account: Partner
) -> None:
    """A phone that loses its network mid-`PUT`, or a script killed mid-POST: a 400 in the request log,
    not a 500 with an `Exception in ASGI application` traceback that pages someone."""
    base_url, child = web_process
    created = httpx.post(
        f"{base_url}/v1/uploads",
        headers=account.headers,
        json={"filename": "a.jpg", "content_type": "image/jpeg", "size": 100_000},
    )
    assert created.status_code == 201, created.text
    signed = urlsplit(created.json()["upload_url"])
    cut_off = {
        "PUT /v1/uploads/": f"PUT {signed.path}?{signed.query} HTTP/1.1\r\nContent-Type: image/jpeg\r\n"
        "Content-Length: 100000\r\n",
        "POST /v1/batches": f"POST /v1/batches HTTP/1.1\r\nAuthorization: Bearer {account.api_key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n",
    }
    for logged_as, head in cut_off.items():
        with socket.create_connection(address(base_url)) as sock:
            sock.sendall(f"{head}Host: darkroom\r\n\r\n".encode() + b"{" * 10)
            time.sleep(0.3)  # the body is being read when the connection closes
        status = child.wait_for_line(re.escape(logged_as) + r"\S* (\d{3})\b", timeout=QUICKLY * 5)[1]
        assert status == "400", child.output()
    assert "Traceback" not in child.output()
