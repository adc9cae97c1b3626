"""What the web process hears of changes: ONE pub/sub connection per process, subscribed to the change
notifications (webhooks/changes.py) of the accounts someone waits on in this process — a long poll of an
image or batch (server/long_poll.py), a dashboard page's live table (server/dashboard.py) — so no waiting
request holds a connection, or reads Redis until something it shows has changed, and a process hears
nothing of the accounts nobody waits on in it (a cluster's changes would otherwise reach every process).

A waiter registers (`watching`) before it reads the state it waits on, and its account's channel is
subscribed (the first waiter's SUBSCRIBE confirmed) before it reads: a change that commits after that read
is heard. A channel nobody has waited on for UNSUBSCRIBE_AFTER_SECONDS is unsubscribed, so that a client
asking again and again costs no SUBSCRIBE each time. Pub/sub delivers at most once: when the connection
drops, every waiter is woken once its channel is subscribed again (it reads again and finds whatever
changed meanwhile), and until then reconnecting backs off from RECONNECT_MIN_SECONDS to
RECONNECT_MAX_SECONDS; a waiter whose subscription is not confirmed within SUBSCRIBE_TIMEOUT_SECONDS reads
again every UNCONFIRMED_READ_SECONDS instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from webhooks.changes import CHANGES_CHANNEL_PREFIX, changes_channel, parse_change

log = logging.getLogger(__name__)

RECONNECT_MIN_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0
# After this long without a word from Redis the connection is PINGed, and after twice as long it is taken
# for dead (a network gone silent closes no socket).
QUIET_PING_SECONDS = 15.0
CONNECT_TIMEOUT_SECONDS = 5.0
SUBSCRIBE_TIMEOUT_SECONDS = 1.0
UNCONFIRMED_READ_SECONDS = 1.0
UNSUBSCRIBE_AFTER_SECONDS = 60.0
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
        # Until its channel is confirmed subscribed, it may miss a change: it looks again regularly.
        self.unconfirmed = False

    def hear(self, kind: str, resource_id: str) -> None:
        if self._wanted(kind, resource_id):
            self._heard.set()

    def hear_everything(self) -> None:
        self._heard.set()

    async def changed(self, within: float) -> bool:
        """Whether a wanted change was heard since the last look, waiting up to `within` seconds (True
        after at most UNCONFIRMED_READ_SECONDS while its subscription is not confirmed)."""
        if self.unconfirmed:
            within = min(within, UNCONFIRMED_READ_SECONDS)
        if within > 0 and not self._heard.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self._heard.wait()
        heard = self._heard.is_set() or self.unconfirmed
        self._heard.clear()
        return heard


class _Channel:
    """An account's channel on the current connection: confirmed once Redis answers its SUBSCRIBE."""

    def __init__(self) -> None:
        self.confirmed = asyncio.Event()
        # Confirmed before, on an earlier connection: its waiters may have missed changes since.
        self.was_confirmed = False
        self.idle_since: float | None = None


