"""The quarterly e-service assessment's figures: pure arithmetic over the registry and the ledger.

Nothing here reads a file or queries a store. ``build_quarterly`` asks the store and hands its
answers over as ``Activity``; everything below is a function of that and the configuration.
Ratios are ``Decimal`` so that a figure exactly at a target (12 of 100 visits) meets it.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal

from tabadol.config import AgencyEntry, BrokerConfig
from tabadol.ledger.rollup import WINDOW_NS as WINDOW_NS  # the availability windows
from tabadol.ledger.rollup import Histogram, percentiles
from tabadol.ledger.store.base import CallGroup
from tabadol.reports.protocols import ProtocolCalls, calls_by_protocol
from tabadol.reports.purposes import GrantPurpose, PurposeCalls, calls_by_purpose
from tabadol.reports.quarter import Quarter

OK = 0  # gRPC status code
UNAVAILABLE = 14
E_SERVICE_TARGET = Decimal(1)  # every government service electronic
VISIT_REDUCTION_TARGET = Decimal("0.12")  # 12% fewer in-person visits

DEFINITIONS: dict[str, str] = {
    "quarter": (
        "From 00:00 Asia/Tehran on the quarter's first day (inclusive) to 00:00 on the next "
        "quarter's first day (exclusive); a call belongs to the quarter in which it started."
    ),
    "transactions": (
        "Every call the broker recorded in the ledger from an identified caller that the "
        "configuration declares as an agency, whatever its outcome, including calls it "
        "refused (calls without a grant, over a limit, to unknown services). Calls refused "
        "before identification and calls from agencies not in the registry are not counted here."
    ),
    "refused_before_identification": (
        "Calls the broker refused because the caller's certificate identified no agency (revoked, "
        "a stale revocation list, outside the trust domain), recorded in the ledger as "
        "unverified. The agency such a certificate claims is only a claim: these calls count "
        "in no agency's figures and in no national rate, only in this one count."
    ),
    "from_undeclared_agencies": (
        "Calls from agencies not in the registry: the caller's certificate identified an agency "
        "that the broker configuration does not declare (the broker refuses them). They count in "
        "no agency's figures and in no national rate, only in this one count."
    ),
    "successful": "Transactions that ended with gRPC status 0 (OK).",
    "success_rate": "Successful transactions divided by transactions.",
    "growth": (
        "(transactions this quarter - transactions in the previous quarter) / transactions in "
        "the previous quarter; 0.25 means 25% more. None when the previous quarter had none."
    ),
    "agencies_connected": "Agencies declared in the broker configuration.",
    "agencies_active": (
        "Declared agencies named as consumer or provider by at least one transaction this quarter "
        "(calls refused before identification or from agencies not in the registry do not make "
        "an agency active)."
    ),
    "services_offered": "Services declared in the configuration (for an agency: those it provides).",
    "methods_offered": "Methods of those services in the loaded contracts.",
    "transactions_served": (
        "Transactions the broker forwarded to the agency as provider (calls it refused itself, "
        "for want of a grant or a valid certificate, never reached the agency)."
    ),
    "transactions_consumed": (
        "Transactions naming the agency as consumer, identified by its certificate (a refused "
        "certificate claiming the agency does not count)."
    ),
    "success_rate_served": "Served transactions with status 0, divided by transactions served.",
    "availability": (
        "The quarter is cut into consecutive five-minute windows from its start (windows of "
        "the UTC epoch: a quarter starts at a Tehran midnight, which starts one). A window "
        "counts for a provider when at least one call the broker forwarded to it (an endpoint "
        "was chosen) started in that window; it is answered when at least one of those calls "
        "ended with a status other than 14 (UNAVAILABLE). Availability = answered windows / "
        "windows with calls; none when no call reached the provider. Windows without calls say "
        "nothing. Counted from the ledger's rollups: per provider and Tehran day, a bitmask of "
        "the day's windows with calls and one of those answered (from the calls counted per "
        "window as each sealed batch was written); the masks of every node's and archive's rows "
        "of a day are ORed, so a window whose calls were written by two nodes counts once."
    ),
    "latency": (
        "Durations (broker receipt to final status) of the calls the provider answered: forwarded "
        "and not UNAVAILABLE. Nearest-rank percentiles of the n durations, read from the "
        "ledger's rollups, which keep a histogram of the durations a provider answered per day, "
        "in log-linear bins (64 bins per "
        "power of two): the p-th percentile is the midpoint of the bin holding the value at "
        "position ceil(p/100 * n) of the ascending list, counting from 1. It is within 0.78% "
        "(1/128) of that value, and exact below 64 ns. None when it answered no call."
    ),
    "distinct_consumers": (
        "Different consumer agencies (identified callers only) with at least one transaction "
        "naming the agency as provider."
    ),
    "e_service_share": (
        "Services the agency provides on the exchange / its government_services (all its "
        "government services, electronic or not). None when government_services is not "
        "reported or is 0. Target: 100%."
    ),
    "visits_avoided": (
        "Successful transactions served x visits_per_exchange (in-person visits one exchange "
        "replaces); a failed exchange replaces no visit."
    ),
    "visit_reduction": (
        "Visits avoided / in_person_visits_per_quarter (the agency's baseline). None when no "
        "baseline is reported or it is 0. Target: 12%."
    ),
    "rank": (
        "Agencies with both indicators come first, then those missing either. Within each group: "
        "e-service share, descending, then visit reduction, descending (a missing figure sorts "
        "below any number). Agencies equal on all of these share a rank (1, 2, 2, 4)."
    ),
    "behind_target": (
        "An agency is behind when its e-service share is below 100%, its visit reduction is "
        "below 12%, or either cannot be computed; the reasons say which."
    ),
    "calls_by_purpose": (
        "Per service an agency provides: the calls that a grant admitted (the ledger records "
        "which grant admitted each call), counted under that grant's purpose, the legal basis "
        "its provider gave, and its reference; and of those, the ones that ended with status 0 "
        "(OK). Grants with the same purpose and reference on a service count together. A "
        "grant's purpose is read from every registry version, so a grant revoked or changed "
        "during the quarter still counts under its purpose (the latest it gave). Calls of a "
        'grant that gave no purpose count under "(no purpose recorded)"; calls of a grant '
        "the registry does not know count under the grant's id. Calls no grant admitted "
        "(refused ones, and the platform's own services) are not counted here."
    ),
    "calls_by_protocol": (
        "The transactions (as counted above) by the protocol each came in by: grpc (gRPC), "
        "connect (the Connect protocol, over the broker's HTTP gateway) or rest (JSON on the "
        "routes the contracts declare, over the same gateway); of each, the errors (calls "
        "that did not end with status 0, OK), and its share of all transactions. Calls a "
        "ledger recorded before it recorded protocols were gRPC calls."
    ),
    "percentages": (
        "Shown truncated to one decimal place, never rounded up: 99.96% shows as 99.9%, so a "
        "figure shown at its target has met it. Raw values are in the JSON and CSV."
    ),
}


@dataclass(frozen=True)
class Activity:
    """What the store says about one quarter: its call groups and, per provider, timings."""

    groups: Sequence[CallGroup]
    histograms: Mapping[str, Histogram] = field(default_factory=dict)  # of answered calls
    windows: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # (with calls, answered)


@dataclass(frozen=True)
class National:
    agencies_connected: int
    agencies_active: int
    services_offered: int
    methods_offered: int
    transactions: int
    successful: int
    success_rate: Decimal | None
    transactions_previous: int
    growth: Decimal | None
    refused_before_identification: int = 0  # counted apart: in no figure above
    from_undeclared_agencies: int = 0  # identified, but not in the registry: apart too


@dataclass(frozen=True)
class OfferedService:
    name: str
    methods: tuple[str, ...]


@dataclass(frozen=True)
class AgencyFigures:
    id: str
    name: str
    services: tuple[OfferedService, ...]
    transactions_served: int
    successful_served: int
    transactions_consumed: int
    success_rate: Decimal | None
    windows_with_calls: int
    windows_answered: int
    availability: Decimal | None
    answered_calls: int
    latency_p50_ns: int | None
    latency_p95_ns: int | None
    distinct_consumers: int
    government_services: int | None
    e_service_share: Decimal | None
    visits_per_exchange: Decimal
    visits_avoided: Decimal
    in_person_visits_per_quarter: int | None
    visit_reduction: Decimal | None
    purposes: tuple[PurposeCalls, ...] = ()  # calls by purpose, of the services it provides

    @property
    def services_offered(self) -> int:
        return len(self.services)

    @property
    def methods_offered(self) -> int:
        return sum(len(s.methods) for s in self.services)


@dataclass(frozen=True)
class Indicator:
    """An agency measured against the national targets."""

    agency: str
    e_service_share: Decimal | None
    visit_reduction: Decimal | None
    rank: int
    behind: bool
    reasons: tuple[str, ...]  # why it is behind; empty when on target


@dataclass(frozen=True)
class QuarterlyReport:
    quarter: Quarter
    national: National
    agencies: tuple[AgencyFigures, ...]  # in rank order
    indicators: tuple[Indicator, ...]  # in rank order, one per agency
    protocols: tuple[ProtocolCalls, ...] = ()  # the transactions by protocol

    def indicator(self, agency: str) -> Indicator:
        return next(i for i in self.indicators if i.agency == agency)

    def figures(self, agency: str) -> AgencyFigures:
        return next(a for a in self.agencies if a.id == agency)


def ratio(numerator: int | Decimal, denominator: int) -> Decimal | None:
    return None if denominator == 0 else Decimal(numerator) / Decimal(denominator)


def percentile(histogram: Histogram, p: int) -> int | None:
    """Nearest rank: the midpoint of the bin holding the value at position ceil(p/100 * n)
    of the ascending durations, from 1 (tabadol.ledger.rollup.percentiles)."""
    return percentiles(histogram, (p,)).get(p)


def percent(value: Decimal | None, places: int = 1) -> str:
    """``12.5%``, truncated (never rounded up); an en dash when there is no figure."""
    if value is None:
        return "\N{EN DASH}"
    shown = (value * 100).quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN)
    return f"{shown}%"


def _sum(groups: Sequence[CallGroup], keep: Callable[[CallGroup], bool]) -> int:
    return sum(g.calls for g in groups if keep(g))


def _offered(cfg: BrokerConfig, provider: str | None = None) -> tuple[OfferedService, ...]:
    return tuple(
        OfferedService(name, tuple(cfg.contracts.services[name].methods))
        for name, service in cfg.services.items()
        if provider is None or service.provider == provider
    )


def declared_caller(group: CallGroup, agencies: Container[str]) -> bool:
    """Whether calls came from an identified consumer that the registry declares: the only
    ones any figure counts (see refused_before_identification, from_undeclared_agencies)."""
    return group.verified and not undeclared_caller(group, agencies)


def undeclared_caller(group: CallGroup, agencies: Container[str]) -> bool:
    """Whether calls came from an agency the certificate identified but the registry does
    not declare. (A ledger written before refusals were marked unverified names no consumer,
    "", for a caller never identified: that is no undeclared agency, and counts as before.)"""
    return group.verified and group.consumer != "" and group.consumer not in agencies


def identified(groups: Sequence[CallGroup], agencies: Container[str]) -> list[CallGroup]:
    """The calls of identified consumers declared in ``agencies`` (``declared_caller``)."""
    return [g for g in groups if declared_caller(g, agencies)]


def national_figures(cfg: BrokerConfig, current: Activity, previous: Activity) -> National:
    groups = identified(current.groups, cfg.agencies)
    named = {g.consumer for g in groups} | {g.provider for g in groups}
    transactions = _sum(groups, lambda g: True)
    successful = _sum(groups, lambda g: g.status_code == OK)
    transactions_previous = _sum(identified(previous.groups, cfg.agencies), lambda g: True)
    return National(
        agencies_connected=len(cfg.agencies),
        agencies_active=len(named & cfg.agencies.keys()),
        services_offered=len(cfg.services),
        methods_offered=sum(len(s.methods) for s in _offered(cfg)),
        transactions=transactions,
        successful=successful,
        success_rate=ratio(successful, transactions),
        transactions_previous=transactions_previous,
        growth=ratio(transactions - transactions_previous, transactions_previous),
        refused_before_identification=_sum(current.groups, lambda g: not g.verified),
        from_undeclared_agencies=_sum(current.groups, lambda g: undeclared_caller(g, cfg.agencies)),
    )


def agency_figures(
    cfg: BrokerConfig,
    agency: AgencyEntry,
    current: Activity,
    involving: Sequence[CallGroup] | None = None,
    purposes: Sequence[PurposeCalls] = (),
) -> AgencyFigures:
    """One agency's figures; ``involving``: the declared callers' groups that name it as
    consumer or provider, when the caller has them sorted by agency already; ``purposes``:
    the calls by purpose of the services it provides."""
    if involving is None:
        involving = identified(current.groups, cfg.agencies)
    served = [g for g in involving if g.provider == agency.id and g.forwarded]
    transactions_served = _sum(served, lambda g: True)
    successful_served = _sum(served, lambda g: g.status_code == OK)
    with_calls, answered = current.windows.get(agency.id, (0, 0))
    histogram = current.histograms.get(agency.id, {})
    services = _offered(cfg, agency.id)
    visits_per_exchange = Decimal(str(agency.visits_per_exchange))  # the decimal as written
    visits_avoided = successful_served * visits_per_exchange
    government = agency.government_services
    baseline = agency.in_person_visits_per_quarter
    return AgencyFigures(
        id=agency.id,
        name=agency.name,
        services=services,
        transactions_served=transactions_served,
        successful_served=successful_served,
        transactions_consumed=_sum(involving, lambda g: g.consumer == agency.id),
        success_rate=ratio(successful_served, transactions_served),
        windows_with_calls=with_calls,
        windows_answered=answered,
        availability=ratio(answered, with_calls),
        answered_calls=sum(histogram.values()),
        latency_p50_ns=percentile(histogram, 50),
        latency_p95_ns=percentile(histogram, 95),
        distinct_consumers=len({g.consumer for g in served if g.consumer}),
        government_services=government,
        e_service_share=ratio(len(services), government) if government is not None else None,
        visits_per_exchange=visits_per_exchange,
        visits_avoided=visits_avoided,
        in_person_visits_per_quarter=baseline,
        visit_reduction=ratio(visits_avoided, baseline) if baseline is not None else None,
        purposes=tuple(purposes),
    )


def _reasons(figures: AgencyFigures) -> tuple[str, ...]:
    reasons: list[str] = []
    share, reduction = figures.e_service_share, figures.visit_reduction
    if share is None:
        reported = "is not reported" if figures.government_services is None else "is 0"
        reasons.append(f"e-service share unknown: its number of government services {reported}")
    elif share < E_SERVICE_TARGET:
        reasons.append(
            f"e-service share {percent(share)} is below the {percent(E_SERVICE_TARGET, 0)} target "
            f"({figures.services_offered} of {figures.government_services} services on the exchange)"
        )
    if reduction is None:
        reported = "is not reported" if figures.in_person_visits_per_quarter is None else "is 0"
        reasons.append(f"visit reduction unknown: its in-person visit baseline {reported}")
    elif reduction < VISIT_REDUCTION_TARGET:
        reasons.append(
            f"visit reduction {percent(reduction)} is below the "
            f"{percent(VISIT_REDUCTION_TARGET, 0)} target"
        )
    return tuple(reasons)


def _standing(figures: AgencyFigures) -> tuple[bool, bool, Decimal, bool, Decimal]:
    """A sort key, best first: complete data, then share and reduction descending."""
    share, reduction = figures.e_service_share, figures.visit_reduction
    return (
        share is None or reduction is None,
        share is None,
        -share if share is not None else Decimal(0),
        reduction is None,
        -reduction if reduction is not None else Decimal(0),
    )


def rank(agencies: Sequence[AgencyFigures]) -> list[Indicator]:
    """Indicators in rank order; equal standings share a rank (competition ranking, 1 2 2 4)."""
    ordered = sorted(agencies, key=lambda a: (_standing(a), a.id))
    indicators: list[Indicator] = []
    for position, figures in enumerate(ordered, start=1):
        tied = position > 1 and _standing(ordered[position - 2]) == _standing(figures)
        reasons = _reasons(figures)
        indicators.append(
            Indicator(
                agency=figures.id,
                e_service_share=figures.e_service_share,
                visit_reduction=figures.visit_reduction,
                rank=indicators[-1].rank if tied else position,
                behind=bool(reasons),
                reasons=reasons,
            )
        )
    return indicators


def assess(
    cfg: BrokerConfig,
    quarter: Quarter,
    current: Activity,
    previous: Activity,
    purposes: Mapping[str, GrantPurpose] | None = None,
) -> QuarterlyReport:
    """Every figure of the quarterly report, from the registry and the two quarters' activity;
    ``purposes``: grant id -> purpose, of every grant the registry has held."""
    by_agency: dict[str, list[CallGroup]] = {a: [] for a in cfg.agencies}
    declared = identified(current.groups, cfg.agencies)
    for group in declared:
        for named in {group.consumer, group.provider} & by_agency.keys():
            by_agency[named].append(group)
    by_purpose = calls_by_purpose(current.groups, purposes or {})
    figures = {
        a.id: agency_figures(cfg, a, current, by_agency[a.id], by_purpose.get(a.id, ()))
        for a in cfg.agencies.values()
    }
    indicators = rank(list(figures.values()))
    return QuarterlyReport(
        quarter=quarter,
        national=national_figures(cfg, current, previous),
        agencies=tuple(figures[i.agency] for i in indicators),
        indicators=tuple(indicators),
        protocols=calls_by_protocol(declared),
    )
