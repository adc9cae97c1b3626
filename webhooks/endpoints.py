"""Registered webhook endpoints: where an account's events go, with their secrets, limits and health.

An endpoint is a Redis hash, so that the dispatcher recording its health (`failing_since`, disabling
it) and the partner editing it (url, events) change separate fields and never overwrite each other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from redis.asyncio import Redis
from redis.exceptions import WatchError

from webhooks.messages import (
    DUE_KEY,
    LEASES_KEY,
    Attempt,
    Destination,
    endpoint_pending_key,
    iso,
    now_ms,
)
from webhooks.signing import generate_secret

EndpointStatus = Literal["enabled", "disabled"]
ALL_EVENTS = "*"
EventType = Literal[
    "image.completed",
    "image.failed",
    "batch.completed",
    "batch.archive.ready",
    "batch.archive.failed",
    "endpoint.disabled",
    "webhook.test",
]
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)
DEFAULT_MAX_IN_FLIGHT = 10


def endpoint_key(endpoint_id: str) -> str:
    return f"dr:ep:{endpoint_id}"


def endpoint_leases_key(endpoint_id: str) -> str:
    """Deliveries to the endpoint in flight, scored by when their lease runs out (see the dispatcher)."""
    return f"dr:ep:{endpoint_id}:leases"


# The endpoints with deliveries parked (in `dr:ep:{id}:parked`) until a slot frees; see the dispatcher.
PARKED_ENDPOINTS_KEY = "dr:webhooks:parked"
# The origins with deliveries parked (in `dr:origin:{scheme://host:port}:parked`), likewise.
PARKED_ORIGINS_KEY = "dr:webhooks:parked-origins"
# Secrets that sign at once, the current one included: each adds a signature to every delivery, and a
# header past 8 KB is refused by common proxies (nginx's default), so the oldest rotated-out go first.
MAX_VALID_SECRETS = 5
# The reason shown for an endpoint its owner disabled (PATCH {"status": "disabled"}).
DISABLED_BY_OWNER = "disabled by you"


def endpoint_parked_key(endpoint_id: str) -> str:
    """Deliveries to the endpoint waiting for one of its slots (see the dispatcher)."""
    return f"dr:ep:{endpoint_id}:parked"


def account_endpoints_key(account_id: str) -> str:
    return f"dr:account:{account_id}:endpoints"


@dataclass(frozen=True)
class SigningSecret:
    secret: str
    expires_at_ms: int | None = None  # set once rotated out: still signs until then

    def valid_at(self, moment_ms: int) -> bool:
        return self.expires_at_ms is None or moment_ms < self.expires_at_ms


def valid_secrets(secrets: Sequence[SigningSecret], moment_ms: int) -> list[str]:
    return [each.secret for each in secrets if each.valid_at(moment_ms)]


def rotated(secrets: Sequence[SigningSecret], new_secret: str, grace_ms: int) -> list[SigningSecret]:
    """A new current secret; the old ones keep signing for `grace_ms`, expired ones are dropped, and so
    are the oldest beyond MAX_VALID_SECRETS (newest first, as stored)."""
    moment = now_ms()
    kept = [
        SigningSecret(each.secret, each.expires_at_ms or moment + grace_ms)
        for each in secrets
        if each.valid_at(moment)
    ]
    return [SigningSecret(new_secret), *kept][:MAX_VALID_SECRETS]


def dump_secrets(secrets: Sequence[SigningSecret]) -> str:
    return json.dumps([[each.secret, each.expires_at_ms] for each in secrets])


def load_secrets(raw: str | bytes) -> list[SigningSecret]:
    return [SigningSecret(secret, expires) for secret, expires in json.loads(raw)]


@dataclass(frozen=True)
class Endpoint:
    id: str
    account_id: str
    url: str
    events: tuple[str, ...]
    description: str
    created_at: str
    secrets: tuple[SigningSecret, ...] = field(default_factory=tuple)
    status: EndpointStatus = "enabled"
    disabled_reason: str | None = None
    disabled_at: str | None = None
    failing_since_ms: int | None = None
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    rate_limit: int | None = None  # deliveries per second, None for no limit

    def subscribes_to(self, event_type: str) -> bool:
        return ALL_EVENTS in self.events or event_type in self.events

    @property
    def current_secret(self) -> str:
        return self.secrets[0].secret

    def resource(self) -> dict[str, Any]:
        return {
            "object": "webhook_endpoint",
            "id": self.id,
            "url": self.url,
            "events": list(self.events),
            "description": self.description,
            "status": self.status,
            "disabled_reason": self.disabled_reason,
            "disabled_at": self.disabled_at,
            "failing_since": None if self.failing_since_ms is None else iso(self.failing_since_ms),
            "max_in_flight": self.max_in_flight,
            "rate_limit": self.rate_limit,
            "created_at": self.created_at,
        }

    def to_hash(self) -> dict[str, str]:
        fields = {
            "id": self.id,
            "account_id": self.account_id,
            "url": self.url,
            "events": json.dumps(list(self.events)),
            "description": self.description,
            "created_at": self.created_at,
            "secrets": dump_secrets(self.secrets),
            "status": self.status,
            "max_in_flight": str(self.max_in_flight),
        }
        if self.rate_limit is not None:
            fields["rate_limit"] = str(self.rate_limit)
        return fields

    @classmethod
    def from_fields(cls, flat: list[bytes]) -> Endpoint | None:
        """From HGETALL's reply inside a Lua script: field, value, field, value…"""
        return cls.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> Endpoint | None:
        """None for an empty or partial hash (an endpoint deleted while something wrote to it)."""
        data = {key.decode(): value.decode() for key, value in raw.items()}
        if "id" not in data:
            return None
        return cls(
            id=data["id"],
            account_id=data["account_id"],
            url=data["url"],
            events=tuple(json.loads(data["events"])),
            description=data.get("description", ""),
            created_at=data["created_at"],
            secrets=tuple(load_secrets(data["secrets"])),
            status="disabled" if data.get("status") == "disabled" else "enabled",
            disabled_reason=data.get("disabled_reason"),
            disabled_at=data.get("disabled_at"),
            failing_since_ms=int(data["failing_since"]) if "failing_since" in data else None,
            max_in_flight=int(data.get("max_in_flight", DEFAULT_MAX_IN_FLIGHT)),
            rate_limit=int(data["rate_limit"]) if "rate_limit" in data else None,
        )


