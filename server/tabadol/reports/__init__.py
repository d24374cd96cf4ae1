"""The quarterly e-service assessment: ledger and registry figures against national targets.

``build_quarterly`` is the only part that touches the store and the registry; the figures are
pure functions (``figures``, ``purposes``, ``protocols``) and the files are renderings of them (``render``).
"""

from __future__ import annotations

from collections.abc import Mapping

from tabadol.config import BrokerConfig
from tabadol.errors import ConfigError
from tabadol.ledger.store.base import LedgerQueries
from tabadol.reports.figures import (
    DEFINITIONS,
    E_SERVICE_TARGET,
    VISIT_REDUCTION_TARGET,
    WINDOW_NS,
    Activity,
    AgencyFigures,
    Indicator,
    National,
    OfferedService,
    QuarterlyReport,
    assess,
)
from tabadol.reports.protocols import ProtocolCalls, calls_by_protocol
from tabadol.reports.purposes import (
    NO_PURPOSE,
    GrantPurpose,
    PurposeCalls,
    calls_by_purpose,
    purposes_of,
    purposes_of_entries,
)
from tabadol.reports.quarter import Quarter
from tabadol.reports.render import (
    render_csv,
    render_html,
    render_json,
    render_protocols_csv,
    render_purposes_csv,
    report_json,
    write_quarterly,
)

__all__ = [
    "DEFINITIONS",
    "E_SERVICE_TARGET",
    "NO_PURPOSE",
    "VISIT_REDUCTION_TARGET",
    "WINDOW_NS",
    "Activity",
    "AgencyFigures",
    "GrantPurpose",
    "Indicator",
    "National",
    "OfferedService",
    "ProtocolCalls",
    "PurposeCalls",
    "Quarter",
    "QuarterlyReport",
    "build_quarterly",
    "calls_by_protocol",
    "calls_by_purpose",
    "grant_purposes",
    "purposes_of",
    "purposes_of_entries",
    "quarterly_html",
    "render_csv",
    "render_html",
    "render_json",
    "render_protocols_csv",
    "render_purposes_csv",
    "report_json",
    "write_quarterly",
]


_HISTORY_PAGE = 100  # registry versions read at a time


def grant_purposes(cfg: BrokerConfig) -> dict[str, GrantPurpose]:
    """Grant id -> purpose. With ``[registry] url``: of the grants of every registry version,
    so a grant revoked during a quarter still names the purpose its calls were admitted
    for; else of the configuration's own grants."""
    if cfg.registry.url is None:
        return purposes_of(cfg.grants)
    from tabadol.registry.entries import shape_problem
    from tabadol.registry.store import RegistryUnavailable, open_registry

    found: dict[str, GrantPurpose] = {}
    try:
        store = open_registry(cfg.registry.url)
        try:
            after = 0
            while versions := store.history(after, _HISTORY_PAGE):
                for version in versions:  # oldest first: a later purpose replaces an earlier
                    if shape_problem(version.entries) is None:  # never in force otherwise
                        purposes_of_entries(version.entries.get("grant", []), found)
                after = versions[-1].number
        finally:
            store.close()
    except RegistryUnavailable as e:
        raise ConfigError(f"{cfg.path}: [registry] url: {e}") from None
    return found


def build_quarterly(
    cfg: BrokerConfig,
    store: LedgerQueries,
    quarter: Quarter,
    purposes: Mapping[str, GrantPurpose] | None = None,
) -> QuarterlyReport:
    """Ask the store about the quarter and the one before it, and the registry (unless given
    ``purposes``) what each grant was for, and compute every figure."""
    start, end = quarter.start_ns, quarter.end_ns
    current = Activity(
        groups=store.call_groups(start, end),
        histograms=store.answered_histograms(start, end),
        windows=store.provider_windows(start, end, WINDOW_NS),
    )
    previous = quarter.previous()
    earlier = Activity(groups=store.call_groups(previous.start_ns, previous.end_ns))
    if purposes is None:
        purposes = grant_purposes(cfg)
    return assess(cfg, quarter, current, earlier, purposes)


def quarterly_html(cfg: BrokerConfig, store: LedgerQueries, quarter: Quarter) -> str:
    """The report page for a quarter as one self-contained HTML string (for the ops UI)."""
    return render_html(build_quarterly(cfg, store, quarter))
