"""The quarterly report as files: one self-contained HTML page, a CSV of agencies, CSVs of
calls by purpose and by protocol, and JSON.

The HTML needs nothing else: inline CSS, charts as inline SVG, no script, no external resource.
Every text that comes from the configuration passes through ``html.escape``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from decimal import Decimal
from html import escape
from pathlib import Path
from typing import Any

from tabadol.reports.charts import Axis, Row, Series, Target, bar_chart, nice_axis
from tabadol.reports.figures import (
    DEFINITIONS,
    E_SERVICE_TARGET,
    VISIT_REDUCTION_TARGET,
    WINDOW_NS,
    AgencyFigures,
    Indicator,
    QuarterlyReport,
    percent,
    ratio,
)
from tabadol.reports.protocols import ProtocolCalls
from tabadol.reports.purposes import PurposeCalls
from tabadol.reports.quarter import TEHRAN, both_dates

CSV_COLUMNS = (
    "rank",
    "agency_id",
    "agency_name",
    "services_offered",
    "services",
    "methods_offered",
    "transactions_served",
    "successful_served",
    "transactions_consumed",
    "success_rate",
    "windows_with_calls",
    "windows_answered",
    "availability",
    "answered_calls",
    "latency_p50_ns",
    "latency_p95_ns",
    "distinct_consumers",
    "government_services",
    "e_service_share",
    "visits_per_exchange",
    "visits_avoided",
    "in_person_visits_per_quarter",
    "visit_reduction",
    "behind_target",
    "reasons",
)
PURPOSE_CSV_COLUMNS = (
    "agency_id",
    "agency_name",
    "service",
    "purpose",
    "purpose_reference",
    "recorded",
    "grants",
    "calls_admitted",
    "successful",
)
PROTOCOL_CSV_COLUMNS = ("protocol", "calls", "errors", "share")


def file_stem(report: QuarterlyReport) -> str:
    return f"quarterly-{report.quarter}"


def _number(value: Decimal | None) -> float | int | None:
    """A Decimal as a JSON number: an int when whole, else the nearest float."""
    if value is None:
        return None
    return int(value) if value == value.to_integral_value() else float(value)


# --- JSON ------------------------------------------------------------------------------------


def report_json(report: QuarterlyReport) -> dict[str, Any]:
    """Everything in the report as JSON-ready data, raw numbers (ratios, nanoseconds)."""
    q, n = report.quarter, report.national
    return {
        "quarter": {
            "id": str(q),
            "year": q.year,
            "quarter": q.quarter,
            "months": q.months,
            "first_day": q.first_day_solar,
            "last_day": q.last_day_solar,
            "first_day_gregorian": q.first_day.isoformat(),
            "last_day_gregorian": q.last_day.isoformat(),
            "timezone": str(TEHRAN),
            "start": q.start.isoformat(),
            "end": q.end.isoformat(),
            "start_ns": q.start_ns,
            "end_ns": q.end_ns,
            "previous": str(q.previous()),
        },
        "targets": {
            "e_service_share": _number(E_SERVICE_TARGET),
            "visit_reduction": _number(VISIT_REDUCTION_TARGET),
        },
        "availability_window_ns": WINDOW_NS,
        "national": {
            "agencies_connected": n.agencies_connected,
            "agencies_active": n.agencies_active,
            "services_offered": n.services_offered,
            "methods_offered": n.methods_offered,
            "transactions": n.transactions,
            "successful": n.successful,
            "success_rate": _number(n.success_rate),
            "transactions_previous": n.transactions_previous,
            "growth": _number(n.growth),
            "refused_before_identification": n.refused_before_identification,
            "from_undeclared_agencies": n.from_undeclared_agencies,
        },
        "agencies": [_agency_json(a) for a in report.agencies],
        "indicators": [_indicator_json(i) for i in report.indicators],
        "calls_by_protocol": [_protocol_json(p) for p in report.protocols],
        "definitions": DEFINITIONS,
    }


def _agency_json(a: AgencyFigures) -> dict[str, Any]:
    return {
        "id": a.id,
        "name": a.name,
        "services": [{"name": s.name, "methods": list(s.methods)} for s in a.services],
        "services_offered": a.services_offered,
        "methods_offered": a.methods_offered,
        "transactions_served": a.transactions_served,
        "successful_served": a.successful_served,
        "transactions_consumed": a.transactions_consumed,
        "success_rate": _number(a.success_rate),
        "windows_with_calls": a.windows_with_calls,
        "windows_answered": a.windows_answered,
        "availability": _number(a.availability),
        "answered_calls": a.answered_calls,
        "latency_p50_ns": a.latency_p50_ns,
        "latency_p95_ns": a.latency_p95_ns,
        "distinct_consumers": a.distinct_consumers,
        "government_services": a.government_services,
        "e_service_share": _number(a.e_service_share),
        "visits_per_exchange": _number(a.visits_per_exchange),
        "visits_avoided": _number(a.visits_avoided),
        "in_person_visits_per_quarter": a.in_person_visits_per_quarter,
        "visit_reduction": _number(a.visit_reduction),
        "calls_by_purpose": [_purpose_json(p) for p in a.purposes],
    }


def _purpose_json(p: PurposeCalls) -> dict[str, Any]:
    return {
        "service": p.service,
        "purpose": p.purpose,
        "purpose_reference": p.reference,
        "recorded": p.recorded,
        "grants": list(p.grants),
        "calls_admitted": p.calls,
        "successful": p.successful,
    }


def _protocol_json(p: ProtocolCalls) -> dict[str, Any]:
    return {"protocol": p.protocol, "calls": p.calls, "errors": p.errors, "share": _number(p.share)}


def _indicator_json(i: Indicator) -> dict[str, Any]:
    return {
        "agency": i.agency,
        "rank": i.rank,
        "e_service_share": _number(i.e_service_share),
        "visit_reduction": _number(i.visit_reduction),
        "behind_target": i.behind,
        "reasons": list(i.reasons),
    }


def render_json(report: QuarterlyReport) -> str:
    return json.dumps(report_json(report), indent=2, ensure_ascii=False) + "\n"


# --- CSV -------------------------------------------------------------------------------------


def _spreadsheet_safe(text: str) -> str:
    """Text a spreadsheet will not run as a formula (OWASP's CSV injection advice)."""
    return f"'{text}" if text.startswith(("=", "+", "-", "@", "\t", "\r")) else text


def render_csv(report: QuarterlyReport) -> str:
    """One row per agency in rank order; empty cells where a figure cannot be computed."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for agency, indicator in zip(report.agencies, report.indicators, strict=True):
        data = _agency_json(agency)
        cells: dict[str, Any] = {
            **data,
            "rank": indicator.rank,
            "agency_id": agency.id,
            "agency_name": _spreadsheet_safe(agency.name),
            "services": "; ".join(s.name for s in agency.services),
            "behind_target": "yes" if indicator.behind else "no",
            "reasons": "; ".join(indicator.reasons),
        }
        writer.writerow(["" if cells[c] is None else cells[c] for c in CSV_COLUMNS])
    return out.getvalue()


def render_purposes_csv(report: QuarterlyReport) -> str:
    """Calls by purpose: one row per provider agency (in rank order), service and purpose."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(PURPOSE_CSV_COLUMNS)
    for agency in report.agencies:
        for p in agency.purposes:
            writer.writerow(
                [
                    agency.id,
                    _spreadsheet_safe(agency.name),
                    p.service,
                    _spreadsheet_safe(p.purpose),
                    _spreadsheet_safe(p.reference or ""),
                    p.recorded,
                    _spreadsheet_safe("; ".join(p.grants)),
                    p.calls,
                    p.successful,
                ]
            )
    return out.getvalue()


def render_protocols_csv(report: QuarterlyReport) -> str:
    """Calls by protocol: one row per protocol; an empty share when there were no calls."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(PROTOCOL_CSV_COLUMNS)
    for p in report.protocols:
        share = _number(p.share)
        writer.writerow(
            [_spreadsheet_safe(p.protocol), p.calls, p.errors, "" if share is None else share]
        )
    return out.getvalue()


# --- HTML ------------------------------------------------------------------------------------


def _count(value: int) -> str:
    return f"{value:,}"


def _ms(ns: int | None) -> str:
    return "\N{EN DASH}" if ns is None else f"{ns / 1_000_000:,.1f} ms"


def _windows(a: AgencyFigures) -> str:
    if a.windows_with_calls == 0:
        return "no call reached it"
    return f"{a.windows_answered} of {a.windows_with_calls} windows"


def _visits(value: Decimal) -> str:
    return f"{value:,.1f}".removesuffix(".0")


def _signed(value: Decimal | None) -> str:
    return percent(value) if value is None or value < 0 else "+" + percent(value)


def _figure(label: str, value: str, note: str = "") -> str:
    note_html = f'<span class="note">{escape(note)}</span>' if note else ""
    return (
        f'<div class="figure"><dt>{escape(label)}</dt>'
        f'<dd><span class="value">{escape(value)}</span>{note_html}</dd></div>'
    )


def _national(report: QuarterlyReport) -> str:
    n, previous = report.national, report.quarter.previous()
    growth = f"in transactions over {previous}" if n.growth is not None else f"none in {previous}"
    figures = [
        _figure("Agencies connected", _count(n.agencies_connected)),
        _figure("Agencies active", _count(n.agencies_active), "consumer or provider of a call"),
        _figure("Services offered", _count(n.services_offered)),
        _figure("Methods offered", _count(n.methods_offered)),
        _figure(
            "Transactions",
            _count(n.transactions),
            f"{_count(n.transactions_previous)} in {previous}",
        ),
        _figure("Successful", _count(n.successful), f"{percent(n.success_rate)} success rate"),
        _figure("Growth", _signed(n.growth) if n.growth is not None else "\N{EN DASH}", growth),
        _figure(
            "Calls refused before identification",
            _count(n.refused_before_identification),
            "certificates that identified no agency; in no figure above",
        ),
        _figure(
            "Calls from agencies not in the registry",
            _count(n.from_undeclared_agencies),
            "agencies the broker configuration does not declare; in no figure above",
        ),
    ]
    return f'<dl class="national">{"".join(figures)}</dl>'


def _agency_cell(a: AgencyFigures) -> str:
    return f'<th scope="row"><span class="name">{escape(a.name)}</span> <code>{escape(a.id)}</code></th>'


def _indicators(report: QuarterlyReport) -> str:
    rows = []
    for a, i in zip(report.agencies, report.indicators, strict=True):
        if i.behind:
            reasons = "".join(f"<li>{escape(r)}</li>" for r in i.reasons)
            status = (
                f'<span class="flag behind">Behind target</span><ul class="reasons">{reasons}</ul>'
            )
        else:
            status = '<span class="flag met">On target</span>'
        share_note = (
            f"{a.services_offered} of {a.government_services} services"
            if a.government_services is not None
            else "government services not reported"
        )
        baseline_note = (
            f"{_visits(a.visits_avoided)} of {_count(a.in_person_visits_per_quarter)} visits"
            if a.in_person_visits_per_quarter is not None
            else "no in-person visit baseline"
        )
        rows.append(
            f'<tr class="{"behind" if i.behind else "met"}" data-agency="{escape(a.id)}">'
            f'<td class="num rank">{i.rank}</td>{_agency_cell(a)}'
            f'<td class="num">{escape(percent(i.e_service_share))}'
            f'<span class="note">{escape(share_note)}</span></td>'
            f'<td class="num">{escape(percent(i.visit_reduction))}'
            f'<span class="note">{escape(baseline_note)}</span></td>'
            f"<td>{status}</td></tr>"
        )
    return (
        '<table class="indicators"><thead><tr><th class="num">Rank</th><th>Agency</th>'
        f'<th class="num">E-service share<span class="note">target {percent(E_SERVICE_TARGET, 0)}</span></th>'
        f'<th class="num">Visit reduction<span class="note">target {percent(VISIT_REDUCTION_TARGET, 0)}</span></th>'
        f"<th>Status</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _activity(report: QuarterlyReport) -> str:
    rows = []
    for a in report.agencies:
        services = "".join(
            f'<li><code>{escape(s.name)}</code> <span class="muted">({len(s.methods)} '
            f"method{'s' if len(s.methods) != 1 else ''})</span></li>"
            for s in a.services
        )
        rows.append(
            f'<tr data-agency="{escape(a.id)}">{_agency_cell(a)}'
            f"<td>{f'<ul class=services>{services}</ul>' if services else '<span class=muted>none</span>'}</td>"
            f'<td class="num">{_count(a.transactions_served)}</td>'
            f'<td class="num">{_count(a.transactions_consumed)}</td>'
            f'<td class="num">{escape(percent(a.success_rate))}</td>'
            f'<td class="num">{escape(percent(a.availability))}'
            f'<span class="note">{_windows(a)}</span></td>'
            f'<td class="num">{escape(_ms(a.latency_p50_ns))}</td>'
            f'<td class="num">{escape(_ms(a.latency_p95_ns))}</td>'
            f'<td class="num">{_count(a.distinct_consumers)}</td>'
            f'<td class="num">{escape(_visits(a.visits_avoided))}'
            f'<span class="note">{escape(_visits(a.visits_per_exchange))} per exchange</span></td>'
            "</tr>"
        )
    head = "".join(
        f'<th class="{cls}">{escape(label)}</th>'
        for cls, label in [
            ("", "Agency"),
            ("", "Services provided"),
            ("num", "Served"),
            ("num", "Consumed"),
            ("num", "Success"),
            ("num", "Availability"),
            ("num", "Latency p50"),
            ("num", "Latency p95"),
            ("num", "Consumers"),
            ("num", "Visits avoided"),
        ]
    )
    return f'<table class="activity"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _purposes(report: QuarterlyReport) -> str:
    rows = []
    for a in report.agencies:
        for p in a.purposes:
            purpose = escape(p.purpose)
            if p.recorded == "unknown grant":
                purpose = f'<code>{purpose}</code><span class="note">a grant the registry does not know</span>'
            elif p.recorded == "no purpose":
                purpose = f'<span class="muted">{purpose}</span>'
            grants = ", ".join(f"<code>{escape(g)}</code>" for g in p.grants)
            rows.append(
                f'<tr data-agency="{escape(a.id)}">{_agency_cell(a)}'
                f"<td><code>{escape(p.service)}</code></td>"
                f"<td>{purpose}</td>"
                f"<td>{escape(p.reference) if p.reference else '<span class=muted>none</span>'}</td>"
                f'<td class="grants">{grants}</td>'
                f'<td class="num">{_count(p.calls)}</td>'
                f'<td class="num">{_count(p.successful)}'
                f'<span class="note">{escape(percent(ratio(p.successful, p.calls)))}</span></td>'
                "</tr>"
            )
    if not rows:
        return '<p class="muted">No call in the quarter was admitted by a grant.</p>'
    head = "".join(
        f'<th class="{cls}">{escape(label)}</th>'
        for cls, label in [
            ("", "Provider"),
            ("", "Service"),
            ("", "Purpose"),
            ("", "Reference"),
            ("", "Grants"),
            ("num", "Calls admitted"),
            ("num", "Successful"),
        ]
    )
    return f'<table class="purposes"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _protocols(report: QuarterlyReport) -> str:
    rows = [
        f"<tr><td><code>{escape(p.protocol)}</code></td>"
        f'<td class="num">{_count(p.calls)}</td>'
        f'<td class="num">{_count(p.errors)}'
        f'<span class="note">{escape(percent(ratio(p.errors, p.calls)))}</span></td>'
        f'<td class="num">{escape(percent(p.share))}</td></tr>'
        for p in report.protocols
    ]
    head = "".join(
        f'<th class="{cls}">{escape(label)}</th>'
        for cls, label in [("", "Protocol"), ("num", "Calls"), ("num", "Errors"), ("num", "Share")]
    )
    return f'<table class="protocols"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _ratio_axis(values: Sequence[float | None], target: Decimal) -> Axis:
    return nice_axis(max([float(target), *(v for v in values if v is not None)]))


def _percent_tick(value: float) -> str:
    return f"{value * 100:.1f}".removesuffix(".0") + "%"


def _charts(report: QuarterlyReport) -> str:
    agencies = report.agencies
    served = [float(a.transactions_served) for a in agencies]
    consumed = [float(a.transactions_consumed) for a in agencies]
    transactions = bar_chart(
        chart_id="chart-transactions",
        title="Transactions served and consumed per agency",
        series=[
            Series("served", "served (as provider)"),
            Series("consumed", "consumed (as consumer)"),
        ],
        rows=[
            Row(
                a.id,
                a.name,
                (s, c),
                (_count(a.transactions_served), _count(a.transactions_consumed)),
            )
            for a, s, c in zip(agencies, served, consumed, strict=True)
        ],
        axis=nice_axis(max([0.0, *served, *consumed]), whole=True),
        tick_label=lambda v: _count(int(v)),
    )

    def indicator_chart(
        chart_id: str,
        title: str,
        key: str,
        label: str,
        target: Decimal,
        values: list[Decimal | None],
    ) -> str:
        floats = [float(v) if v is not None else None for v in values]
        return bar_chart(
            chart_id=chart_id,
            title=title,
            series=[Series(key, label)],
            rows=[
                Row(
                    a.id,
                    a.name,
                    (f,),
                    (percent(v) if v is not None else "no data",),
                    behind=v is None or v < target,
                )
                for a, v, f in zip(agencies, values, floats, strict=True)
            ],
            axis=_ratio_axis(floats, target),
            tick_label=_percent_tick,
            target=Target(float(target), f"target {percent(target, 0)}"),
            marks_behind=True,
        )

    shares = indicator_chart(
        "chart-e-service-share",
        "E-service share against the 100% target",
        "share",
        "e-service share",
        E_SERVICE_TARGET,
        [a.e_service_share for a in agencies],
    )
    reductions = indicator_chart(
        "chart-visit-reduction",
        "Visit reduction against the 12% target",
        "reduction",
        "visit reduction",
        VISIT_REDUCTION_TARGET,
        [a.visit_reduction for a in agencies],
    )
    p50 = [a.latency_p50_ns / 1e6 if a.latency_p50_ns is not None else None for a in agencies]
    p95 = [a.latency_p95_ns / 1e6 if a.latency_p95_ns is not None else None for a in agencies]
    latency = bar_chart(
        chart_id="chart-latency",
        title="Latency of answered calls per agency (ms)",
        series=[Series("p50", "p50"), Series("p95", "p95")],
        rows=[
            Row(
                a.id,
                a.name,
                (m, n),
                (_ms(a.latency_p50_ns), _ms(a.latency_p95_ns))
                if m is not None
                else ("no answered calls", ""),
            )
            for a, m, n in zip(agencies, p50, p95, strict=True)
        ],
        axis=nice_axis(max([0.0, *(v for v in p50 + p95 if v is not None)])),
        tick_label=lambda v: f"{v:g}",
    )
    figures = [
        ("Transactions per agency", transactions),
        ("E-service share (target 100%)", shares),
        ("Visit reduction (target 12%)", reductions),
        ("Latency of answered calls, p50 and p95 (ms)", latency),
    ]
    return "".join(
        f'<figure class="chart-card"><figcaption>{escape(caption)}</figcaption>{svg}</figure>'
        for caption, svg in figures
    )


def _definitions() -> str:
    items = "".join(
        f"<div><dt>{escape(key.replace('_', ' ').capitalize())}</dt><dd>{escape(text)}</dd></div>"
        for key, text in DEFINITIONS.items()
    )
    return f'<dl class="definitions">{items}</dl>'


_CSS = """
:root {
  --bg: #f4f6f8; --surface: #fff; --text: #1b2430; --muted: #5a6472; --border: #d6dce3;
  --accent: #1a5fb4; --accent-light: #8fb3e3; --met: #2b8a3e; --met-soft: #ebf7ee;
  --behind: #c2410c; --behind-soft: #fff1e8; --radius: 6px;
  --mono: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", sans-serif;
  font-size: 14px; line-height: 1.45; color: var(--text); background: var(--bg);
}
* { box-sizing: border-box; }
body { margin: 0; }
main { max-width: 1200px; margin: 0 auto; padding: 24px; }
header.report { background: #16202c; color: #fff; }
header.report .inner { max-width: 1200px; margin: 0 auto; padding: 20px 24px; }
header.report .kicker { text-transform: uppercase; letter-spacing: .06em; font-size: 12px; color: #b8c4d2; }
h1 { font-size: 24px; margin: 4px 0; }
h2 { font-size: 17px; margin: 32px 0 12px; }
.period { color: #dbe3ec; }
code { font-family: var(--mono); font-size: 12.5px; }
.muted, .note { color: var(--muted); }
.note { display: block; font-size: 12px; font-weight: normal; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
section { background: var(--surface); border: 1px solid var(--border); border-radius: var(--radius);
  padding: 4px 20px 20px; margin-bottom: 20px; }
dl.national { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 12px; margin: 0; }
.figure { border: 1px solid var(--border); border-radius: var(--radius); padding: 10px 12px; }
.figure dt { font-size: 12px; color: var(--muted); }
.figure dd { margin: 0; }
.figure .value { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 8px; border-bottom: 1px solid var(--border); vertical-align: top; text-align: left; }
thead th { font-size: 12px; color: var(--muted); font-weight: 600; border-bottom-width: 2px; }
th.num, td.num { text-align: right; }
td.num { white-space: nowrap; }
td.num .note { white-space: normal; }
td.grants code { white-space: nowrap; }
tbody th { font-weight: normal; }
tbody th .name { font-weight: 600; }
tbody th { min-width: 190px; }
tbody th code { color: var(--muted); }
.rank { font-weight: 700; font-size: 16px; }
tr.behind { background: var(--behind-soft); }
tr.behind td:first-child { box-shadow: inset 4px 0 0 var(--behind); }
tr.met td:first-child { box-shadow: inset 4px 0 0 var(--met); }
.flag { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px; font-weight: 600; }
.flag.behind { background: var(--behind); color: #fff; }
.flag.met { background: var(--met-soft); color: var(--met); border: 1px solid var(--met); }
ul.reasons, ul.services { margin: 4px 0 0; padding-left: 18px; }
ul.services { padding-left: 0; list-style: none; margin: 0; }
.table-wrap { overflow-x: auto; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 16px; }
figure.chart-card { margin: 0; border: 1px solid var(--border); border-radius: var(--radius); padding: 12px; }
figcaption { font-weight: 600; margin-bottom: 8px; }
svg.chart { display: block; max-width: 100%; height: auto; font-family: inherit; }
svg.chart text { font-size: 12px; fill: var(--text); }
svg.chart text.tick, svg.chart text.value { fill: var(--muted); font-size: 11px; }
svg.chart text.value.behind { fill: var(--behind); font-weight: 600; }
svg.chart .behind-mark { fill: var(--behind); font-weight: 600; font-size: 11px; }
svg.chart .grid { stroke: #e7ebf0; }
svg.chart .axis { stroke: #9aa5b1; }
svg.chart .target { stroke: var(--text); stroke-width: 2; stroke-dasharray: 5 3; }
svg.chart .served, svg.chart .p95 { fill: var(--accent); }
svg.chart .consumed, svg.chart .p50 { fill: var(--accent-light); }
svg.chart .share, svg.chart .reduction { fill: var(--met); }
svg.chart .behind { fill: var(--behind); }
dl.definitions { columns: 2 420px; column-gap: 40px; margin: 0; }
dl.definitions div { break-inside: avoid; padding-top: 10px; }
dl.definitions dt { font-weight: 600; }
dl.definitions dd { margin: 2px 0 0; color: #36404c; }
footer { color: var(--muted); font-size: 12px; padding: 0 24px 24px; max-width: 1200px; margin: 0 auto; }
@media print {
  :root { background: #fff; }
  header.report { background: #fff; color: var(--text); border-bottom: 2px solid var(--text); }
  header.report .kicker, .period { color: var(--muted); }
  section { break-inside: avoid; border: none; padding: 0; }
}
"""


def render_html(report: QuarterlyReport) -> str:
    """The whole report as one self-contained HTML page."""
    q = report.quarter
    behind = sum(1 for i in report.indicators if i.behind)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tabadol quarterly e-service assessment {escape(str(q))}</title>
<style>{_CSS}</style>
</head>
<body>
<header class="report"><div class="inner">
<div class="kicker">Tabadol &middot; quarterly e-service assessment</div>
<h1>{escape(str(q))} &middot; {escape(q.months)}</h1>
<div class="period">{escape(q.period)}, from 00:00 Asia/Tehran on the first day to the end of the last</div>
</div></header>
<main>
<section id="national"><h2>National totals</h2>{_national(report)}</section>
<section id="indicators"><h2>Indicators against national targets</h2>
<p class="muted">Targets: every government service electronic ({escape(percent(E_SERVICE_TARGET, 0))}) and
{escape(percent(VISIT_REDUCTION_TARGET, 0))} fewer in-person visits. {behind} of {len(report.indicators)}
agencies are behind.</p>
<div class="table-wrap">{_indicators(report)}</div></section>
<section id="charts"><h2>Charts</h2><div class="charts">{_charts(report)}</div></section>
<section id="agencies"><h2>Per agency</h2><div class="table-wrap">{_activity(report)}</div></section>
<section id="purposes"><h2>Calls by purpose</h2>
<p class="muted">The calls each provider's services answered under a grant, by the grant's purpose
(its legal basis) and reference.</p>
<div class="table-wrap">{_purposes(report)}</div></section>
<section id="protocols"><h2>Calls by protocol</h2>
<p class="muted">The transactions by what they came in by: gRPC, or the broker's HTTP gateway
(Connect, or REST/JSON on the routes the contracts declare).</p>
<div class="table-wrap">{_protocols(report)}</div></section>
<section id="method"><h2>How these figures are computed</h2>
<p>From the Tabadol ledger's records of calls that started from {escape(both_dates(q.first_day))} to
{escape(both_dates(q.last_day))} (and, for growth, in {escape(str(q.previous()))}), and from the broker
configuration: agencies, services and their contracts, and each agency's registry figures.</p>
{_definitions()}</section>
</main>
<footer>Tabadol &middot; {escape(str(q))} &middot; dates in the Solar Hijri calendar with the Gregorian date beside them</footer>
</body>
</html>
"""


def write_quarterly(report: QuarterlyReport, out_dir: Path) -> list[Path]:
    """Write the HTML, CSV, JSON, calls-by-purpose and calls-by-protocol CSV files into
    ``out_dir`` (created if missing); their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = file_stem(report)
    written = []
    for name, text in (
        (f"{stem}.html", render_html(report)),
        (f"{stem}.csv", render_csv(report)),
        (f"{stem}.json", render_json(report)),
        (f"{stem}-purposes.csv", render_purposes_csv(report)),
        (f"{stem}-protocols.csv", render_protocols_csv(report)),
    ):
        path = out_dir / name
        path.write_text(text, encoding="utf-8", newline="")
        written.append(path)
    return written
