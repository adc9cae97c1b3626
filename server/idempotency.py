"""`Idempotency-Key` on every POST under /v1, with Stripe's semantics.

The first request with a key claims it in Redis (a lock token that lapses after
`DARKROOM_IDEMPOTENCY_LOCK_TIMEOUT`, so the claim of a web process that died holding it frees itself),
runs, and its response is kept for `DARKROOM_IDEMPOTENCY_TTL` with a fingerprint of the request. The same
key again, from any web process, while the first still runs: 409 `idempotency_key_in_use`; afterwards,
with the same request: the kept response with `Idempotent-Replayed: true`; with another request: 422
`idempotency_key_reused`. Keys are the account's own: two accounts may use the same key.

A pure ASGI middleware, not BaseHTTPMiddleware: the body streams through to the route (an upload is
never held in memory here), hashed on the way.

What is not kept frees the key, so the client may send the request again: a response of ours that
failed (5xx), one refused before it was the account's to keep (401, 429) or before its body was taken
(408, 413, 415), a conflict with the state of what it acts on (409: an upload's bytes not landed yet,
an attempt under way; nothing was done, and the same request is to be sent again once that changes),
or answered before a body over 64 KB was read (an upload refused before its bytes
came), a request whose client went away before its body arrived, and a response body over
MAX_STORED_BODY_BYTES (larger than any POST of ours answers: 50 images' resources are ~250 KB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Literal

from python_multipart.multipart import parse_options_header
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.settings import Settings
from server.auth import require_account
from server.problems import Problem, handle_store_unavailable, problem_response

log = logging.getLogger("darkroom.idempotency")

KEY_HEADER = b"idempotency-key"
MAX_KEY_LENGTH = 255
MAX_STORED_BODY_BYTES = 1024 * 1024
# A route that answers without reading the body (a seal, a retry) is kept once the rest of the body is
# read for the fingerprint; a larger body than this (an upload the route refused before its bytes) is not
# read, and its response not kept.
MAX_UNREAD_BODY_BYTES = 64 * 1024
IN_USE_RETRY_AFTER_SECONDS = 1
REPLAYED_HEADER = (b"idempotent-replayed", b"true")
# Statuses below 500 that are not kept (see the module's docstring).
_NOT_KEPT = frozenset({401, 408, 409, 413, 415, 429})
# Headers that describe this one response, not the resource: a replay gets its own.
_PER_RESPONSE_HEADERS = frozenset({b"date", b"server", b"x-request-id", b"retry-after"})
_PER_RESPONSE_PREFIXES = (b"ratelimit", b"x-ratelimit")

# A key holds either `lock` (a request runs) or the kept response. Answers the kept response's fields,
# `lock` first; nothing when the key was free and is now claimed by ARGV[1] for ARGV[2] ms.
_CLAIM = """
local found = redis.call('HMGET', KEYS[1], 'lock', 'fingerprint', 'status', 'headers', 'body')
if found[1] or found[2] then return found end
redis.call('HSET', KEYS[1], 'lock', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return false
"""

# Only the claim's holder keeps a response (ARGV[1] its token; then the fields and the TTL in seconds):
# a request that outlived its lock, whose key another request has claimed since, keeps nothing.
_KEEP = """
if redis.call('HGET', KEYS[1], 'lock') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[2], 'status', ARGV[3], 'headers', ARGV[4], 'body', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 1
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'lock') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class KeptResponse:
    fingerprint: str
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


Claim = KeptResponse | Literal["claimed", "in_use"]


