"""The quarterly e-service assessment: ledger and registry figures against national targets.

``build_quarterly`` is the only part that touches the store; the figures are pure functions
(``figures``) and the files are renderings of them (``render``).
"""

from __future__ import annotations

from tabadol.config import BrokerConfig
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
from tabadol.reports.quarter import Quarter
from tabadol.reports.render import (
    render_csv,
    render_html,
    render_json,
    report_json,
    write_quarterly,
)

__all__ = [
    "DEFINITIONS",
    "E_SERVICE_TARGET",
    "VISIT_REDUCTION_TARGET",
    "WINDOW_NS",
    "Activity",
    "AgencyFigures",
    "Indicator",
    "National",
    "OfferedService",
    "Quarter",
    "QuarterlyReport",
    "build_quarterly",
    "quarterly_html",
    "render_csv",
    "render_html",
    "render_json",
    "report_json",
    "write_quarterly",
]


def build_quarterly(cfg: BrokerConfig, store: LedgerQueries, quarter: Quarter) -> QuarterlyReport:
    """Ask the store about the quarter and the one before it, and compute every figure."""
    start, end = quarter.start_ns, quarter.end_ns
    current = Activity(
        groups=store.call_groups(start, end),
        histograms=store.answered_histograms(start, end),
        windows=store.provider_windows(start, end, WINDOW_NS),
    )
    previous = quarter.previous()
    earlier = Activity(groups=store.call_groups(previous.start_ns, previous.end_ns))
    return assess(cfg, quarter, current, earlier)


def quarterly_html(cfg: BrokerConfig, store: LedgerQueries, quarter: Quarter) -> str:
    """The report page for a quarter as one self-contained HTML string (for the ops UI)."""
    return render_html(build_quarterly(cfg, store, quarter))
