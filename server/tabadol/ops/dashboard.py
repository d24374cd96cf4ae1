"""The ops dashboard's figures, read from the ledger: today, this quarter, all time."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tabadol.config import BrokerConfig
from tabadol.ledger.store import LedgerStore
from tabadol.reports.quarter import TEHRAN, Quarter

PERCENTS = (50, 95, 99)
TOP = 5


@dataclass(frozen=True)
class Accounts:
    """What the ops server reads to show the ledger: the configuration and the store."""

    config: BrokerConfig
    store: LedgerStore


def _ns(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)


def dashboard(accounts: Accounts, now: dt.datetime) -> dict[str, Any]:
    """Agencies, transactions today / this quarter / all time, top agencies, errors, latency."""
    cfg, store = accounts.config, accounts.store
    local = now.astimezone(TEHRAN)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    today = (_ns(midnight), _ns(midnight + dt.timedelta(days=1)))
    quarter = Quarter.containing(now)
    groups = store.call_groups(*today)
    consumers: Counter[str] = Counter()
    providers: Counter[str] = Counter()
    errors = 0
    for group in groups:
        consumers[group.consumer or "(refused identity)"] += group.calls
        providers[group.provider] += group.calls
        if group.status_code != 0:
            errors += group.calls
    calls_today = sum(consumers.values())
    active = {a for a in (*consumers, *providers) if a in cfg.agencies}
    latency = store.latency_percentiles(*today, PERCENTS)
    return {
        "generated": now.astimezone(dt.UTC).isoformat(),
        "quarter": str(quarter),
        "quarterPeriod": quarter.period,
        "agencies": {"registered": len(cfg.agencies), "activeToday": len(active)},
        "transactions": {
            "today": calls_today,
            "quarter": store.count_between(quarter.start_ns, quarter.end_ns),
            "allTime": store.count_between(0, 2**63 - 1),
        },
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