class IdempotencyRecords:
    """The keys of every account in Redis, shared by every web process."""

    def __init__(self, redis: Redis) -> None:
        self._claim = redis.register_script(_CLAIM)
        self._keep = redis.register_script(_KEEP)
        self._release = redis.register_script(_RELEASE)

    async def claim(self, record: str, token: str, lock_timeout: float) -> Claim:
        found = await self._claim(keys=[record], args=[token, int(lock_timeout * 1000)])
        if found is None:
            return "claimed"
        lock, fingerprint, status, headers, body = found
        if lock is not None:
            return "in_use"
        return KeptResponse(
            fingerprint.decode(),
            int(status),
            [(name.encode("latin-1"), value.encode("latin-1")) for name, value in json.loads(headers)],
            body,
        )

    async def keep(self, record: str, token: str, response: KeptResponse, ttl: int) -> None:
        headers = json.dumps(
            [[name.decode("latin-1"), value.decode("latin-1")] for name, value in response.headers]
        )
        await self._keep(
            keys=[record],
            args=[token, response.fingerprint, response.status, headers, response.body, ttl],
        )

    async def release(self, record: str, token: str) -> None:
        await self._release(keys=[record], args=[token])


def record_key(account_id: str, idempotency_key: str) -> str:
    return f"idempotency:{account_id}:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"


class RequestFingerprint:
    """SHA-256 of the method, path, query and body, the body hashed as it streams past.

    A multipart body's boundary is left out: client libraries (requests, httpx, browsers) pick a new
    random boundary for each request, so a retry of the same parts would otherwise never match."""

    def __init__(self, scope: Scope, content_type: str) -> None:
        self._hash = hashlib.sha256()
        for part in (scope["method"].encode(), scope["path"].encode(), scope["query_string"]):
            self._hash.update(len(part).to_bytes(8, "big") + part)
        media_type, options = parse_options_header(content_type)
        boundary = options.get(b"boundary") if media_type.startswith(b"multipart/") else None
        self._delimiter = b"--" + boundary if boundary else None
        # The end of the body so far that may be the start of a delimiter, hashed once the next chunk
        # shows it is not.
        self._held = b""
        self.complete = False

    def add(self, message: Message) -> None:
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if self._delimiter is None:
            self._hash.update(chunk)
        else:
            *between, tail = (self._held + chunk).split(self._delimiter)
            for piece in between:
                self._hash.update(piece)
            cut = len(tail) if not more else max(len(tail) - len(self._delimiter) + 1, 0)
            self._hash.update(tail[:cut])
            self._held = tail[cut:]
        self.complete = not more

    async def take_rest(self, receive: Receive) -> bool:
        """Reads and hashes what is left of the body; False if the client went away before its end."""
        while not self.complete:
            message = await receive()
            if message["type"] != "http.request":
                return False
            self.add(message)
        return True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def small_body(scope: Scope) -> bool:
    """A body of at most MAX_UNREAD_BODY_BYTES, or none."""
    headers = dict(scope["headers"])
    if b"content-length" in headers:
        return int(headers[b"content-length"]) <= MAX_UNREAD_BODY_BYTES
    return b"transfer-encoding" not in headers


def kept_status(status: int) -> bool:
    return status < 500 and status not in _NOT_KEPT


def replayable_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [
        (name, value)
        for name, value in headers
        if name.lower() not in _PER_RESPONSE_HEADERS and not name.lower().startswith(_PER_RESPONSE_PREFIXES)
    ]


