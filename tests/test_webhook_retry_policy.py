"""When the next attempt is due: the schedule with jitter, Retry-After within bounds, slow-downs, the end."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from webhooks.delivery import AttemptOutcome
from webhooks.dispatcher import RetryPolicy

SCHEDULE = (10.0, 100.0, 1000.0)
EXACT = RetryPolicy(SCHEDULE, jitter=0.0, slow_down_seconds=60.0)


def answered(status_code: int, retry_after: str | None = None) -> AttemptOutcome:
    return AttemptOutcome(status_code, 12.0, "", f"HTTP {status_code}", retry_after)


TIMED_OUT = AttemptOutcome(None, 15000.0, "", "timed out after 15 s waiting for the response", timed_out=True)
REFUSED = AttemptOutcome(None, 1.0, "", "connection refused by 127.0.0.1:9")


def http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


@pytest.mark.parametrize("attempts_made", [1, 2, 3])
def test_each_wait_is_the_scheduled_one_within_the_jitter(attempts_made: int) -> None:
    policy = RetryPolicy(SCHEDULE, jitter=0.2)
    scheduled = SCHEDULE[attempts_made - 1]
    rng = random.Random(7)

    waits = [policy.delay(attempts_made, answered(500), rng) for _ in range(500)]

    assert all(wait is not None and 0.8 * scheduled <= wait <= 1.2 * scheduled for wait in waits)
    spread = [wait for wait in waits if wait is not None]
    # Spread over the whole band, not bunched: that is what stops a stampede after an outage.
    assert min(spread) < 0.85 * scheduled and max(spread) > 1.15 * scheduled


def test_without_jitter_the_schedule_is_exact() -> None:
    rng = random.Random(1)
    assert [EXACT.delay(n, REFUSED, rng) for n in (1, 2, 3)] == list(SCHEDULE)


@pytest.mark.parametrize(
    ("status_code", "retry_after", "expected"),
    [
        pytest.param(503, "15", 15.0, id="503-later-than-planned"),
        pytest.param(503, "2", 10.0, id="503-sooner-than-planned"),
        pytest.param(503, "0", 10.0, id="503-zero"),
        pytest.param(503, "3600", 1000.0, id="503-past-the-longest-delay"),
        pytest.param(503, " 12 ", 12.0, id="503-spaces"),
        pytest.param(503, "soon", 10.0, id="503-unreadable"),
        pytest.param(503, "-5", 10.0, id="503-negative"),
        pytest.param(500, "15", 10.0, id="500-ignores-it"),
        pytest.param(429, "120", 120.0, id="429-past-the-slow-down"),
        pytest.param(429, "5", 10.0, id="429-instead-of-the-slow-down"),
        pytest.param(429, "3600", 1000.0, id="429-past-the-longest-delay"),
        pytest.param(429, "soon", 60.0, id="429-unreadable-slows-down"),
    ],
)
def test_retry_after_is_waited_never_sooner_than_planned_nor_past_the_longest_delay(
    status_code: int, retry_after: str, expected: float
) -> None:
    assert EXACT.delay(1, answered(status_code, retry_after), random.Random(1)) == expected


def test_retry_after_as_an_http_date() -> None:
    rng = random.Random(1)
    policy = RetryPolicy((100.0, 1000.0), jitter=0.0, slow_down_seconds=1.0)

    within = policy.delay(1, answered(503, http_date(150)), rng)
    assert within is not None and 148 <= within <= 150
    assert policy.delay(1, answered(503, http_date(10_000)), rng) == 1000.0
    assert policy.delay(1, answered(503, http_date(-3600)), rng) == 100.0  # a date in the past
    assert policy.delay(1, answered(429, http_date(150)), rng) == pytest.approx(150, abs=2)


@pytest.mark.parametrize(
    ("outcome", "least"),
    [
        pytest.param(answered(429, "120"), 120.0, id="429-retry-after"),
        pytest.param(answered(503, "120"), 120.0, id="503-retry-after"),
        pytest.param(answered(429), 60.0, id="429-slow-down"),
        pytest.param(TIMED_OUT, 60.0, id="timeout-slow-down"),
    ],
)
def test_a_wait_the_receiver_asked_for_is_never_cut_and_spread_like_other_retries(
    outcome: AttemptOutcome, least: float
) -> None:
    """Every delivery a receiver turned away at once must not come back in the same second: each waits
    what was asked, or up to 20 % more."""
    policy = RetryPolicy(SCHEDULE, jitter=0.2, slow_down_seconds=60.0)
    rng = random.Random(7)

    waits = [policy.delay(1, outcome, rng) for _ in range(500)]

    spread = [wait for wait in waits if wait is not None]
    assert len(spread) == 500 and all(least <= wait <= 1.2 * least for wait in spread)
    assert min(spread) < 1.05 * least and max(spread) > 1.15 * least


@pytest.mark.parametrize("outcome", [answered(429), TIMED_OUT], ids=["429", "timeout"])
def test_a_429_or_a_timeout_waits_at_least_the_slow_down(outcome: AttemptOutcome) -> None:
    rng = random.Random(1)
    assert EXACT.delay(1, outcome, rng) == 60.0  # scheduled 10
    assert EXACT.delay(2, outcome, rng) == 100.0  # scheduled past the slow-down: the schedule wins


def test_other_failures_do_not_slow_down() -> None:
    rng = random.Random(1)
    for outcome in (answered(500), answered(503), answered(302), REFUSED):
        assert EXACT.delay(1, outcome, rng) == 10.0


@pytest.mark.parametrize("attempts_made", [4, 5, 100])
def test_past_the_schedule_the_delivery_fails_for_good(attempts_made: int) -> None:
    assert EXACT.delay(attempts_made, answered(500), random.Random(1)) is None
    assert EXACT.delay(attempts_made, answered(503, "1"), random.Random(1)) is None


def test_an_empty_schedule_never_retries() -> None:
    assert RetryPolicy(()).delay(1, answered(500), random.Random(1)) is None


@pytest.mark.parametrize("attempts_made", [1, 2])
def test_410_gone_is_never_retried(attempts_made: int) -> None:
    assert EXACT.delay(attempts_made, answered(410), random.Random(1)) is None
    assert EXACT.delay(attempts_made, answered(410, "5"), random.Random(1)) is None


@pytest.mark.parametrize("retry_after", ["99999999999999999999", "36000", "30001"])
def test_a_wait_the_receiver_asked_for_never_passes_the_longest_delay_even_spread(retry_after: str) -> None:
    policy = RetryPolicy((5.0, 300.0, 36000.0), jitter=0.2, slow_down_seconds=60.0)
    rng = random.Random(3)
    waits = [policy.delay(1, answered(429, retry_after), rng) for _ in range(200)]
    assert all(wait is not None and wait <= 36000.0 for wait in waits), max(w or 0 for w in waits)
