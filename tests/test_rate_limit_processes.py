"""Two web processes, one Redis: an account's rate limit is one allowance, whichever process answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import redis

from server.embedded_redis import EmbeddedRedis
from tests.test_processes import (
    Children,
    create_account,
    free_port,
    procfile_command,
    service_env,
    wait_until_ready,
)
from tests.test_processes import children as children  # the fixture


async def test_two_web_processes_share_one_allowance(
    children: Children, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    ports = [free_port(), free_port()]
    envs = [service_env(tmp_path / "data", port, redis_server.url) for port in ports]
    webs = [
        children.start(f"web{n}", procfile_command("web", port), env)
        for n, (port, env) in enumerate(zip(ports, envs, strict=True))
    ]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    for base, web in zip(bases, webs, strict=True):
        wait_until_ready(base, [web])
    # Ten a minute: one back every 6 s, longer than the burst below takes.
    partner = create_account(envs[0], "shared", "--requests-per-minute", "10")

    async with httpx.AsyncClient(timeout=10, headers=partner.headers) as http:
        answers = await asyncio.gather(*(http.get(f"{bases[n % 2]}/v1/images") for n in range(24)))

    # Twelve to each process, ten let through in all: one allowance, not one each.
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 14, statuses
    # Each unit was handed out once: the remainders the ten saw are 9 down to 0, none twice.
    granted = sorted(int(a.headers["x-ratelimit-remaining"]) for a in answers if a.status_code == 200)
    assert granted == list(range(10))
    for refused in (a for a in answers if a.status_code == 429):
        assert refused.headers["x-ratelimit-remaining"] == "0"
        assert 1 <= int(refused.headers["retry-after"]) <= 6


def test_behind_a_trusted_proxy_failed_authentications_count_by_forwarded_client(
    children: Children, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """The Procfile's web process takes X-Forwarded-For from a proxy on loopback (uvicorn's default
    FORWARDED_ALLOW_IPS): two clients behind it are two addresses, not the proxy's one."""
    port = free_port()
    env = {**service_env(tmp_path / "data", port, redis_server.url), "DARKROOM_FAILED_AUTH_LIMIT": "2"}
    web = children.start("web", procfile_command("web", port), env)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base, [web])

    def answer(client: str) -> httpx.Response:
        guessing = {"Authorization": "Bearer sk_live_guess", "X-Forwarded-For": f"{client}, 127.0.0.1"}
        return httpx.get(f"{base}/v1/images", headers=guessing, timeout=10)

    assert [answer("203.0.113.1").status_code for _ in range(3)] == [401, 401, 429]
    assert answer("203.0.113.1").json()["code"] == "too_many_failed_authentications"
    assert answer("203.0.113.2").status_code == 401
