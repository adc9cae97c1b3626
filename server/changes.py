"""What the web process hears of changes: ONE pub/sub connection per process, subscribed to every
account's change notifications (webhooks/changes.py), wakes whoever waits in this process for one — a
long poll of an image or batch (server/long_poll.py), a dashboard page's live table (server/dashboard.py)
— so no waiting request holds a connection, or reads Redis until something it shows has changed.

One pattern subscription for all accounts rather than a channel per waited-on account: a process hears
a few notifications per image processed anywhere (tens of bytes each), and in exchange a waiter never
waits for a subscription to be confirmed before it may trust what it reads.

A waiter registers (`watching`) before it reads the state it waits on, so a change that commits after
that read is heard. Pub/sub delivers at most once: when the connection drops, every waiter is woken once
it is subscribed again (it reads again and finds whatever changed meanwhile), and until then reconnecting
backs off from RECONNECT_MIN_SECONDS to RECONNECT_MAX_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

from webhooks.changes import CHANGES_CHANNEL_PREFIX, parse_change

log = logging.getLogger(__name__)

RECONNECT_MIN_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0
# After this long without a word from Redis the connection is PINGed, and after twice as long it is taken
# for dead (a network gone silent closes no socket).
QUIET_PING_SECONDS = 15.0
CONNECT_TIMEOUT_SECONDS = 5.0
# What CLIENT LIST calls the connection.
CLIENT_NAME = "darkroom-web-changes"

# Which notifications a waiter cares for: (kind, id) → bool.
Wanted = Callable[[str, str], bool]


class Watch:
    """One waiter's view of an account's changes: set when a change it wants is heard (or anything may
    have changed, after a reconnect), until it looks."""

    def __init__(self, account_id: str, wanted: Wanted) -> None:
        self.account_id = account_id
        self._wanted = wanted
        self._heard = asyncio.Event()

    def hear(self, kind: str, resource_id: str) -> None:
        if self._wanted(kind, resource_id):
            self._heard.set()

    def hear_everything(self) -> None:
        self._heard.set()

    async def changed(self, within: float) -> bool:
        """Whether a wanted change was heard since the last look, waiting up to `within` seconds."""
        if within > 0 and not self._heard.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self._heard.wait()
        heard = self._heard.is_set()
        self._heard.clear()
        return heard


class ChangeFeed:
    """The process's subscription. `run` (a task of the lifespan) keeps it connected."""

    def __init__(self, redis_url: str) -> None:
        # Set when the web server starts stopping (server/http_limits.py): every waiter is woken and
        # answers with what it has, rather than holding the process's exit up to its whole wait.
        self.stopping = asyncio.Event()
        # Its own client, no socket timeout: a quiet subscription is not a hung command.
        self._redis = Redis.from_url(
            redis_url,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_keepalive=True,
            client_name=CLIENT_NAME,
        )
        self._watches: dict[str, set[Watch]] = {}
        self.subscribed = asyncio.Event()

    def stop_waiting(self) -> None:
        """The server stops: wake every waiter, now and from now on, for good."""
        self.stopping.set()
        for watches in self._watches.values():
            for watch in watches:
                watch.hear_everything()

    @contextlib.contextmanager
    def watching(self, account_id: str, wanted: Wanted) -> Iterator[Watch]:
        """A Watch on the account's changes that `wanted` admits, for the `with` block."""
        watch = Watch(account_id, wanted)
        if self.stopping.is_set():
            watch.hear_everything()
        self._watches.setdefault(account_id, set()).add(watch)
        try:
            yield watch
        finally:
            watches = self._watches[account_id]
            watches.discard(watch)
            if not watches:
                del self._watches[account_id]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ChangeFeed]:
        """Listening for the `async with` block (the web process's lifespan); closed after it."""
        task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._redis.aclose(close_connection_pool=True)

    async def _run(self) -> None:
        pause = RECONNECT_MIN_SECONDS
        while True:
            try:
                await self._listen()
            except (RedisError, OSError) as error:
                if self.subscribed.is_set():
                    log.warning("change notifications lost (%s); subscribing again", error)
                    self.subscribed.clear()
                    pause = RECONNECT_MIN_SECONDS
                await asyncio.sleep(pause)
                pause = min(pause * 2, RECONNECT_MAX_SECONDS)

    async def _listen(self) -> None:
        """Hear notifications until the connection fails (it raises then)."""
        loop = asyncio.get_running_loop()
        async with self._redis.pubsub() as pubsub:
            await pubsub.psubscribe(CHANGES_CHANNEL_PREFIX + "*")
            heard_at = loop.time()
            while True:
                message = await pubsub.get_message(timeout=QUIET_PING_SECONDS)
                now = loop.time()
                if message is None:
                    if now - heard_at > 2 * QUIET_PING_SECONDS:
                        raise ConnectionError("Redis answered no PING on the change subscription")
                    await pubsub.ping()
                    continue
                heard_at = now
                if message["type"] == "pmessage":
                    self._dispatch(message["channel"], message["data"])
                elif message["type"] == "psubscribe":
                    # Subscribed (again): whatever changed while we were not is read anew.
                    self.subscribed.set()
                    for watches in self._watches.values():
                        for watch in watches:
                            watch.hear_everything()

    def _dispatch(self, channel: bytes, payload: bytes) -> None:
        watches = self._watches.get(channel[len(CHANGES_CHANNEL_PREFIX) :].decode())
        change = parse_change(payload)
        if not watches or change is None:
            return
        for watch in watches:
            watch.hear(*change)
