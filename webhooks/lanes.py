"""Which of a worker's attempt slots each origin may use, judged by how its attempts went.

A fixed share of a fixed pool per origin cannot keep any number of dead receivers from holding every
slot, so slots are split into lanes by what this process has seen of each origin (scheme, host, port):

- fast: origins whose last attempt was answered within SLOW_AFTER_SECONDS. The lane's last
  FAST_LANE_RESERVE slots are kept for origins with fewer than ATTEMPTS_PER_CONNECTION attempts in
  flight, so a receiver with a few webhooks always finds room beside busy ones.
- new: origins not heard from yet, ATTEMPTS_PER_CONNECTION attempts each, NEW_LANE_SLOTS in all: sixty
  origins that turn out to hang are found out within a second while a partner's first webhook still
  finds a slot.
- slow: origins with an attempt unanswered for SLOW_AFTER_SECONDS, or whose last attempt took that long
  (timeouts included), one attempt per connection each, SLOW_LANE_SLOTS in all.

An attempt unanswered after SLOW_AFTER_SECONDS moves to the slow lane, whichever lane it started in, so
a receiver that starts hanging gives back its fast or new slots within that time; one answered sooner
brings its origin back to the fast lane. Attempts are sockets and small tasks, so the lanes' sum (300
by default) costs little; what they bound is how long a prompt receiver can wait.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

Lane = Literal["fast", "new", "slow"]

SLOW_AFTER_SECONDS = 1.0
NEW_LANE_SLOTS = 200
SLOW_LANE_SLOTS = 50
FAST_LANE_RESERVE = 10
# Attempts in flight per connection to a fast origin: one being answered and the next ones ready, so a
# connection never idles while the next claim is on its way (at one, a fast receiver got 27 % fewer
# deliveries a second). Slow origins get one per connection: an attempt queued behind a slow answer
# would only wait.
ATTEMPTS_PER_CONNECTION = 3
# Origins remembered (those with attempts in flight always are); a forgotten one starts again as new.
REMEMBERED_ORIGINS = 1000


@dataclass
class _Origin:
    in_flight: int = 0
    overdue: int = 0  # of those in flight, unanswered for SLOW_AFTER_SECONDS
    answered: bool = False
    last_was_slow: bool = False

    @property
    def lane(self) -> Lane:
        if self.overdue or self.last_was_slow:
            return "slow"
        return "fast" if self.answered else "new"


@dataclass
class Running:
    """One attempt in flight: its origin ("" when its URL names none) and the lane it counts against."""

    origin: str
    lane: Lane
    started: float = field(default_factory=time.monotonic)
    overdue: bool = False


class OriginLanes:
    def __init__(self, fast_slots: int, connections_per_origin: int) -> None:
        self.sizes: dict[Lane, int] = {"fast": fast_slots, "new": NEW_LANE_SLOTS, "slow": SLOW_LANE_SLOTS}
        self.per_origin: dict[Lane, int] = {
            "fast": connections_per_origin * ATTEMPTS_PER_CONNECTION,
            "new": ATTEMPTS_PER_CONNECTION,
            "slow": connections_per_origin,
        }
        self.used: Counter[Lane] = Counter()
        self._origins: dict[str, _Origin] = {}

    def lane_of(self, origin: str) -> Lane:
        # A URL without an origin is refused without sending anything: it holds no receiver's slot.
        if not origin:
            return "fast"
        known = self._origins.get(origin)
        return "new" if known is None else known.lane

    def room(self) -> dict[Lane, int]:
        return {lane: max(0, size - self.used[lane]) for lane, size in self.sizes.items()}

    def full(self) -> bool:
        return not any(self.room().values())

    def claim_arguments(self) -> list[str | int]:
        """For the claim script: each lane's room, the per-origin limits, and the (origin, lane,
        attempts in flight) of every origin remembered (others are new, with none in flight)."""
        room = self.room()
        described: list[str | int] = []
        for name, origin in self._origins.items():
            described += [name, origin.lane, origin.in_flight]
        return [
            room["fast"],
            room["new"],
            room["slow"],
            FAST_LANE_RESERVE,
            ATTEMPTS_PER_CONNECTION,
            self.per_origin["fast"],
            self.per_origin["new"],
            self.per_origin["slow"],
            *described,
        ]

    def started(self, origin: str) -> Running:
        running = Running(origin, self.lane_of(origin))
        self.used[running.lane] += 1
        if origin:
            known = self._origins.pop(origin, None) or _Origin()
            known.in_flight += 1
            self._origins[origin] = known  # most recently used last: forgotten last
        return running

    def overdue(self, running: Running) -> None:
        """`running` is still unanswered after SLOW_AFTER_SECONDS: it and its origin are slow."""
        if running.overdue:
            return
        running.overdue = True
        self.used[running.lane] -= 1
        running.lane = "slow"
        self.used["slow"] += 1
        known = self._origins.get(running.origin)
        if known is not None:
            known.overdue += 1

    def finished(self, running: Running) -> None:
        self.used[running.lane] -= 1
        known = self._origins.get(running.origin)
        if known is None:
            return
        known.in_flight -= 1
        if running.overdue:
            known.overdue -= 1
        known.answered = True
        known.last_was_slow = running.overdue or time.monotonic() - running.started >= SLOW_AFTER_SECONDS
        self._forget_beyond(REMEMBERED_ORIGINS)

    def _forget_beyond(self, limit: int) -> None:
        if len(self._origins) <= limit:
            return
        idle = [name for name, origin in self._origins.items() if origin.in_flight == 0]
        for name in idle[: len(self._origins) - limit]:
            del self._origins[name]
