"""Accounts, API keys and image records in Redis.

Layout (every key under `dr:`):
- `dr:account:{id}` account JSON; `dr:apikey:{sha256(key)}` → account id (keys are never stored);
- `dr:image:{id}` image JSON; `dr:account:{id}:images` index of the account's image ids (one score, so
  ordered by id, and ids sort by creation time).
- `dr:images:expiring` and `dr:batches:expiring`: image and batch ids scored by when the retention sweep
  deletes them (jobs/retention.py); a batch's score is the latest of its creation's and its images'.
- `dr:ended-runs:{id}` the runs of an image's or archive's job that ended without crashing: how often it
  found the storage full (and since when), and how often a worker shutting down stopped it.
- `dr:uploads:expiring` direct uploads whose bytes have not landed, by image id, scored by when their
  signed URL expires (jobs/uploads.py); `dr:upload-signing-key` the secret that signs those URLs.
- `dr:public-url` the base of links a web process last announced (for workers without DARKROOM_PUBLIC_URL).
- A batch image also counts in its batch (jobs/batches.py): every transaction that adds, starts, finishes
  or deletes an image moves the batch's counters, its index and its failure list with it, and announces
  the change of both on the account's channel (webhooks/changes.py).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from jobs import stats
from jobs.ids import lowest_id_at, new_id
from jobs.plans import DEFAULT_TIER, TIERS, Plan
from jobs.queue import stage_image_job
from jobs.records import ACCOUNT_KEY_PREFIX, BATCH_TOTAL, Account, ImageRecord, epoch_ms, utc_now
from webhooks.changes import stage_change
from webhooks.endpoints import EndpointStore, rotated, valid_secrets
from webhooks.messages import (
    DEFAULT_RETENTION_SECONDS,
    Delivery,
    Message,
    MessageFilter,
    MessageStore,
    now_ms,
)
from webhooks.signing import generate_secret

API_KEY_PREFIX = "sk_live_"
# Messages looked through per step when redelivering an endpoint's failures.
REDELIVERY_BATCH = 200


def _account_key(account_id: str) -> str:
    return ACCOUNT_KEY_PREFIX + account_id


def _api_key_key(key_hash: str) -> str:
    return f"dr:apikey:{key_hash}"


def image_key(image_id: str) -> str:
    return f"dr:image:{image_id}"


def ended_runs_key(subject_id: str) -> str:
    return f"dr:ended-runs:{subject_id}"


def _account_images_key(account_id: str) -> str:
    return f"dr:account:{account_id}:images"


PUBLIC_URL_KEY = "dr:public-url"
UPLOAD_SIGNING_KEY = "dr:upload-signing-key"
# Image and batch ids scored by their expiry (epoch ms).
EXPIRING_IMAGES_KEY = "dr:images:expiring"
EXPIRING_BATCHES_KEY = "dr:batches:expiring"
# Image ids of direct uploads still waiting for their bytes, scored by their URL's expiry (epoch ms).
EXPIRING_UPLOADS_KEY = "dr:uploads:expiring"


def batch_key(batch_id: str) -> str:
    return f"dr:batch:{batch_id}"


def batch_images_key(batch_id: str) -> str:
    return f"dr:batch:{batch_id}:images"


def batch_failures_key(batch_id: str) -> str:
    """Image id → `{image_id, filename, error}` of each failed image: what batch.completed reports."""
    return f"dr:batch:{batch_id}:failures"


def stage_image_change(pipe: Any, before: ImageRecord | None, after: ImageRecord | None) -> None:
    """What every transaction that adds, changes or deletes an image (`before` None: new; `after` None:
    deleted) commits with it: its batch's counters, and the notifications of both changes."""
    image = after or before
    if image is None:
        return
    stage_change(pipe, image.account_id, "image", image.id)
    if image.batch_id is not None:
        stage_batch_change(pipe, before, after)
        stage_change(pipe, image.account_id, "batch", image.batch_id)


def stage_batch_change(pipe: Any, before: ImageRecord | None, after: ImageRecord | None) -> None:
    """Move a batch image's counters (and index, and failure entry) from `before` (None: new) to `after`
    (None: deleted), in the transaction that makes the change, so the counts never drift."""
    image = after or before
    if image is None or image.batch_id is None:
        return
    key = batch_key(image.batch_id)
    if before is None:
        pipe.hincrby(key, BATCH_TOTAL, 1)
        pipe.zadd(batch_images_key(image.batch_id), {image.id: 0})
    elif after is None:
        pipe.hincrby(key, BATCH_TOTAL, -1)
        pipe.zrem(batch_images_key(image.batch_id), image.id)
        pipe.hdel(batch_failures_key(image.batch_id), image.id)
    if before is not None and after is not None and before.status == after.status:
        return
    if before is not None:
        pipe.hincrby(key, before.status, -1)
    if after is not None:
        pipe.hincrby(key, after.status, 1)
        if after.status == "failed" and after.error is not None:
            failure = {"image_id": after.id, "filename": after.filename, "error": asdict(after.error)}
            pipe.hset(batch_failures_key(image.batch_id), after.id, json.dumps(failure))


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