def idempotency_key(scope: Scope) -> str:
    """The request's Idempotency-Key, or a Problem for one we cannot keep."""
    values = [value for name, value in scope["headers"] if name == KEY_HEADER]
    if len(values) > 1:
        raise Problem(400, "invalid_idempotency_key", "send one Idempotency-Key header, not several")
    key: bytes = values[0]
    if not 1 <= len(key) <= MAX_KEY_LENGTH or any(not 0x20 <= byte <= 0x7E for byte in key):
        raise Problem(
            400,
            "invalid_idempotency_key",
            f"an Idempotency-Key is 1 to {MAX_KEY_LENGTH} printable ASCII characters (a UUID will do)",
        )
    return key.decode("ascii")


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.ttl = settings.idempotency_ttl
        self.lock_timeout = settings.idempotency_lock_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if not any(name == KEY_HEADER for name, _ in scope["headers"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            # A 401 or 429 answered here is not kept. The request is counted against the account's rate
            # limit here, once (the route asks again and is not counted again): a replay is a request too.
            account = await require_account(request)
            record = record_key(account.id, idempotency_key(scope))
            token = secrets.token_hex(16)
            records: IdempotencyRecords = request.app.state.idempotency
            claim = await records.claim(record, token, self.lock_timeout)
        except Problem as problem:
            await problem_response(request, problem)(scope, receive, send)
            return
        except RedisError as exc:
            await (await handle_store_unavailable(request, exc))(scope, receive, send)
            return
        fingerprint = RequestFingerprint(scope, request.headers.get("content-type", ""))
        if claim == "claimed":
            await self._run_and_keep(scope, receive, send, records, record, token, fingerprint)
        elif claim == "in_use":
            await problem_response(
                request,
                Problem(
                    409,
                    "idempotency_key_in_use",
                    "a request with this Idempotency-Key is still being processed; retry after it ends",
                    headers={"Retry-After": str(IN_USE_RETRY_AFTER_SECONDS)},
                ),
            )(scope, receive, send)
        else:
            await self._replay(scope, receive, send, claim, fingerprint)

    async def _run_and_keep(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        records: IdempotencyRecords,
        record: str,
        token: str,
        fingerprint: RequestFingerprint,
    ) -> None:
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        body: list[bytes] = []
        body_size = 0
        keeping = False
        kept = False

        async def receive_hashed() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not fingerprint.complete:
                fingerprint.add(message)
            return message

        async def take_rest_of_body() -> bool:
            """The rest of a body the route did not read, for the fingerprint; False if it never came,
            or is an upload's (a route refuses before the body so that the client need not send it)."""
            if not fingerprint.complete and not small_body(scope):
                return False
            try:
                return await fingerprint.take_rest(receive)
            except Problem:  # the body deadline passed
                return False

        async def send_keeping(message: Message) -> None:
            nonlocal status, headers, body_size, keeping, kept
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = replayable_headers(list(message.get("headers", [])))
                keeping = kept_status(status) and await take_rest_of_body()
            elif message["type"] == "http.response.body" and keeping:
                body.append(message.get("body", b""))
                body_size += len(body[-1])
                keeping = body_size <= MAX_STORED_BODY_BYTES
                if not keeping:
                    body.clear()
                if keeping and not message.get("more_body", False):
                    # Kept before the client sees the end of the response: a retry sent the moment it
                    # arrives finds the response, not the claim.
                    response = KeptResponse(fingerprint.hexdigest(), status, headers, b"".join(body))
                    try:
                        await records.keep(record, token, response, self.ttl)
                        kept = True
                    except RedisError:
                        log.warning("could not keep the response for an Idempotency-Key", exc_info=True)
            await send(message)

        try:
            await self.app(scope, receive_hashed, send_keeping)
        finally:
            if not kept:
                try:
                    await records.release(record, token)
                except RedisError:
                    # The claim lapses by itself after the lock timeout.
                    log.warning("could not release an Idempotency-Key", exc_info=True)

    async def _replay(
        self, scope: Scope, receive: Receive, send: Send, kept: KeptResponse, fingerprint: RequestFingerprint
    ) -> None:
        request = Request(scope)
        try:
            if not await fingerprint.take_rest(receive):
                return  # the client went away
        except Problem as problem:  # the body deadline passed
            await problem_response(request, problem)(scope, receive, send)
            return
        if not secrets.compare_digest(fingerprint.hexdigest(), kept.fingerprint):
            await problem_response(
                request,
                Problem(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for another request (method, path, query or body); "
                    "use a new key for a new request",
                ),
            )(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": kept.status,
                "headers": [*kept.headers, REPLAYED_HEADER],
            }
        )
        await send({"type": "http.response.body", "body": kept.body})