class ChangeFeed:
    """The process's subscription. `running` (in the lifespan) keeps it connected."""

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
        # The accounts subscribed (or being subscribed) on the current connection.
        self._channels: dict[str, _Channel] = {}
        self._pubsub: PubSub | None = None
        self._listening = False
        # A channel of this process's own, which nobody publishes to: the connection stays subscribed
        # (and PINGable) while no account is.
        self._own_channel = f"{CHANGES_CHANNEL_PREFIX}web:{secrets.token_hex(8)}"

    def stop_waiting(self) -> None:
        """The server stops: wake every waiter, now and from now on, for good."""
        self.stopping.set()
        for watches in self._watches.values():
            for watch in watches:
                watch.hear_everything()

    @contextlib.asynccontextmanager
    async def watching(self, account_id: str, wanted: Wanted) -> AsyncIterator[Watch]:
        """A Watch on the account's changes that `wanted` admits, for the `async with` block, its
        account's channel subscribed before the block starts (or the Watch `unconfirmed`)."""
        watch = Watch(account_id, wanted)
        if self.stopping.is_set():
            watch.hear_everything()
        self._watches.setdefault(account_id, set()).add(watch)
        try:
            channel = await self._subscribed(account_id)
            if not channel.confirmed.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECONDS):
                        await channel.confirmed.wait()
                watch.unconfirmed = not channel.confirmed.is_set()
            yield watch
        finally:
            watches = self._watches[account_id]
            watches.discard(watch)
            if not watches:
                del self._watches[account_id]
                if (idle := self._channels.get(account_id)) is not None:
                    idle.idle_since = asyncio.get_running_loop().time()

    async def _subscribed(self, account_id: str) -> _Channel:
        """The account's channel, its SUBSCRIBE sent if it had none (when connected: else the listener
        sends it once connected)."""
        channel = self._channels.get(account_id)
        if channel is None:
            channel = self._channels[account_id] = _Channel()
            if self._pubsub is not None:
                with contextlib.suppress(RedisError, OSError):  # the listener reconnects, and subscribes it
                    await self._pubsub.subscribe(changes_channel(account_id))
        channel.idle_since = None
        return channel

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
                if self._listening:
                    log.warning("change notifications lost (%s); subscribing again", error)
                    self._listening = False
                    pause = RECONNECT_MIN_SECONDS
                # Subscribed again on the next connection, each woken once it is.
                for channel in self._channels.values():
                    channel.confirmed.clear()
                await asyncio.sleep(pause)
                pause = min(pause * 2, RECONNECT_MAX_SECONDS)

    async def _listen(self) -> None:
        """Hear notifications until the connection fails (it raises then)."""
        loop = asyncio.get_running_loop()
        async with self._redis.pubsub() as pubsub:
            try:
                await self._hear(pubsub, loop)
            finally:
                # Before it is closed: a waiter's SUBSCRIBE must not open it again, unread.
                self._pubsub = None

    async def _hear(self, pubsub: PubSub, loop: asyncio.AbstractEventLoop) -> None:
        # Those asked for before this connection, and those that come while it subscribes, on it.
        await pubsub.subscribe(self._own_channel)
        self._pubsub = pubsub
        self._listening = True
        for account_id in list(self._channels):
            await pubsub.subscribe(changes_channel(account_id))
        heard_at = swept_at = loop.time()
        while True:
            message = await pubsub.get_message(timeout=QUIET_PING_SECONDS)
            now = loop.time()
            # Not on every notification: a sweep goes through every channel.
            if now - swept_at >= min(QUIET_PING_SECONDS, UNSUBSCRIBE_AFTER_SECONDS):
                await self._unsubscribe_idle(pubsub, now)
                swept_at = now
            if message is None:
                if now - heard_at > 2 * QUIET_PING_SECONDS:
                    raise ConnectionError("Redis answered no PING on the change subscription")
                await pubsub.ping()
                continue
            heard_at = now
            if message["type"] == "message":
                self._dispatch(message["channel"], message["data"])
            elif message["type"] == "subscribe":
                self._confirmed(message["channel"])

    async def _unsubscribe_idle(self, pubsub: PubSub, now: float) -> None:
        """Unsubscribe the channels nobody has waited on for a while (only confirmed ones: a confirmation
        still to come would otherwise be taken for a later SUBSCRIBE's)."""
        idle = [
            account_id
            for account_id, channel in self._channels.items()
            if channel.idle_since is not None
            and now - channel.idle_since > UNSUBSCRIBE_AFTER_SECONDS
            and channel.confirmed.is_set()
        ]
        for account_id in idle:
            del self._channels[account_id]
        if idle:
            await pubsub.unsubscribe(*(changes_channel(account_id) for account_id in idle))

    def _account_of(self, channel: bytes) -> str:
        return channel[len(CHANGES_CHANNEL_PREFIX) :].decode()

    def _confirmed(self, channel_name: bytes) -> None:
        """Subscribed; again, after a reconnection: its waiters read anew whatever changed meanwhile."""
        account_id = self._account_of(channel_name)
        channel = self._channels.get(account_id)
        if channel is None or channel.confirmed.is_set():
            return
        channel.confirmed.set()
        for watch in self._watches.get(account_id, ()):
            if channel.was_confirmed or watch.unconfirmed:
                watch.hear_everything()
            watch.unconfirmed = False
        channel.was_confirmed = True

    def _dispatch(self, channel: bytes, payload: bytes) -> None:
        watches = self._watches.get(self._account_of(channel))
        change = parse_change(payload)
        if not watches or change is None:
            return
        for watch in watches:
            watch.hear(*change)