# The API keys a process remembers (the most recently authenticated first to stay).
MAX_REMEMBERED_KEYS = 10_000


@dataclass(frozen=True)
class RememberedAccount:
    """An account as this process last read it for an API key, with the SHA-1 of its stored JSON then:
    a script checks that the key still names it, unchanged (ACCOUNT_UNCHANGED_LUA), in the step that
    acts for it, instead of reading it first in a round trip of its own."""

    account: Account
    key_hash: str
    fingerprint: str

    def checked(self) -> tuple[list[str], list[str]]:
        """The keys and the arguments of account_unchanged for this account."""
        return [_api_key_key(self.key_hash), _account_key(self.account.id)], [
            self.account.id,
            self.fingerprint,
        ]


# account_unchanged(key entry, account key, account id, fingerprint): the API key's entry still names
# the account, whose JSON still has that SHA-1 fingerprint.
ACCOUNT_UNCHANGED_LUA = """
local function account_unchanged(key_entry, account_key, account_id, fingerprint)
  if redis.call('GET', key_entry) ~= account_id then return false end
  local raw = redis.call('GET', account_key)
  return raw ~= false and redis.sha1hex(raw) == fingerprint
end
"""


@dataclass(frozen=True)
class NewAccount:
    account: Account
    api_key: str


# Every request authenticates: key hash → account id → account in one round trip, not two.
_ACCOUNT_BY_KEY = """
local account_id = redis.call('GET', KEYS[1])
if not account_id then return false end
return redis.call('GET', ARGV[1] .. account_id)
"""


# A Lua function for scripts that apply commands staged in Python (Store.staged_commands): ARGV from
# `first` on holds each command as its word count, then its words.
APPLY_STAGED_LUA = """
local function apply_staged(first)
  local at = first
  while at <= #ARGV do
    local count = tonumber(ARGV[at])
    redis.call(unpack(ARGV, at + 1, at + count))
    at = at + count + 1
  end
end
"""