# Create an endpoint unless its account has ARGV[1] already ('' for no limit): the count and the write
# in one step, so that concurrent creates cannot pass the limit together.
# KEYS: the endpoint, the account's endpoints. ARGV: limit, endpoint id, then its hash fields and values.
_CREATE = """
if ARGV[1] ~= '' and redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""
# Delete an endpoint and end its pending deliveries failed, each with a last attempt saying why. One with
# an attempt in flight is left to it: recording that attempt finds the endpoint gone and ends it too.
# A delivery's record key is 'dr:dlv:' followed by its due-set member (webhooks.messages).
# KEYS: the endpoint, the account's endpoints, its leases, its parked and its pending deliveries,
# PARKED_ENDPOINTS_KEY, DUE_KEY, LEASES_KEY. ARGV: endpoint id, now (epoch ms), the last attempt (JSON).
_DELETE = """
local now = tonumber(ARGV[2])
for _, member in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  local lease = redis.call('ZSCORE', KEYS[8], member)
  if not (lease and tonumber(lease) > now) then
    redis.call('ZREM', KEYS[7], member)
    local raw = redis.call('GET', 'dr:dlv:' .. member)
    if raw then
      local record = cjson.decode(raw)
      if record['status'] == 'pending' then
        local attempt = cjson.decode(ARGV[3])
        attempt['number'] = #record['attempts'] + 1
        table.insert(record['attempts'], attempt)
        record['status'] = 'failed'
        redis.call('SET', 'dr:dlv:' .. member, cjson.encode(record), 'KEEPTTL')
      end
    end
  end
