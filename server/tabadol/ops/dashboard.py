"""The ops dashboard's figures, read from the ledger: today, this quarter, all time."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Container
from typing import Any

from tabadol.config import BrokerConfig
from tabadol.ledger.store import (
    CallGroup,
    LedgerMissing,
    LedgerQueries,
    MemoryLedgerStore,
    open_ledger,
)
from tabadol.reports.figures import declared_caller, undeclared_caller
from tabadol.reports.quarter import TEHRAN, Quarter

PERCENTS = (50, 95, 99)
TOP = 5
ALL_TIME = (0, 2**63 - 1)


class Accounts:
    """What the ops server reads to show the ledger: the configuration and its ledger,
    opened read-only. A ledger the broker has not written yet reads as empty until it
    appears, so the console can start before the broker."""

    def __init__(self, config: BrokerConfig, store: LedgerQueries | None = None) -> None:
        self.config = config
        self._store = store
        self._lock = threading.Lock()

    @property
    def store(self) -> LedgerQueries:
        with self._lock:
            if self._store is None:
                try:
                    self._store = open_ledger(self.config.ledger, readonly=True)
                except LedgerMissing:
                    return MemoryLedgerStore()  # nothing written yet: an empty ledger
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()


def _ns(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)


def _involving(groups: list[CallGroup], agency: str | None) -> list[CallGroup]:
    if agency is None:
        return groups
    return [g for g in groups if agency in (g.consumer, g.provider)]


def _apart(groups: list[CallGroup], agencies: Container[str]) -> dict[str, int]:
    """Calls no figure counts: refused before identification, and from identified agencies
    the configuration does not declare."""
    return {
        "unidentified": sum(g.calls for g in groups if not g.verified),
        "undeclared": sum(g.calls for g in groups if undeclared_caller(g, agencies)),
    }


def dashboard(accounts: Accounts, now: dt.datetime, agency: str | None = None) -> dict[str, Any]:
    """Agencies, transactions today / this quarter / all time, top agencies, errors, latency.
    With ``agency``, only the ledger rows in which it is consumer or provider count, and the
    latency is that of its own services."""
    cfg, store = accounts.config, accounts.store
    local = now.astimezone(TEHRAN)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    today = (_ns(midnight), _ns(midnight + dt.timedelta(days=1)))
    quarter = Quarter.containing(now)
    groups = _involving(store.call_groups(*today), agency)
    consumers: Counter[str] = Counter()
    providers: Counter[str] = Counter()
    errors = 0
    # Calls refused before identification name a consumer only as claimed, and calls from an
    # agency the registry does not declare are refused whole: they are no agency's traffic
    # and no measure of the exchange's success, so they are counted apart.
    for group in (g for g in groups if declared_caller(g, cfg.agencies)):
        consumers[group.consumer] += group.calls
        providers[group.provider] += group.calls
        if group.status_code != 0:
            errors += group.calls
    calls_today = sum(consumers.values())
    active = {a for a in (*consumers, *providers) if a in cfg.agencies}
    latency = store.latency_percentiles(*today, PERCENTS, consumers=sorted(cfg.agencies))
    if agency is not None:
        own = {s.name for s in cfg.services.values() if s.provider == agency}
        latency = {service: row for service, row in latency.items() if service in own}
    quarter_groups = _involving(store.call_groups(quarter.start_ns, quarter.end_ns), agency)
    all_groups = _involving(store.call_groups(*ALL_TIME), agency)
    in_quarter, all_time = (
        sum(g.calls for g in period if declared_caller(g, cfg.agencies))
        for period in (quarter_groups, all_groups)
    )
    apart = {
        period: _apart(period_groups, cfg.agencies)
        for period, period_groups in (
            ("today", groups), ("quarter", quarter_groups), ("allTime", all_groups)
        )
    }  # fmt: skip
    return {
        "generated": now.astimezone(dt.UTC).isoformat(),
        "quarter": str(quarter),
        "quarterPeriod": quarter.period,
        "agency": agency,
        "agencies": {"registered": len(cfg.agencies), "activeToday": len(active)},
        "transactions": {"today": calls_today, "quarter": in_quarter, "allTime": all_time},
        "refusedBeforeIdentification": {p: n["unidentified"] for p, n in apart.items()},
        "fromUndeclaredAgencies": {p: n["undeclared"] for p, n in apart.items()},
        "errorRateToday": errors / calls_today if calls_today else None,
        "topConsumers": [{"agency": a, "calls": n} for a, n in consumers.most_common(TOP)],
        "topProviders": [{"agency": a, "calls": n} for a, n in providers.most_common(TOP)],
        "latencyByService": [
            {
                "service": service,
                "calls": calls,
                **{f"p{p}Ms": table[p] / 1e6 for p in PERCENTS if p in table},
            }
            for service, (calls, table) in sorted(latency.items())
        ],
    }
