"""Webhook POSTs: Darkroom's DeliveryClient against raw aiohttp and httpx, same run, same machine.

    python benchmarks/transport.py [--requests 10000] [--concurrency 20] [--rounds 3] [--loop asyncio|uvloop]

A fast receiver (asyncio + httptools, uvloop when installed) runs in a child process, so its CPU is not
the client's. This process then sends --requests signed POSTs of a ~1 KB JSON body, --concurrency at a
time, with each client in turn for --rounds rounds (after a warm-up that opens the connections):

- darkroom: `webhooks.transport.DeliveryClient` (allow_private, as many connections per origin as
  requests in flight);
- aiohttp: one `aiohttp.ClientSession`, reading each response body;
- httpx: one pooled `httpx.AsyncClient`.

Every request is signed here (Standard Webhooks headers, fresh timestamp) by all three alike. Figures per
client are the median round: requests/s, CPU ms per request of this process (`time.process_time`), and
p50/p99 latency of the POST calls. Prints one JSON object; the goal behind it (issue 4): the delivery
engine reaches at least half of raw aiohttp's throughput, so this client must cost well under 0.2 ms CPU
per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import httptools
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from webhooks.signing import generate_secret, sign_headers  # noqa: E402
from webhooks.transport import DeliveryClient  # noqa: E402

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
SECRET = generate_secret()
BODY = json.dumps(
    {
        "type": "image.completed",
        "timestamp": "2026-05-09T07:35:25.123Z",
        "data": {
            "id": "img_" + "0" * 26,
            "status": "completed",
            "operations": [{"type": "resize", "params": {"width": 512}}] * 8,
            "output": {"url": "https://cdn.example.com/" + "a" * 200, "format": "jpeg", "width": 512},
            "metadata": {"note": "b" * 300},
        },
    }
).encode()

Post = Callable[[str, bytes, dict[str, str]], Awaitable[int]]


# --- the receiver (child process) ---------------------------------------------------------------------


class _Receiver(asyncio.Protocol):
    """Answers every request 200 as soon as its body is in; keep-alive."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio classes

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(ANSWER)


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Receiver, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def serve() -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve())
    else:
        uvloop.run(_serve())


# --- the clients --------------------------------------------------------------------------------------


async def run_round(post: Post, url: str, requests: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    remaining = requests

    async def sender() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            headers = {**sign_headers([SECRET], "msg_benchmark", BODY), "content-type": "application/json"}
            started = time.perf_counter()
            status = await post(url, BODY, headers)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"the receiver answered {status}")

    cpu_started, wall_started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu_started, time.perf_counter() - wall_started
    latencies.sort()
    return {
        "requests_per_s": round(requests / wall),
        "cpu_ms_per_request": round(cpu * 1000 / requests, 4),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
    }


class Clients:
    """The three clients, each opened once and reused across rounds, as a sender would."""

    def __init__(self, concurrency: int) -> None:
        self.darkroom = DeliveryClient(allow_private=True, max_connections_per_origin=concurrency)
        self.aiohttp = aiohttp.ClientSession()
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.httpx = httpx.AsyncClient(limits=limits)

    async def post_darkroom(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        return (await self.darkroom.post(url, body, headers)).status_code

    async def post_aiohttp(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        async with self.aiohttp.post(url, data=body, headers=headers, allow_redirects=False) as response:
            await response.read()
            return response.status

    async def post_httpx(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        return (await self.httpx.post(url, content=body, headers=headers)).status_code

    def posts(self) -> dict[str, Post]:
        return {"darkroom": self.post_darkroom, "aiohttp": self.post_aiohttp, "httpx": self.post_httpx}

    async def aclose(self) -> None:
        await self.darkroom.aclose()
        await self.aiohttp.close()
        await self.httpx.aclose()


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    clients = Clients(args.concurrency)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in clients.posts()}
    try:
        for post in clients.posts().values():
            await run_round(post, url, args.concurrency * 20, args.concurrency)
        for _ in range(args.rounds):
            for name, post in clients.posts().items():
                rounds[name].append(await run_round(post, url, args.requests, args.concurrency))
    finally:
        await clients.aclose()
    medians = {name: _median_round(results) for name, results in rounds.items()}
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loop": args.loop},
        "requests_per_round": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "body_bytes": len(BODY),
        "clients": medians,
        "darkroom_vs_aiohttp": round(
            medians["darkroom"]["requests_per_s"] / medians["aiohttp"]["requests_per_s"], 2
        ),
        "every_round": rounds,
    }


def _median_round(results: list[dict[str, float]]) -> dict[str, float]:
    """The round of median throughput, whole (its CPU and latency figures belong together)."""
    ranked = sorted(results, key=lambda r: r["requests_per_s"])
    return ranked[len(ranked) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    receiver = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert receiver.stdout is not None
        url = f"http://127.0.0.1:{receiver.stdout.readline().strip()}/hooks"
        if args.loop == "uvloop":
            import uvloop

            result = uvloop.run(measure(url, args))
        else:
            result = asyncio.run(measure(url, args))
    finally:
        receiver.terminate()
        receiver.wait()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