# KEYS[1] must hold ARGV[1]; then the staged commands run.
_COMMIT_IF_HOLDS = (
    APPLY_STAGED_LUA
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
apply_staged(2)
return 1
"""
)


class Store:
    def __init__(self, redis: Redis, *, message_retention: int = DEFAULT_RETENTION_SECONDS) -> None:
        self.redis = redis
        self._account_by_key = redis.register_script(_ACCOUNT_BY_KEY)
        self._remembered: dict[str, RememberedAccount] = {}
        self._commit_if_holds = redis.register_script(_COMMIT_IF_HOLDS)
        self.messages = MessageStore(
            redis, message_retention, oldest_kept_id=functools.partial(lowest_id_at, "msg")
        )
        self.endpoints = EndpointStore(redis)

    @classmethod
    def connect(cls, redis_url: str, command_timeout: float | None = None) -> Store:
        """A store on its own connection pool; with `command_timeout`, connecting or a command that takes
        longer raises (a `redis.exceptions.TimeoutError`) instead of waiting for ever."""
        return cls(
            Redis.from_url(redis_url, socket_connect_timeout=command_timeout, socket_timeout=command_timeout)
        )

    async def close(self) -> None:
        await self.redis.aclose()

    async def announce_public_url(self, url: str) -> None:
        await self.redis.set(PUBLIC_URL_KEY, url)

    async def announced_public_url(self) -> str | None:
        raw = await self.redis.get(PUBLIC_URL_KEY)
        return None if raw is None else raw.decode()

    async def create_account(self, name: str, plan: Plan = TIERS[DEFAULT_TIER]) -> NewAccount:
        api_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        account = Account(
            id=new_id("acc"),
            name=name,
            webhook_secret=generate_secret(),
            api_key_hash=hash_api_key(api_key),
            created_at=utc_now(),
            plan=plan,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(_account_key(account.id), account.to_json())
            pipe.set(_api_key_key(account.api_key_hash), account.id)
            await pipe.execute()
        return NewAccount(account, api_key)

    async def get_account(self, account_id: str) -> Account | None:
        raw = await self.redis.get(_account_key(account_id))
        return None if raw is None else Account.from_json(raw)

    async def webhook_secrets(self, account_id: str) -> list[str] | None:
        """The secrets that sign the account's callbacks, the current one first, then those rotated out
        less than the grace period ago; None once the account is gone."""
        account = await self.get_account(account_id)
        return None if account is None else valid_secrets(account.signing_secrets, now_ms())

    async def rotate_webhook_secret(self, account_id: str, grace_seconds: float) -> Account | None:
        """A new callback signing secret; the old one keeps signing beside it for `grace_seconds`."""
        grace_ms = int(grace_seconds * 1000)
        return await self._change_account(
            account_id,
            lambda account: account.with_signing_secrets(
                rotated(account.signing_secrets, generate_secret(), grace_ms)
            ),
        )

    async def change_plan(self, account_id: str, new_plan: Callable[[Plan], Plan]) -> Account | None:
        """Give the account the plan `new_plan` makes of its current one, read in the same transaction (so
        two changes at once each apply to what the other left): its limits apply from its next request
        on, in every web process."""
        return await self._change_account(
            account_id, lambda account: replace(account, plan=new_plan(account.plan))
        )

    async def _change_account(self, account_id: str, change: Callable[[Account], Account]) -> Account | None:
        """The account changed by `change` and saved, unless another change came between reading and
        saving it (then `change` runs again on that one); None if there is no such account."""
        key = _account_key(account_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        return None
                    changed = change(Account.from_json(raw))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, changed.to_json())
                    await pipe.execute()
                    return changed
                except WatchError:
                    continue

    async def save_message(self, message: Message) -> None:
        """A message on its own (a test event), due at once."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.messages.stage_new(pipe, message)
            await pipe.execute()

    async def redeliver_failed(self, account_id: str, where: MessageFilter) -> int:
        """Make every failed or skipped delivery of the account's messages that `where` admits due again
        (for an endpoint, only its own); how many."""
        assert where.created_after is not None, "recovery goes back to a given time, not forever"
        count = 0
        cursor = None
        while True:
            page = await self.messages.list_for_account(
                account_id, limit=REDELIVERY_BATCH, before=cursor, where=MessageFilter()
            )
            if not page:
                return count
            failed = [
                delivery
                for logged in page
                if where.admits(logged.message, logged.deliveries)
                for delivery in logged.deliveries
                if delivery.status in ("failed", "skipped")
                and where.endpoint_id in (None, delivery.destination)
            ]
            if failed:
                await self.redeliver(account_id, failed)
                count += len(failed)
            if page[-1].message.created_at < where.created_after:
                return count
            cursor = page[-1].id

    async def redeliver(self, account_id: str, deliveries: Sequence[Delivery]) -> None:
        """Make the account's finished deliveries due now, and wake the dispatchers to send them."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.messages.stage_redeliver(pipe, account_id, deliveries)
            await pipe.execute()

    async def authenticate(self, api_key: str) -> Account | None:
        if not api_key.startswith(API_KEY_PREFIX):
            return None
        return await self.account_for_key_hash(hash_api_key(api_key))

    async def account_for_key_hash(self, key_hash: str) -> Account | None:
        """The account of the API key whose hash is `key_hash`, remembered (see `remembered_account`)."""
        raw = await self._account_by_key(keys=[_api_key_key(key_hash)], args=[ACCOUNT_KEY_PREFIX])
        if raw is None:
            return None
        account = Account.from_json(raw)
        if not hmac.compare_digest(account.api_key_hash, key_hash):
            return None
        self._remembered.pop(key_hash, None)
        if len(self._remembered) >= MAX_REMEMBERED_KEYS:
            del self._remembered[next(iter(self._remembered))]
        self._remembered[key_hash] = RememberedAccount(account, key_hash, hashlib.sha1(raw).hexdigest())
        return account

    def remembered_account(self, api_key: str) -> RememberedAccount | None:
        """The account this process last authenticated `api_key` for, unchecked: a script acting for it
        checks it with ACCOUNT_UNCHANGED_LUA."""
        return self._remembered.get(hash_api_key(api_key))

    def new_images_commands(self, images: Sequence[ImageRecord], queue_name: str) -> list[Any]:
        """The commands that save new images and their jobs, staged for a script to apply at once with
        a check of its own (the web's upload rate limit: counted and saved in one round trip)."""

        def writes(pipe: Any) -> None:
            for image in images:
                self.stage_new_image(pipe, image, queue_name)

        return self.staged_commands(writes)

    def staged_commands(self, writes: Callable[[Any], object]) -> list[Any]:
        """The commands `writes` stages on a pipeline, as APPLY_STAGED_LUA takes them."""
        staged = self.redis.pipeline(transaction=False)  # only collects the commands; never executed
        writes(staged)
        args: list[Any] = []
        for command, _options in staged.command_stack:
            args += [len(command), *command]
        return args

    def stage_new_image(self, pipe: Any, image: ImageRecord, queue_name: str) -> None:
        """A new image and its processing job, in one transaction: no `queued` image without a job."""
        pipe.set(image_key(image.id), image.to_json())
        pipe.zadd(_account_images_key(image.account_id), {image.id: 0})
        if image.expires_at is not None:
            pipe.zadd(EXPIRING_IMAGES_KEY, {image.id: epoch_ms(image.expires_at)})
        stage_image_change(pipe, None, image)
        if image.upload is not None and image.upload.status == "pending":
            pipe.zadd(EXPIRING_UPLOADS_KEY, {image.id: epoch_ms(image.upload.expires_at)})
        if not image.awaits_start:
            stats.count(pipe, "images_uploaded")
            stage_image_job(pipe, queue_name, image.id, image.account_id)

    async def settle_upload(
        self, image: ImageRecord, previous: ImageRecord, message: Message | None, queue_name: str
    ) -> bool:
        """Move a direct upload on from `previous` (its bytes landed, were refused, or never came; or its
        start was asked for), only if the record is still exactly `previous`: of two requests racing
        (a PUT sent twice, a PUT and the expiry sweep), one wins and the other is told False. Its job
        (once it no longer awaits its start) and its announcement (once failed) commit with it."""

        def writes(pipe: Any) -> None:
            pipe.set(image_key(image.id), image.to_json())
            stage_image_change(pipe, previous, image)
            if image.upload is not None and image.upload.status != "pending":
                pipe.zrem(EXPIRING_UPLOADS_KEY, image.id)
            if message is not None:
                self.messages.stage_new(pipe, message)
            if image.is_terminal:
                stats.count_finished(pipe, image.status, image.error.code if image.error else None)
            elif not image.awaits_start and previous.awaits_start:
                stats.count(pipe, "images_uploaded")
                stage_image_job(pipe, queue_name, image.id, image.account_id)

        key = image_key(image.id)
        if await self._commit_if_unchanged(key, previous.to_json(), writes):
            return True
        # Stored by an older version (without the fields added since), it is still `previous` if it
        # reads back as it.
        stored, raw = await self._stored_image(image.id)
        return stored == previous and await self._commit_if_unchanged(key, raw, writes)

    async def upload_signing_key(self) -> bytes:
        """The secret every web process signs upload URLs with: made by whichever asks first."""
        await self.redis.set(UPLOAD_SIGNING_KEY, secrets.token_bytes(32), nx=True)
        key: bytes = await self.redis.get(UPLOAD_SIGNING_KEY)
        return key

    async def get_image(self, image_id: str) -> ImageRecord | None:
        raw = await self.redis.get(image_key(image_id))
        return None if raw is None else ImageRecord.from_json(raw)

    async def note_storage_wait(self, subject_id: str, keep_seconds: float) -> tuple[int, int]:
        """Count one more time the job of an image or archive found the storage full: how many times so
        far, and when the first was (epoch ms)."""
        key = ended_runs_key(subject_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "since", str(now_ms()))
            pipe.hincrby(key, "waits", 1)
            pipe.hget(key, "since")
            pipe.expire(key, int(keep_seconds))
            _, waits, since, _ = await pipe.execute()
        return int(waits), int(since)

    async def note_clean_stop(self, subject_id: str, keep_seconds: float) -> None:
        """Count one more run of the job of an image or archive stopped by its worker shutting down."""
        key = ended_runs_key(subject_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "stops", 1)
            pipe.expire(key, int(keep_seconds))
            await pipe.execute()

    async def runs_ended_without_crash(self, subject_id: str, most_stops: int) -> int:
        """How many of the job's runs ended waiting for storage or stopped by a shutdown (at most
        `most_stops` of those: past that, being stopped counts as crashing)."""
        waits, stops = await self.redis.hmget(ended_runs_key(subject_id), ["waits", "stops"])  # type: ignore[misc]
        return int(waits or 0) + min(int(stops or 0), most_stops)

    async def image_exists(self, image_id: str) -> bool:
        return bool(await self.redis.exists(image_key(image_id)))

    async def get_account_image(self, account_id: str, image_id: str) -> ImageRecord | None:
        """Another account's image, or one past its retention, is indistinguishable from a missing one."""
        image = await self.get_image(image_id)
        if image is None or image.account_id != account_id or image.expired_at(utc_now()):
            return None
        return image

    async def update_image(self, image: ImageRecord, *, previous: ImageRecord | None = None) -> bool:
        """Save changes to an image that still exists and is not finished; False if it was deleted or
        finished (by an overlapping run) meanwhile. `previous`, the record as the caller last saw it
        stored, saves reading it first."""
        return await self._replace_unfinished(image, previous) is image

    async def finish_image(
        self,
        image: ImageRecord,
        message: Message | None,
        *,
        previous: ImageRecord | None = None,
        render_seconds: float | None = None,
    ) -> ImageRecord | None:
        """Record the terminal state and its webhook message in one transaction: both or neither (with
        the job's counts and latencies, `render_seconds` if it rendered).

        Returns the image as stored: ours, or the one an overlapping run of the same job finished first
        (never overwritten), or None if its owner deleted it meanwhile. `previous` as for update_image.
        """

        def also(pipe: Any) -> None:
            if message is not None:
                self.messages.stage_new(pipe, message)
            stats.count_finished(pipe, image.status, image.error.code if image.error else None)
            stats.observe_job(pipe, image, render_seconds)

        return await self._replace_unfinished(image, previous, also)

    async def _replace_unfinished(
        self,
        image: ImageRecord,
        previous: ImageRecord | None,
        also: Callable[[Any], None] | None = None,
    ) -> ImageRecord | None:
        """Store `image` in place of the record while that is not finished, with the commands `also`
        stages, in one transaction. The record as stored afterwards: `image` itself, else the finished
        one that stood, or None once deleted."""
        stored, expected = await self._stored_image(image.id, previous)
        while stored is not None and not stored.is_terminal:

            def writes(pipe: Any, before: ImageRecord = stored) -> None:
                pipe.set(image_key(image.id), image.to_json())
                if also is not None:
                    also(pipe)
                stage_image_change(pipe, before, image)

            if await self._commit_if_unchanged(image_key(image.id), expected, writes):
                return image
            stored, expected = await self._stored_image(image.id)
        return stored

    async def _stored_image(
        self, image_id: str, believed: ImageRecord | None = None
    ) -> tuple[ImageRecord | None, bytes | str | None]:
        """The image as stored and its stored JSON; `believed` stands in for it unread (a wrong belief
        only costs _commit_if_unchanged a retry)."""
        if believed is not None:
            return believed, believed.to_json()
        raw = await self.redis.get(image_key(image_id))
        return (None, None) if raw is None else (ImageRecord.from_json(raw), raw)

    async def _commit_if_unchanged(
        self, key: str, expected: bytes | str | None, writes: Callable[[Any], object]
    ) -> bool:
        """Run the commands `writes` stages, atomically, only if `key` still holds `expected`: the
        optimistic transaction of WATCH/GET/MULTI/EXEC in one round trip instead of three."""
        args = [expected, *self.staged_commands(writes)]
        return bool(await self._commit_if_holds(keys=[key], args=args))

    async def delete_image(self, image: ImageRecord) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(image_key(image.id))
                    raw = await pipe.get(image_key(image.id))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.delete(image_key(image.id))
                    pipe.zrem(_account_images_key(image.account_id), image.id)
                    pipe.zrem(EXPIRING_IMAGES_KEY, image.id)
                    pipe.zrem(EXPIRING_UPLOADS_KEY, image.id)
                    if raw is not None:
                        stage_image_change(pipe, ImageRecord.from_json(raw), None)
                    await pipe.execute()
                    return
                except WatchError:  # it moved on meanwhile: count it out as it is now
                    continue

    async def list_images(
        self,
        account_id: str,
        *,
        limit: int,
        before: str | None = None,
        status: str | None = None,
        batch_id: str | None = None,
    ) -> list[ImageRecord]:
        """Newest first, filtered; `before` is the id of the last image of the previous page."""
        found: list[ImageRecord] = []
        maximum = f"({before}" if before else "+"
        index = _account_images_key(account_id)
        moment = utc_now()
        while len(found) < limit:
            ids = await self.redis.zrevrangebylex(index, maximum, "-", start=0, num=max(limit * 2, 50))
            if not ids:
                break
            for raw in await self.redis.mget([image_key(i.decode()) for i in ids]):
                if raw is None:
                    continue
                image = ImageRecord.from_json(raw)
                if image.expired_at(moment):
                    continue
                if (status is None or image.status == status) and (
                    batch_id is None or image.batch_id == batch_id
                ):
                    found.append(image)
            maximum = f"({ids[-1].decode()}"
        return found[:limit]
