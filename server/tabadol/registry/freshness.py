"""How old the registry version in force may grow while its database is unreachable.

Pure: times are POSIX seconds passed in, so the policy is tested without clocks.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal


@dataclass
class RegistryFreshness:
    """When the version in force was last confirmed current, and what staleness means."""

    max_age_s: float
    policy: Literal["refuse", "serve"]
    confirmed_at: float
    # Why the database answers yet the version in force is not its current one (a version
    # this node refused, say): None when it is, or when the database does not answer.
    behind: str | None = None

    def confirm(self, now: float) -> None:
        self.confirmed_at = max(self.confirmed_at, now)

    def age(self, now: float) -> float:
        return max(0.0, now - self.confirmed_at)

    def stale(self, now: float) -> bool:
        return self.age(now) > self.max_age_s

    def refusal(self, now: float) -> str | None:
        """Why a new call is refused now, or None (fresh enough, or the policy serves)."""
        if self.policy != "refuse" or not self.stale(now):
            return None
        since = dt.datetime.fromtimestamp(self.confirmed_at, dt.UTC)
        if self.behind is not None:
            return (
                f"the exchange's registry is stale: {self.behind}, so the version in force "
                f"was last confirmed current at {since:%Y-%m-%d %H:%M:%S} UTC "
                f"({self.age(now):.0f} s ago, more than [registry] max_age_seconds = "
                f"{self.max_age_s:g}) and grants may have changed; calls are refused until "
                "this node applies the database's current version"
            )
        return (
            "the exchange's registry is stale: the registry database has not been reachable "
            f"since {since:%Y-%m-%d %H:%M:%S} UTC ({self.age(now):.0f} s, more than [registry] "
            f"max_age_seconds = {self.max_age_s:g}), so grants may have changed; calls are "
            "refused until it is reachable again"
        )
