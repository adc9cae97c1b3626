"""Plans: what an account may do per minute and at once, and its share of the workers.

A plan is either one of the named tiers or custom numbers (`darkroom accounts create --plan pro
--max-processing 64`); the numbers are copied onto the account, so changing a tier's defaults here never
changes an existing partner's limits behind their back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Plan:
    name: str
    requests_per_minute: int
    uploads_per_minute: int
    # Images of the account rendering at the same moment; the rest of its images wait in the queue.
    max_processing: int
    # The account's weight when workers share themselves between accounts with queued images.
    share: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(**data)


TIERS: dict[str, Plan] = {
    plan.name: plan
    for plan in (
        Plan("free", requests_per_minute=120, uploads_per_minute=30, max_processing=2, share=1),
        Plan("starter", requests_per_minute=1_200, uploads_per_minute=300, max_processing=8, share=2),
        Plan("pro", requests_per_minute=6_000, uploads_per_minute=1_500, max_processing=32, share=4),
        Plan("scale", requests_per_minute=30_000, uploads_per_minute=10_000, max_processing=128, share=8),
    )
}
DEFAULT_TIER = "pro"
# The name of a plan whose numbers are no tier's.
CUSTOM = "custom"
PLAN_NUMBERS = ("requests_per_minute", "uploads_per_minute", "max_processing", "share")


def plan_with(base: Plan, numbers: dict[str, int | None]) -> Plan:
    """`base` with the numbers given (None: keep `base`'s), named after the tier it then equals, else
    `custom`."""
    given: dict[str, Any] = {name: value for name, value in numbers.items() if value is not None}
    changed = replace(base, **given)
    for tier in TIERS.values():
        if replace(changed, name=tier.name) == tier:
            return tier
    return replace(changed, name=CUSTOM)