end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[5])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[6], ARGV[1])
"""
_MARK_FAILING = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSETNX', KEYS[1], 'failing_since', ARGV[1]) end
"""
_DISABLE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'enabled' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'disabled', 'disabled_reason', ARGV[1], 'disabled_at', ARGV[2])
return 1
"""


def _disabled_reason(endpoint: Endpoint) -> str | None:
    if endpoint.status == "enabled":
        return None
    return endpoint.disabled_reason or DISABLED_BY_OWNER


class EndpointStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._disable = redis.register_script(_DISABLE)
        self._create = redis.register_script(_CREATE)
        self._delete = redis.register_script(_DELETE)

    async def create(
        self,
        endpoint_id: str,
        account_id: str,
        url: str,
        events: Sequence[str],
        description: str = "",
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        rate_limit: int | None = None,
        limit: int | None = None,
    ) -> Endpoint | None:
        """A new endpoint; None when the account already has `limit` of them."""
        endpoint = Endpoint(
            id=endpoint_id,
            account_id=account_id,
            url=url,
            events=tuple(events),
            description=description,
            created_at=iso(now_ms()),
            secrets=(SigningSecret(generate_secret()),),
            max_in_flight=max_in_flight,
            rate_limit=rate_limit,
        )
        fields = [word for pair in endpoint.to_hash().items() for word in pair]
        created = await self._create(
            keys=[endpoint_key(endpoint.id), account_endpoints_key(account_id)],
            args=["" if limit is None else limit, endpoint.id, *fields],
        )
        return endpoint if created else None

    async def get(self, endpoint_id: str) -> Endpoint | None:
        raw = await self.redis.hgetall(endpoint_key(endpoint_id))  # type: ignore[misc]
        return Endpoint.from_hash(raw)

    async def list_for_account(self, account_id: str) -> list[Endpoint]:
        ids = sorted(
            member.decode()
            for member in await self.redis.smembers(account_endpoints_key(account_id))  # type: ignore[misc]
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            for endpoint_id in ids:
                pipe.hgetall(endpoint_key(endpoint_id))
            raws = await pipe.execute()
        return [endpoint for raw in raws if (endpoint := Endpoint.from_hash(raw)) is not None]

    async def subscribed(self, account_id: str, event_type: str) -> list[Destination]:
        """The endpoints of the account that receive `event_type`. A disabled one is among them with
        its reason, so the event is recorded for it (skipped) and recovering the endpoint sends it."""
        return [
            Destination(endpoint.id, endpoint.url, _disabled_reason(endpoint))
            for endpoint in await self.list_for_account(account_id)
            if endpoint.subscribes_to(event_type)
        ]

    async def update(self, endpoint: Endpoint, changes: dict[str, Any]) -> Endpoint | None:
        """Apply a partner's edit (url, events, description, max_in_flight, rate_limit, status).
        Enabling a disabled endpoint clears its failure record. None if it was deleted meanwhile."""
        fields: dict[str, str] = {}
        removed: list[str] = []
        for name, value in changes.items():
            if name == "events":
                fields[name] = json.dumps(list(value))
            elif name == "rate_limit" and value is None:
                removed.append(name)
            else:
                fields[name] = str(value)
        if changes.get("status") == "enabled":
            removed += ["disabled_reason", "disabled_at", "failing_since"]
        # Disabling goes through _DISABLE: it records when and why, and keeps the reason of an endpoint
        # already disabled (a 410, say).
        disabling = fields.get("status") == "disabled"
        if disabling:
            del fields["status"]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.exists(endpoint_key(endpoint.id))
            if fields:
                pipe.hset(endpoint_key(endpoint.id), mapping=fields)
            if removed:
                pipe.hdel(endpoint_key(endpoint.id), *removed)
            if disabling:
                pipe.eval(_DISABLE, 1, endpoint_key(endpoint.id), DISABLED_BY_OWNER, iso(now_ms()))
            existed = (await pipe.execute())[0]
        if not existed:
            await self.redis.delete(endpoint_key(endpoint.id))
            return None
        return await self.get(endpoint.id)

    async def rotate_secret(self, endpoint_id: str, grace_seconds: float) -> Endpoint | None:
        """A new current secret (see `rotated`); None if the endpoint is gone. Optimistic: concurrent
        rotations each keep the others' secrets, and each returns its own."""
        key = endpoint_key(endpoint_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    endpoint = Endpoint.from_hash(await pipe.hgetall(key))  # type: ignore[misc]
                    if endpoint is None:
                        return None
                    secrets = rotated(endpoint.secrets, generate_secret(), int(grace_seconds * 1000))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(key, "secrets", dump_secrets(secrets))
                    await pipe.execute()
                    return replace(endpoint, secrets=tuple(secrets))
                except WatchError:
                    continue

    async def delete(self, endpoint: Endpoint) -> None:
        """Remove the endpoint; its pending deliveries end failed (see _DELETE)."""
        last = Attempt(0, iso(now_ms()), None, 0.0, "", "the endpoint was deleted")
        await self._delete(
            keys=[
                endpoint_key(endpoint.id),
                account_endpoints_key(endpoint.account_id),
                endpoint_leases_key(endpoint.id),
                endpoint_parked_key(endpoint.id),
                endpoint_pending_key(endpoint.id),
                PARKED_ENDPOINTS_KEY,
                DUE_KEY,
                LEASES_KEY,
            ],
            args=[endpoint.id, now_ms(), last.to_json()],
        )

    # --- health, recorded by the dispatcher inside its attempt transactions --------------------------

    @staticmethod
    def stage_success(pipe: Any, endpoint_id: str) -> None:
        pipe.hdel(endpoint_key(endpoint_id), "failing_since")

    @staticmethod
    def stage_failure(pipe: Any, endpoint_id: str, moment_ms: int) -> None:
        # Not a bare HSETNX: on an endpoint deleted meanwhile it would create a hash of that one field.
        pipe.eval(_MARK_FAILING, 1, endpoint_key(endpoint_id), str(moment_ms))

    async def disable(self, endpoint_id: str, reason: str) -> bool:
        """Disable an enabled endpoint; False when it already was (or is gone), so that several
        failures at once disable and announce it only once."""
        changed = await self._disable(keys=[endpoint_key(endpoint_id)], args=[reason, iso(now_ms())])
        return bool(changed)
