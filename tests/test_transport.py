"""The webhook HTTP client against real HTTP servers on 127.0.0.1, scripted answer by answer."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.test_addresses import fake_resolver
from webhooks.transport import (
    RESENT_ON_NEW_CONNECTION,
    BlockedDestination,
    ConnectError,
    ConnectTimeout,
    DeliveryClient,
    ProtocolError,
    ReadError,
    ReadTimeout,
)

HEADERS = {"content-type": "application/json", "webhook-id": "msg_1"}


def reply(status: str, body: bytes = b"ok", *extra: str) -> bytes:
    head = "".join(f"{line}\r\n" for line in extra)
    return f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n{head}\r\n".encode() + body


OK = reply("200 OK")


@dataclass(frozen=True)
class Answer:
    raw: bytes = OK
    then: Literal["keep", "close", "hang", "endless"] = "keep"  # after writing `raw`; endless: body bytes
    delay: float = 0.0


NO_ANSWER = Answer(b"", "hang")
DROP = Answer(b"", "close")


@dataclass(frozen=True)
class Received:
    connection: int
    request_line: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    """A keep-alive HTTP/1.1 server; answers are taken from `script` in order, then 200 ok."""

    tls: ssl.SSLContext | None = None
    script: deque[Answer] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    closed_by_client: int = 0  # connections the client closed between requests
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def url(self, path: str = "/hooks", scheme: str | None = None, host: str = "127.0.0.1") -> str:
        return f"{scheme or ('https' if self.tls else 'http')}://{host}:{self.port}{path}"

    async def start(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """The client acts on its own schedule (idle timers, closing): wait for what it must do."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(condition), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.add(writer)
        self.connections += 1
        number = self.connections
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while await self._answer_one(number, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
            self.open_now -= 1
            async with self._changed:
                self._changed.notify_all()

    async def _answer_one(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            self.closed_by_client += not exc.partial
            return False
        request_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        async with self._changed:
            self.received.append(Received(number, request_line, headers, body))
            self._changed.notify_all()
        answer = self.script.popleft() if self.script else Answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        writer.write(answer.raw)
        while answer.then == "endless":
            writer.write(b"x" * 65536)
            await writer.drain()
        await writer.drain()
        if answer.then == "hang":
            await reader.read()
        return answer.then == "keep"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    running = await Server().start()
    yield running
    await running.stop()


@asynccontextmanager
async def open_client(**options: Any) -> AsyncIterator[DeliveryClient]:
    """Short timeouts: nothing here is meant to be slow."""
    client = DeliveryClient(
        **{"allow_private": True, "connect_timeout": 0.5, "total_timeout": 0.5, **options}
    )
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def client() -> AsyncIterator[DeliveryClient]:
    async with open_client() as delivery:
        yield delivery


async def test_the_request_arrives_exactly(server: Server, client: DeliveryClient) -> None:
    body = bytes(range(256)) * 12 + b"\r\n\r\nPOST / HTTP/1.1\r\n"
    response = await client.post(server.url("/hooks/a b?x=1&y=ä"), body, HEADERS)

    assert response.status_code == 200
    (request,) = server.received
    assert request.request_line == "POST /hooks/a%20b?x=1&y=%C3%A4 HTTP/1.1"
    assert request.body == body
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert request.headers["content-length"] == str(len(body))
    assert request.headers["connection"] == "keep-alive"
    assert request.headers["user-agent"] == "Darkroom-Webhooks/1"
    assert request.headers["webhook-id"] == "msg_1"
    assert request.headers["content-type"] == "application/json"


async def test_answers_are_returned_as_they_are(server: Server, client: DeliveryClient) -> None:
    server.script.extend(
        [
            Answer(reply("500 Internal Server Error", b"boom")),
            Answer(reply("302 Found", b"", "Location: http://127.0.0.1:1/elsewhere")),
            Answer(reply("410 Gone", b"")),
            Answer(
                reply("429 Too Many Requests", b"slow down", "Retry-After: 120", "X-Extra: a", "X-Extra: b")
            ),
        ]
    )
    failed = await client.post(server.url(), b"{}", HEADERS)
    redirected = await client.post(server.url(), b"{}", HEADERS)
    gone = await client.post(server.url(), b"{}", HEADERS)
    limited = await client.post(server.url(), b"{}", HEADERS)

    assert (failed.status_code, failed.body_excerpt, failed.retry_after) == (500, b"boom", None)
    assert redirected.status_code == 302
    assert redirected.headers["location"] == "http://127.0.0.1:1/elsewhere"
    assert gone.status_code == 410
    assert (limited.status_code, limited.retry_after, limited.body_excerpt) == (429, "120", b"slow down")
    assert limited.headers["x-extra"] == "a, b"
    assert limited.elapsed_ms >= 0
    assert len(server.received) == 4  # the redirect was not followed


async def test_keep_alive_connections_are_reused(server: Server, client: DeliveryClient) -> None:
    for _ in range(5):
        assert (await client.post(server.url(), b"{}", HEADERS)).status_code == 200
    assert [r.connection for r in server.received] == [1, 1, 1, 1, 1]


async def test_chunked_bodies_are_read_and_the_connection_kept(
    server: Server, client: DeliveryClient
) -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    server.script.append(Answer(chunked))
    first = await client.post(server.url(), b"{}", HEADERS)
    await client.post(server.url(), b"{}", HEADERS)

    assert first.body_excerpt == b"hello world"
    assert [r.connection for r in server.received] == [1, 1]


async def test_an_interim_100_continue_is_skipped(server: Server, client: DeliveryClient) -> None:
    server.script.append(Answer(b"HTTP/1.1 100 Continue\r\n\r\n" + reply("201 Created", b"made")))
    response = await client.post(server.url(), b"{}", HEADERS)
    assert (response.status_code, response.body_excerpt) == (201, b"made")


@pytest.mark.parametrize(
    "answer",
    [
        Answer(reply("200 OK", b"bye", "Connection: close"), "close"),
        Answer(b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nbye"),
        Answer(b"HTTP/1.0 200 OK\r\n\r\nbye", "close"),  # the body ends with the connection
    ],
    ids=["connection-close", "http-1.0", "http-1.0-until-eof"],
)
async def test_connections_the_server_ends_are_not_reused(
    server: Server, client: DeliveryClient, answer: Answer
) -> None:
    server.script.append(answer)
    first = await client.post(server.url(), b"{}", HEADERS)
    second = await client.post(server.url(), b"{}", HEADERS)

    assert (first.status_code, first.body_excerpt) == (200, b"bye")
    assert second.status_code == 200
    assert [r.connection for r in server.received] == [1, 2]


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n40000000\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
    ],
    ids=["content-length", "chunked", "until-eof"],
)
async def test_a_huge_body_is_cut_at_the_cap_and_its_connection_closed(server: Server, head: bytes) -> None:
    server.script.append(Answer(head, "endless"))
    async with open_client(max_response_bytes=1000) as client:
        huge = await client.post(server.url(), b"{}", HEADERS)
        await server.wait_until(lambda: server.open_now == 0)
        after = await client.post(server.url(), b"{}", HEADERS)

    assert huge.status_code == 200
    assert huge.body_excerpt == b"x" * 1000
    assert after.status_code == 200
    assert [r.connection for r in server.received] == [1, 2]


async def test_a_receiver_that_never_answers_times_out(server: Server) -> None:
    server.script.append(NO_ANSWER)
    async with open_client(total_timeout=0.2) as client:
        with pytest.raises(ReadTimeout, match=r"^timed out after 0\.2 s waiting for the response$"):
            await client.post(server.url(), b"{}", HEADERS)
        await server.wait_until(lambda: server.open_now == 0)  # the hanging connection was dropped
        assert (await client.post(server.url(), b"{}", HEADERS)).status_code == 200


async def test_a_refused_connection_is_a_connect_error(client: DeliveryClient, unused_tcp_port: int) -> None:
    with pytest.raises(ConnectError, match=rf"^connection refused by 127\.0\.0\.1:{unused_tcp_port}$"):
        await client.post(f"http://127.0.0.1:{unused_tcp_port}/hooks", b"{}", HEADERS)


async def test_a_handshake_that_never_completes_is_a_connect_timeout(server: Server) -> None:
    server.script.append(NO_ANSWER)
    async with open_client(connect_timeout=0.2) as client:
        with pytest.raises(ConnectTimeout, match=r"^timed out after 0\.2 s connecting$"):
            await client.post(server.url(scheme="https"), b"{}", HEADERS)


async def test_https_to_a_plain_http_port_fails_cleanly(client: DeliveryClient) -> None:
    async def plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # a TLS hello is no HTTP request: answer as real servers do
        writer.write(reply("400 Bad Request", b""))
        writer.close()

    server = await asyncio.start_server(plain_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectError, match=r"^TLS handshake with 127\.0\.0\.1:\d+ failed \(\w+\)$"):
            await client.post(f"https://127.0.0.1:{port}/hooks", b"{}", HEADERS)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_stale_keep_alive_connection_is_retried_once_on_a_fresh_one(
    server: Server, client: DeliveryClient
) -> None:
    await client.post(server.url(), b"{}", HEADERS)
    server.script.append(DROP)  # as if its idle timeout hit just as our request went out
    response = await client.post(server.url(), b'{"n": 2}', HEADERS)

    assert response.status_code == 200
    assert response.resent == RESENT_ON_NEW_CONNECTION
    assert [(r.connection, r.body) for r in server.received] == [
        (1, b"{}"),
        (1, b'{"n": 2}'),
        (2, b'{"n": 2}'),
    ]


async def test_the_retry_happens_only_once(server: Server, client: DeliveryClient) -> None:
    await client.post(server.url(), b"{}", HEADERS)
    server.script.extend([DROP, DROP])
    with pytest.raises(ReadError, match=r"^the receiver closed the connection without answering$") as raised:
        await client.post(server.url(), b"{}", HEADERS)
    assert raised.value.resent == RESENT_ON_NEW_CONNECTION
    assert [r.connection for r in server.received] == [1, 1, 2]


async def test_a_fresh_connection_dropped_without_an_answer_is_not_retried(
    server: Server, client: DeliveryClient
) -> None:
    server.script.append(DROP)
    with pytest.raises(ReadError) as raised:
        await client.post(server.url(), b"{}", HEADERS)
    assert len(server.received) == 1
    assert raised.value.resent is None


async def test_connections_closed_while_idle_are_not_used(server: Server, client: DeliveryClient) -> None:
    server.script.append(Answer(then="close"))  # keep-alive promised, then closed anyway
    await client.post(server.url(), b"{}", HEADERS)
    await server.wait_until(lambda: server.open_now == 0)
    assert (await client.post(server.url(), b"{}", HEADERS)).status_code == 200
    assert [r.connection for r in server.received] == [1, 2]


async def test_a_response_cut_short_is_a_read_error(server: Server, client: DeliveryClient) -> None:
    server.script.append(Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this", "close"))
    with pytest.raises(
        ReadError, match=r"^the receiver closed the connection before the response was complete$"
    ):
        await client.post(server.url(), b"{}", HEADERS)


async def test_a_malformed_response_is_a_protocol_error(server: Server, client: DeliveryClient) -> None:
    server.script.append(Answer(b"SMTP ready\r\n\r\n"))
    with pytest.raises(ProtocolError, match=r"^malformed HTTP response \(.+\)$"):
        await client.post(server.url(), b"{}", HEADERS)


async def test_endless_response_headers_are_a_protocol_error(server: Server, client: DeliveryClient) -> None:
    server.script.append(Answer(b"HTTP/1.1 200 OK\r\n" + b"x-filler: " + b"a" * 70000 + b"\r\n", "hang"))
    with pytest.raises(ProtocolError, match=r"^the response headers are too large$"):
        await client.post(server.url(), b"{}", HEADERS)


async def test_connections_per_origin_are_limited_and_waiting_requests_served(server: Server) -> None:
    server.script.extend(Answer(delay=0.01) for _ in range(12))
    async with open_client(max_connections_per_origin=3) as client:
        responses = await asyncio.gather(*(client.post(server.url(), b"{}", HEADERS) for _ in range(12)))

    assert [r.status_code for r in responses] == [200] * 12
    assert server.most_open == 3
    assert server.connections == 3


async def test_a_cancelled_waiting_request_gives_its_turn_back(server: Server) -> None:
    server.script.append(Answer(delay=0.05))
    async with open_client(max_connections_per_origin=1) as client:
        busy = asyncio.create_task(client.post(server.url(), b"1", HEADERS))
        await server.wait_until(lambda: len(server.received) == 1)
        waiting = asyncio.create_task(client.post(server.url(), b"2", HEADERS))
        await asyncio.sleep(0)
        waiting.cancel()
        assert (await busy).status_code == 200
        assert (await client.post(server.url(), b"3", HEADERS)).status_code == 200

    assert waiting.cancelled()
    assert [r.body for r in server.received] == [b"1", b"3"]


async def test_idle_connections_are_closed_after_the_idle_timeout(server: Server) -> None:
    async with open_client(idle_timeout=0.05) as client:
        await client.post(server.url(), b"{}", HEADERS)
        await server.wait_until(lambda: server.closed_by_client == 1)
        await client.post(server.url(), b"{}", HEADERS)
    assert [r.connection for r in server.received] == [1, 2]


async def test_closing_the_client_closes_its_idle_connections(server: Server) -> None:
    async with open_client() as client:
        await client.post(server.url(), b"{}", HEADERS)
    await server.wait_until(lambda: server.closed_by_client == 1)


async def test_private_destinations_are_blocked_before_any_connection(server: Server) -> None:
    async with open_client(allow_private=False) as client:
        with pytest.raises(BlockedDestination, match=r"^blocked: 127\.0\.0\.1 is a loopback address$"):
            await client.post(server.url(), b"{}", HEADERS)
        with pytest.raises(BlockedDestination, match=r"^blocked: localhost is a local name$"):
            await client.post(server.url(host="localhost"), b"{}", HEADERS)
    assert server.connections == 0


async def test_a_name_resolving_to_a_private_address_is_blocked(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_resolver(monkeypatch, {"hooks.example": ["8.8.8.8", "127.0.0.1"]})
    async with open_client(allow_private=False) as client:
        with pytest.raises(BlockedDestination, match=r"^blocked: 127\.0\.0\.1 is a loopback address$"):
            await client.post(server.url(host="hooks.example"), b"{}", HEADERS)
    assert server.connections == 0


async def test_it_connects_to_the_resolved_address_once_per_connection(
    server: Server, client: DeliveryClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = fake_resolver(monkeypatch, {"hooks.example": ["127.0.0.1"]})
    for _ in range(3):
        await client.post(server.url(host="hooks.example"), b"{}", HEADERS)

    assert asked == ["hooks.example"]
    assert [r.headers["host"] for r in server.received] == [f"hooks.example:{server.port}"] * 3


async def test_header_injection_is_refused(server: Server, client: DeliveryClient) -> None:
    with pytest.raises(ValueError, match="invalid header"):
        await client.post(server.url(), b"{}", {"x-note": "a\r\nx-evil: 1"})
    assert server.received == []


def test_it_runs_on_uvloop_too() -> None:
    """uvicorn serves the API on uvloop, whose transports are not asyncio's classes."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[list[int], list[int], str]:
        server = await Server(script=deque([Answer(), Answer(), NO_ANSWER])).start()
        try:
            async with open_client(total_timeout=0.2) as client:
                statuses = [(await client.post(server.url(), b"{}", HEADERS)).status_code for _ in range(2)]
                with pytest.raises(ReadTimeout) as timed_out:
                    await client.post(server.url(), b"{}", HEADERS)
            return statuses, [r.connection for r in server.received], str(timed_out.value)
        finally:
            await server.stop()

    statuses, connections, timeout = uvloop.run(scenario())
    assert statuses == [200, 200]
    assert connections == [1, 1, 1]
    assert timeout == "timed out after 0.2 s waiting for the response"


# TLS: the `certificate` fixture (tests/conftest.py) names localhost.


@pytest.fixture
async def tls_server(certificate: tuple[Path, Path]) -> AsyncIterator[Server]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    running = await Server(tls=context).start()
    yield running
    await running.stop()


async def test_https_verifies_the_certificate(tls_server: Server, client: DeliveryClient) -> None:
    with pytest.raises(
        ConnectError, match=r"^TLS certificate of 127\.0\.0\.1:\d+ rejected: self.signed certificate$"
    ):
        await client.post(tls_server.url(host="localhost"), b"{}", HEADERS)
    assert tls_server.received == []


async def test_https_checks_the_certificate_against_the_url_host_name(
    tls_server: Server, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # trust our certificate
    async with open_client() as client:
        # The certificate names localhost, not 127.0.0.1: connecting to the address, checking the name.
        response = await client.post(tls_server.url(host="localhost"), b'{"tls": true}', HEADERS)
        with pytest.raises(ConnectError, match="mismatch"):
            await client.post(tls_server.url(host="127.0.0.1"), b"{}", HEADERS)

    assert response.status_code == 200
    assert tls_server.received[0].body == b'{"tls": true}'
    assert tls_server.received[0].headers["host"] == f"localhost:{tls_server.port}"


def test_latency_is_measured_finer_than_the_loops_clock() -> None:
    """uvloop's loop.time() moves in whole milliseconds: a latency from it says 0 or 1 ms for a fast
    receiver. Latencies come from a high-resolution clock instead."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[float]:
        server = await Server(script=deque([Answer()] * 10)).start()
        try:
            async with open_client() as client:
                return [(await client.post(server.url(), b"{}", HEADERS)).elapsed_ms for _ in range(10)]
        finally:
            await server.stop()

    latencies = uvloop.run(scenario())
    assert any(latency != int(latency) for latency in latencies), latencies
