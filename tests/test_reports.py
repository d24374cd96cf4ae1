"""Specification of the quarterly e-service assessment: quarters, figures, and the files.

The figures are checked against a ledger built by hand: every call below is placed on
purpose (in 1405-Q3, in 1405-Q2, or outside both), and every expected number is worked out
in a comment beside it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections import Counter
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

import jdatetime  # type: ignore[import-untyped]
import pytest
from google.protobuf import descriptor_pb2

from tabadol.config import BrokerConfig, load
from tabadol.ledger.record import LedgerRecord, Seal
from tabadol.ledger.rollup import bin_of, bin_value
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.reports import (
    AgencyFigures,
    Quarter,
    QuarterlyReport,
    build_quarterly,
    render_csv,
    render_html,
    report_json,
    write_quarterly,
)
from tabadol.reports.figures import percent, percentile, rank
from tabadol.reports.quarter import TEHRAN
from tests.support.echo import SERVICE as ECHO
from tests.support.echo import write_echo_contracts

TAX = "tabadol.test.v1.Tax"
MISSING = "tabadol.test.v1.Missing"  # in no contract: the broker refuses calls to it
ECHO_AT = "10.0.0.1:443"
TAX_AT = "10.0.0.2:443"
POST_NAME = 'Post <&> "Parcels"'  # markup characters, to prove every output escapes them
MS = 1_000_000
MINUTE = 60 * 1_000_000_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
Q3 = Quarter(1405, 3)
Q2 = Quarter(1405, 2)
T0, END = Q3.start_ns, Q3.end_ns
P0 = Q2.start_ns


def binned(ns: int) -> int:
    """A latency as the report gives it: the midpoint of the duration's histogram bin."""
    return bin_value(bin_of(ns))


CONFIG = f"""
[broker]
listen = "127.0.0.1:0"
trust_domain = "tabadol.test"
pki_dir = "pki"
contracts = ["contracts/echo.pb", "contracts/tax.pb"]

[[agency]]
id = "nocr"
name = "National Organization for Civil Registration"
government_services = 1
visits_per_exchange = 0.5
in_person_visits_per_quarter = 24

[[agency]]
id = "tax"
name = "National Tax Administration"
government_services = 4
visits_per_exchange = 3.0
in_person_visits_per_quarter = 100

[[agency]]
id = "post"
name = '{POST_NAME}'

[[agency]]
id = "cra"
name = "Communications Regulatory Authority"
government_services = 3
visits_per_exchange = 2.0
in_person_visits_per_quarter = 50

[[service]]
name = "{ECHO}"
provider = "nocr"
endpoints = ["{ECHO_AT}"]

[[service]]
name = "{TAX}"
provider = "tax"
endpoints = ["{TAX_AT}"]
"""


def write_tax_contracts(path: Path) -> Path:
    """A second contract: tabadol.test.v1.Tax with two methods, Assess and Pay."""
    fd = descriptor_pb2.FileDescriptorProto(
        name="tabadol/test/v1/tax.proto", package="tabadol.test.v1", syntax="proto3"
    )
    fd.message_type.add(name="Assessment").field.add(name="amount", number=1, type=3, label=1)
    service = fd.service.add(name="Tax")
    for method in ("Assess", "Pay"):
        service.method.add(
            name=method,
            input_type=".tabadol.test.v1.Assessment",
            output_type=".tabadol.test.v1.Assessment",
        )
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[fd]).SerializeToString())
    return path


@dataclass(frozen=True)
class Call:
    at: int  # start, UTC epoch ns
    consumer: str
    provider: str
    service: str
    method: str
    status: int
    ms: int
    endpoint: str
    verified: bool = True  # False: refused before identification; the consumer only claimed


def _calls() -> list[Call]:
    def echo(at: int, consumer: str, method: str, status: int, ms: int, reached: bool) -> Call:
        return Call(at, consumer, "nocr", ECHO, method, status, ms, ECHO_AT if reached else "")

    def tax(at: int, consumer: str, method: str, status: int, ms: int) -> Call:
        return Call(at, consumer, "tax", TAX, method, status, ms, TAX_AT)

    w = 5 * MINUTE  # availability window
    this_quarter = [
        # nocr serves 10 calls. Windows from T0: w0 (a-d), w1 (e), w2 (f), w3 (g), last (j).
        echo(T0, "post", "Unary", 0, 10, True),  # a: the quarter's first nanosecond
        echo(T0 + 1 * MINUTE, "post", "Unary", 0, 20, True),  # b
        echo(T0 + 2 * MINUTE, "post", "Unary", 0, 30, True),  # c
        echo(T0 + 3 * MINUTE, "post", "Unary", 0, 40, True),  # d
        echo(T0 + 1 * w + MINUTE, "post", "Unary", 5, 50, True),  # e: NOT_FOUND is an answer
        echo(T0 + 2 * w + MINUTE, "tax", "ServerStream", 0, 60, True),  # f
        echo(T0 + 3 * w + MINUTE, "post", "Unary", 14, 2000, True),  # g: reached, UNAVAILABLE
        echo(T0 + 4 * w + MINUTE, "post", "ServerStream", 7, 1, False),  # h: refused, no grant
        echo(T0 + 5 * w + MINUTE, "", "Unary", 16, 1, False),  # i: unidentified caller
        echo(END - 1, "tax", "Bidi", 0, 70, True),  # j: the quarter's last nanosecond
        # tax serves 8 calls, all from post. Windows: 24 (1, 2), 36, 48 (4, 5), 60, 72, 78.
        tax(T0 + 2 * HOUR, "post", "Pay", 0, 100),  # 1
        tax(T0 + 2 * HOUR + MINUTE, "post", "Pay", 0, 120),  # 2
        tax(T0 + 3 * HOUR, "post", "Assess", 0, 200),  # 3
        tax(T0 + 4 * HOUR, "post", "Assess", 14, 5000),  # 4: UNAVAILABLE ...
        tax(T0 + 4 * HOUR + 2 * MINUTE, "post", "Assess", 0, 300),  # 5: ... but w48 answered
        tax(T0 + 5 * HOUR, "post", "Assess", 14, 5000),  # 6: w60 not answered
        tax(T0 + 6 * HOUR, "post", "Pay", 14, 5000),  # 7: w72 not answered
        tax(T0 + 6 * HOUR + 30 * MINUTE, "post", "Pay", 5, 80),  # 8: w78 answered
        # A service nobody provides: counted nationally and as post's, served by no agency.
        Call(T0 + 7 * HOUR, "post", "", MISSING, "Do", 12, 1, ""),
    ]
    previous_quarter = [
        echo(P0, "cra", "Unary", 0, 15, True),  # 1405-Q2's first nanosecond
        echo(P0 + DAY, "cra", "Unary", 0, 15, True),
        echo(P0 + 2 * DAY, "cra", "Unary", 5, 15, True),
        tax(P0 + 3 * DAY, "post", "Pay", 0, 100),
        tax(T0 - 1, "post", "Pay", 0, 100),  # 1405-Q2's last nanosecond
    ]
    outside = [
        echo(P0 - 1, "post", "Unary", 0, 10, True),  # 1405-Q1's last nanosecond
        tax(P0 - 10 * DAY, "cra", "Pay", 0, 100),
        echo(END, "post", "Unary", 0, 10, True),  # 1405-Q4's first nanosecond
        echo(END + 30 * DAY, "tax", "Unary", 0, 10, True),
    ]
    return this_quarter + previous_quarter + outside


def write_ledger(path: Path, calls: list[Call]) -> SqliteLedgerStore:
    """A ledger holding the calls, chained; the seal is a dummy (the store does not verify)."""
    records = [
        LedgerRecord(
            start_ns=c.at,
            end_ns=c.at + c.ms * MS,
            trace_id="",
            request_id=f"req-{seq}",
            consumer=c.consumer,
            provider=c.provider,
            service=c.service,
            method=c.method,
            kind="unary",
            status_code=c.status,
            request_bytes=10,
            request_messages=1,
            response_bytes=10,
            response_messages=1,
            endpoint=c.endpoint,
            broker_instance="test",
            consumer_serial="" if c.verified else "1f",
            consumer_verified=c.verified,
        )
        for seq, c in enumerate(calls, start=1)
    ]
    store = SqliteLedgerStore(path)
    store.append_sealed(
        records, lambda seq, count, head: Seal(seq, count, head, 0, "test", "00"), b""
    )
    return store


def write_fixture(directory: Path) -> tuple[BrokerConfig, SqliteLedgerStore]:
    (directory / "contracts").mkdir(parents=True)
    write_echo_contracts(directory / "contracts" / "echo.pb")
    write_tax_contracts(directory / "contracts" / "tax.pb")
    (directory / "broker.toml").write_text(CONFIG, encoding="utf-8")
    return load(directory / "broker.toml"), write_ledger(directory / "ledger.db", _calls())


def fixture_report(directory: Path) -> QuarterlyReport:
    """The 1405-Q3 report over the hand-built configuration and ledger."""
    cfg, store = write_fixture(directory)
    try:
        return build_quarterly(cfg, store, Q3)
    finally:
        store.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> QuarterlyReport:
    return fixture_report(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def written(report: QuarterlyReport, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_quarterly(report, tmp_path_factory.mktemp("out"))


# --- Quarters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "year", "quarter"),
    [
        ("1405-Q3", 1405, 3),
        ("1405-Q1", 1405, 1),
        ("1404-Q4", 1404, 4),
        (" 1405-q2 ", 1405, 2),
        ("1-Q1", 1, 1),
        ("9377-Q3", 9377, 3),
    ],
)
def test_a_quarter_is_written_as_year_dash_q_and_its_number(
    text: str, year: int, quarter: int
) -> None:
    assert Quarter.parse(text) == Quarter(year, quarter)
    assert str(Quarter.parse(text)) == f"{year}-Q{quarter}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1405-Q5", "there is no Q5; a year has Q1-Q4"),
        ("1405-Q0", "there is no Q0"),
        ("1405Q3", "is not a quarter; write the Solar Hijri year, a dash and Q1-Q4"),
        ("1405-3", "is not a quarter"),
        ("Q3-1405", "is not a quarter"),
        ("1405-Q3-extra", "is not a quarter"),
        ("", "is not a quarter"),
        ("-1405-Q1", "is not a quarter"),
        ("\N{EXTENDED ARABIC-INDIC DIGIT ONE}405-Q3", "is not a quarter"),
        ("0-Q1", "0-Q1: outside the calendar's range (1-Q1 to 9377-Q3"),
        ("10000-Q1", "10000-Q1: outside the calendar's range"),
        ("9377-Q4", "9377-Q4: outside the calendar's range"),  # would end in 9378, past jdatetime
    ],
)
def test_anything_else_is_refused_with_a_message_that_says_why(text: str, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        Quarter.parse(text)
    assert message in str(excinfo.value)


def test_a_quarter_cannot_be_built_with_a_fifth_quarter() -> None:
    with pytest.raises(ValueError, match="quarter 5 does not exist"):
        Quarter(1405, 5)


def test_q1_starts_at_midnight_tehran_on_the_first_of_farvardin() -> None:
    q1 = Quarter(1405, 1)
    first_of_farvardin = jdatetime.date(1405, 1, 1).togregorian()

    assert first_of_farvardin == dt.date(2026, 3, 21)
    assert q1.first_day == first_of_farvardin
    assert q1.start == dt.datetime(2026, 3, 21, tzinfo=TEHRAN)
    assert q1.start.utcoffset() == dt.timedelta(hours=3, minutes=30)
    # 00:00 +03:30 is 20:30 UTC the day before.
    assert q1.start_ns == int(dt.datetime(2026, 3, 20, 20, 30, tzinfo=dt.UTC).timestamp()) * 10**9


def test_quarters_run_from_the_first_of_their_first_month_to_the_first_of_the_next() -> None:
    firsts = {1: (1, 1), 2: (4, 1), 3: (7, 1), 4: (10, 1)}
    for number, (month, day) in firsts.items():
        quarter = Quarter(1405, number)
        assert quarter.first_day == jdatetime.date(1405, month, day).togregorian()
    assert Quarter(1405, 3).end == dt.datetime(2026, 12, 22, tzinfo=TEHRAN)  # 1405/10/01
    assert Quarter(1405, 3).last_day == dt.date(2026, 12, 21)  # 1405/09/30


def test_q4_ends_where_the_next_years_q1_starts() -> None:
    assert Quarter(1405, 4).next() == Quarter(1406, 1)
    assert Quarter(1405, 4).end == Quarter(1406, 1).start
    assert Quarter(1405, 4).end_ns == Quarter(1406, 1).start_ns
    assert Quarter(1405, 4).end == dt.datetime(2027, 3, 21, tzinfo=TEHRAN)


def test_the_last_day_of_q4_is_the_30th_of_esfand_in_a_leap_year_and_the_29th_otherwise() -> None:
    assert jdatetime.date(1403, 1, 1).isleap()
    assert Quarter(1403, 4).last_day == jdatetime.date(1403, 12, 30).togregorian()
    assert Quarter(1404, 4).last_day == jdatetime.date(1404, 12, 29).togregorian()


def test_consecutive_quarters_leave_no_gap_and_no_overlap() -> None:
    quarter = Quarter(1403, 1)
    for _ in range(12):
        following = quarter.next()
        assert quarter.end_ns == following.start_ns
        assert quarter.start_ns < quarter.end_ns
        quarter = following


@pytest.mark.parametrize(
    ("quarter", "previous"),
    [
        (Quarter(1406, 1), Quarter(1405, 4)),
        (Quarter(1405, 3), Quarter(1405, 2)),
        (Quarter(1405, 2), Quarter(1405, 1)),
        (Quarter(2, 1), Quarter(1, 4)),
    ],
)
def test_previous_steps_back_one_quarter_across_years(quarter: Quarter, previous: Quarter) -> None:
    assert quarter.previous() == previous
    assert previous.end_ns == quarter.start_ns


def test_the_first_quarter_of_the_calendar_has_no_previous_one() -> None:
    with pytest.raises(ValueError, match="outside the calendar's range"):
        Quarter(1, 1).previous()


def test_containing_puts_a_moment_in_the_quarter_of_its_tehran_date() -> None:
    start = Q3.start  # 1405/07/01 00:00 Tehran = 2026-09-22 20:30 UTC
    assert Quarter.containing(start) == Q3
    assert Quarter.containing(start - dt.timedelta(microseconds=1)) == Q2
    assert Quarter.containing(dt.datetime(2026, 9, 22, 20, 30, tzinfo=dt.UTC)) == Q3
    assert Quarter.containing(dt.datetime(2026, 9, 22, 20, 29, 59, tzinfo=dt.UTC)) == Q2
    assert Quarter.containing(Q3.end - dt.timedelta(microseconds=1)) == Q3
    assert Quarter.containing(Q3.end) == Quarter(1405, 4)
    assert Quarter.containing(dt.datetime(2027, 3, 21, 0, 0, tzinfo=TEHRAN)) == Quarter(1406, 1)


def test_containing_refuses_a_moment_without_a_time_zone() -> None:
    with pytest.raises(ValueError, match="has no time zone"):
        Quarter.containing(dt.datetime(2026, 9, 23))


def test_a_quarter_shows_its_days_in_both_calendars() -> None:
    assert Q3.months == "Mehr\N{EN DASH}Azar 1405"
    assert (Q3.first_day_solar, Q3.last_day_solar) == ("1405/07/01", "1405/09/30")
    assert (Q3.first_day, Q3.last_day) == (dt.date(2026, 9, 23), dt.date(2026, 12, 21))
    assert Q3.period == "1405/07/01 (2026-09-23) \N{EN DASH} 1405/09/30 (2026-12-21)"


# --- Pure parts of the arithmetic ------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        ([], 50, None),
        ([7], 50, 7),
        ([7], 95, 7),
        ([1, 2, 3, 4], 50, 2),  # ceil(0.50 * 4) = 2nd
        ([1, 2, 3, 4, 5], 50, 3),  # ceil(2.5) = 3rd
        ([1, 2, 3, 4, 5], 95, 5),  # ceil(4.75) = 5th
        (list(range(1, 21)), 95, 19),  # ceil(19.0) = 19th: exact ranks are not rounded up
        (list(range(1, 101)), 95, 95),
        (list(range(1, 101)), 100, 100),
    ],
)
def test_percentiles_are_nearest_rank(values: list[int], p: int, expected: int | None) -> None:
    # Durations below 128 ns have a histogram bin each: these percentiles are exact.
    assert percentile(Counter(map(bin_of, values)), p) == expected


@pytest.mark.parametrize(
    ("value", "places", "shown"),
    [
        (Decimal("0.125"), 1, "12.5%"),
        (Decimal("0.9996"), 1, "99.9%"),  # never rounded up to the target
        (Decimal("0.11999"), 1, "11.9%"),
        (Decimal(2) / Decimal(3), 1, "66.6%"),
        (Decimal(1), 1, "100.0%"),
        (Decimal(1), 0, "100%"),
        (Decimal("0.12"), 0, "12%"),
        (None, 1, "\N{EN DASH}"),
    ],
)
def test_percentages_are_truncated_never_rounded_up(
    value: Decimal | None, places: int, shown: str
) -> None:
    assert percent(value, places) == shown


def test_equal_standings_share_a_rank_and_the_next_rank_is_skipped(
    report: QuarterlyReport,
) -> None:
    nocr = report.figures("nocr")
    same = [
        replace(nocr, id="b", e_service_share=Decimal("0.5"), visit_reduction=Decimal("0.2")),
        replace(nocr, id="a", e_service_share=Decimal("0.5"), visit_reduction=Decimal("0.2")),
        replace(nocr, id="c", e_service_share=Decimal("0.5"), visit_reduction=Decimal("0.1")),
        replace(nocr, id="d", e_service_share=Decimal("0.9"), visit_reduction=None),
        replace(nocr, id="e", e_service_share=Decimal("0.6"), visit_reduction=Decimal("0.01")),
    ]

    ranked = [(i.agency, i.rank) for i in rank(same)]

    # Share first, then reduction; d has the best share but misses a figure, so comes last.
    assert ranked == [("e", 1), ("a", 2), ("b", 2), ("c", 4), ("d", 5)]


def test_zero_government_services_leaves_the_share_unknown_and_says_so(
    report: QuarterlyReport,
) -> None:
    cra: AgencyFigures = replace(report.figures("cra"), government_services=0, e_service_share=None)
    (indicator,) = rank([cra])
    assert indicator.behind
    assert indicator.reasons[0] == (
        "e-service share unknown: its number of government services is 0"
    )


# --- The hand-computed fixture: figures ------------------------------------------------------


def test_national_totals(report: QuarterlyReport) -> None:
    n = report.national
    assert n.agencies_connected == 4  # nocr, tax, post, cra
    assert n.agencies_active == 3  # cra called only in 1405-Q2 and Q1
    assert n.services_offered == 2  # Echo, Tax
    assert n.methods_offered == 6  # Echo: Unary, ServerStream, ClientStream, Bidi; Tax: 2
    assert n.transactions == 19  # nocr 10 + tax 8 + the unknown service 1
    assert n.successful == 10  # nocr a, b, c, d, f, j + tax 1, 2, 3, 5
    assert n.success_rate == Decimal(10) / Decimal(19)
    assert n.transactions_previous == 5  # 1405-Q2: 3 to nocr, 2 to tax
    assert n.growth == Decimal("2.8")  # (19 - 5) / 5


def test_an_agency_that_provides_echo(report: QuarterlyReport) -> None:
    nocr = report.figures("nocr")
    assert [(s.name, s.methods) for s in nocr.services] == [
        (ECHO, ("Unary", "ServerStream", "ClientStream", "Bidi"))
    ]
    assert nocr.services_offered == 1
    assert nocr.methods_offered == 4
    assert nocr.transactions_served == 8  # a-j but h and i, which the broker refused
    assert nocr.successful_served == 6  # a, b, c, d, f, j
    assert nocr.transactions_consumed == 0
    assert nocr.success_rate == Decimal("0.75")  # 6 / 8
    # Windows with calls that reached it: w0, w1, w2, w3 and the last; w3 had only g (14).
    assert (nocr.windows_with_calls, nocr.windows_answered) == (5, 4)
    assert nocr.availability == Decimal("0.8")  # 4 / 5
    # Answered: a-f and j = [10, 20, 30, 40, 50, 60, 70] ms.
    assert nocr.answered_calls == 7
    # Percentiles are the midpoints of the histogram bins holding the ranks (within 0.78%).
    assert nocr.latency_p50_ns == binned(40 * MS)  # ceil(0.50 * 7) = 4th
    assert nocr.latency_p95_ns == binned(70 * MS)  # ceil(0.95 * 7) = ceil(6.65) = 7th
    assert nocr.distinct_consumers == 2  # post, tax; the unidentified caller is nobody
    assert nocr.government_services == 1
    assert nocr.e_service_share == Decimal(1)  # 1 / 1
    assert nocr.visits_avoided == Decimal(3)  # 6 successful x 0.5
    assert nocr.visit_reduction == Decimal("0.125")  # 3 / 24


def test_an_agency_that_provides_tax(report: QuarterlyReport) -> None:
    tax = report.figures("tax")
    assert [(s.name, s.methods) for s in tax.services] == [(TAX, ("Assess", "Pay"))]
    assert tax.transactions_served == 8
    assert tax.successful_served == 4  # 1, 2, 3, 5
    assert tax.transactions_consumed == 2  # f and j, to nocr
    assert tax.success_rate == Decimal("0.5")  # 4 / 8
    # Windows 24, 36, 48, 60, 72, 78 have calls; 60 and 72 only UNAVAILABLE ones.
    assert (tax.windows_with_calls, tax.windows_answered) == (6, 4)
    assert tax.availability == Decimal(4) / Decimal(6)
    # Answered: 1, 2, 3, 5, 8 = sorted [80, 100, 120, 200, 300] ms.
    assert tax.answered_calls == 5
    assert tax.latency_p50_ns == binned(120 * MS)  # ceil(2.5) = 3rd
    assert tax.latency_p95_ns == binned(300 * MS)  # ceil(4.75) = 5th
    assert tax.distinct_consumers == 1  # post
    assert tax.e_service_share == Decimal("0.25")  # 1 / 4
    assert tax.visits_avoided == Decimal(12)  # 4 successful x 3.0
    assert tax.visit_reduction == Decimal("0.12")  # 12 / 100: exactly the target


def test_an_agency_that_only_consumes_and_reports_no_registry_figures(
    report: QuarterlyReport,
) -> None:
    post = report.figures("post")
    assert post.name == POST_NAME
    assert post.services == ()
    assert post.transactions_served == 0
    assert post.transactions_consumed == 16  # nocr a-e, g, h (7) + tax 1-8 (8) + unknown (1)
    assert post.success_rate is None
    assert post.availability is None
    assert (post.latency_p50_ns, post.latency_p95_ns) == (None, None)
    assert post.distinct_consumers == 0
    assert post.e_service_share is None  # government_services not reported
    assert post.visits_avoided == Decimal(0)  # 0 x 0 (the default)
    assert post.visit_reduction is None  # no baseline


def test_an_agency_idle_this_quarter(report: QuarterlyReport) -> None:
    cra = report.figures("cra")
    assert (cra.transactions_served, cra.transactions_consumed) == (0, 0)
    assert cra.availability is None
    assert cra.e_service_share == Decimal(0)  # 0 / 3
    assert cra.visits_avoided == Decimal(0)  # 0 x 2.0
    assert cra.visit_reduction == Decimal(0)  # 0 / 50


def test_agencies_are_ranked_complete_data_first_then_by_share_then_reduction(
    report: QuarterlyReport,
) -> None:
    # nocr (100%, 12.5%), tax (25%, 12%), cra (0%, 0%), then post (missing both).
    assert [(i.agency, i.rank) for i in report.indicators] == [
        ("nocr", 1),
        ("tax", 2),
        ("cra", 3),
        ("post", 4),
    ]
    assert [a.id for a in report.agencies] == ["nocr", "tax", "cra", "post"]


def test_agencies_below_a_target_or_missing_data_are_behind_with_reasons(
    report: QuarterlyReport,
) -> None:
    reasons = {i.agency: (i.behind, i.reasons) for i in report.indicators}
    assert reasons == {
        "nocr": (False, ()),
        "tax": (
            True,
            ("e-service share 25.0% is below the 100% target (1 of 4 services on the exchange)",),
        ),
        "cra": (
            True,
            (
                "e-service share 0.0% is below the 100% target (0 of 3 services on the exchange)",
                "visit reduction 0.0% is below the 12% target",
            ),
        ),
        "post": (
            True,
            (
                "e-service share unknown: its number of government services is not reported",
                "visit reduction unknown: its in-person visit baseline is not reported",
            ),
        ),
    }


def flooded_fixture(directory: Path) -> tuple[BrokerConfig, SqliteLedgerStore]:
    """The fixture's ledger, plus what an attacker adds: 2000 refusals of a revoked
    certificate claiming to be post, in this quarter and 300 in the previous one."""
    (directory / "contracts").mkdir(parents=True)
    write_echo_contracts(directory / "contracts" / "echo.pb")
    write_tax_contracts(directory / "contracts" / "tax.pb")
    (directory / "broker.toml").write_text(CONFIG, encoding="utf-8")
    flood = [
        Call(T0 + 8 * HOUR + i, "post", "nocr", ECHO, "Unary", 16, 1, "", verified=False)
        for i in range(2000)
    ] + [
        Call(P0 + HOUR + i, "post", "nocr", ECHO, "Unary", 16, 1, "", verified=False)
        for i in range(300)
    ]
    return load(directory / "broker.toml"), write_ledger(directory / "ledger.db", _calls() + flood)


def test_refusals_of_unidentified_certificates_skew_no_figure_and_are_counted_apart(
    tmp_path: Path, report: QuarterlyReport
) -> None:
    cfg, store = flooded_fixture(tmp_path)
    try:
        flooded = build_quarterly(cfg, store, Q3)
    finally:
        store.close()
    # Every national figure and every agency's figures are those of the clean ledger.
    assert replace(flooded.national, refused_before_identification=0) == report.national
    assert flooded.agencies == report.agencies
    assert flooded.indicators == report.indicators
    assert flooded.figures("post").transactions_consumed == 16  # not 2016
    assert flooded.national.success_rate == Decimal(10) / Decimal(19)
    # ...and the flood is one separate count, in every rendering.
    assert flooded.national.refused_before_identification == 2000
    assert report.national.refused_before_identification == 0
    assert report_json(flooded)["national"]["refused_before_identification"] == 2000
    html = render_html(flooded)
    assert "Calls refused before identification" in html and "2,000" in html
    assert "refused_before_identification" in report_json(flooded)["definitions"]


def test_the_dashboard_counts_unidentified_refusals_apart_from_every_agency(
    tmp_path: Path,
) -> None:
    from tabadol.ops.dashboard import Accounts, dashboard

    now = dt.datetime.fromtimestamp((T0 + 9 * HOUR) / 1e9, dt.UTC)
    shown = {}
    for name, build in (("clean", write_fixture), ("flooded", flooded_fixture)):
        cfg, store = build(tmp_path / name)
        try:
            shown[name] = {
                agency: dashboard(Accounts(cfg, store), now, agency=agency)
                for agency in (None, "post", "nocr")
            }
        finally:
            store.close()
    assert shown["flooded"][None]["refusedBeforeIdentification"] == {
        "today": 2000, "quarter": 2000, "allTime": 2300,
    }  # fmt: skip
    assert shown["flooded"]["post"]["refusedBeforeIdentification"]["quarter"] == 2000
    assert shown["clean"][None]["refusedBeforeIdentification"]["allTime"] == 0
    # Transactions, error rate, top agencies and latency: as if the flood had not happened.
    for agency in (None, "post", "nocr"):
        clean, flooded = shown["clean"][agency], shown["flooded"][agency]
        for figures in (clean, flooded):
            del figures["refusedBeforeIdentification"]
        assert flooded == clean, agency


def undeclared_fixture(directory: Path) -> tuple[BrokerConfig, SqliteLedgerStore]:
    """The fixture's ledger, plus what an insider adds with a certificate the CA signed for
    an agency the configuration does not declare: 361 refused calls this quarter (its
    certificate identified it, so the ledger says verified) and 40 in the previous one."""
    (directory / "contracts").mkdir(parents=True)
    write_echo_contracts(directory / "contracts" / "echo.pb")
    write_tax_contracts(directory / "contracts" / "tax.pb")
    (directory / "broker.toml").write_text(CONFIG, encoding="utf-8")
    insider = [
        Call(T0 + 8 * HOUR + i, "insider-sim", "nocr", ECHO, "Unary", 7, 1, "") for i in range(361)
    ] + [Call(P0 + HOUR + i, "INSIDER-SIM", "nocr", ECHO, "Unary", 7, 1, "") for i in range(40)]
    return load(directory / "broker.toml"), write_ledger(
        directory / "ledger.db", _calls() + insider
    )


def test_refused_calls_of_an_undeclared_agency_skew_no_figure_and_are_counted_apart(
    tmp_path: Path, report: QuarterlyReport
) -> None:
    # Second review of issue 10: 361 refused calls of an agency the registry does not declare
    # became 361 of 677 transactions, and the national success rate fell from ~74% to 34.6%.
    cfg, store = undeclared_fixture(tmp_path)
    try:
        skewed = build_quarterly(cfg, store, Q3)
    finally:
        store.close()
    assert replace(skewed.national, from_undeclared_agencies=0) == report.national
    assert skewed.agencies == report.agencies
    assert skewed.indicators == report.indicators
    assert skewed.national.transactions == 19  # not 380
    assert skewed.national.success_rate == Decimal(10) / Decimal(19)
    assert skewed.national.growth == report.national.growth  # the previous quarter's 40 too
    assert skewed.national.agencies_active == 3
    # ...and the insider's calls are one separate count, in every rendering.
    assert skewed.national.from_undeclared_agencies == 361
    assert skewed.national.refused_before_identification == 0
    assert report.national.from_undeclared_agencies == 0
    data = report_json(skewed)
    assert data["national"]["from_undeclared_agencies"] == 361
    assert "from_undeclared_agencies" in data["definitions"]
    html = render_html(skewed)
    assert "Calls from agencies not in the registry" in html and "361" in html
    assert "insider" not in render_csv(skewed).lower()


def test_the_dashboard_counts_an_undeclared_agencys_calls_apart_from_every_figure(
    tmp_path: Path,
) -> None:
    from tabadol.ops.dashboard import Accounts, dashboard

    now = dt.datetime.fromtimestamp((T0 + 9 * HOUR) / 1e9, dt.UTC)
    shown = {}
    for name, build in (("clean", write_fixture), ("insider", undeclared_fixture)):
        cfg, store = build(tmp_path / name)
        try:
            shown[name] = {
                agency: dashboard(Accounts(cfg, store), now, agency=agency)
                for agency in (None, "nocr", "insider-sim")
            }
        finally:
            store.close()
    assert shown["insider"][None]["fromUndeclaredAgencies"] == {
        "today": 361, "quarter": 361, "allTime": 401,
    }  # fmt: skip
    assert shown["insider"]["nocr"]["fromUndeclaredAgencies"]["quarter"] == 361
    assert shown["clean"][None]["fromUndeclaredAgencies"]["allTime"] == 0
    assert shown["insider"][None]["refusedBeforeIdentification"]["allTime"] == 0
    # Transactions, error rate, top consumers and latency: as if the insider had not called.
    assert "insider-sim" not in {r["agency"] for r in shown["insider"][None]["topConsumers"]}
    assert shown["insider"]["insider-sim"]["transactions"] == {
        "today": 0, "quarter": 0, "allTime": 0,
    }  # fmt: skip
    for agency in (None, "nocr"):
        clean, skewed = shown["clean"][agency], shown["insider"][agency]
        for figures in (clean, skewed):
            del figures["fromUndeclaredAgencies"]
        assert skewed == clean, agency


def test_a_quarter_with_no_earlier_transactions_has_no_growth(tmp_path: Path) -> None:
    cfg, store = write_fixture(tmp_path)
    try:
        report = build_quarterly(cfg, store, Q2)  # 1405-Q1 holds 2 calls
        earliest = build_quarterly(cfg, store, Quarter(1404, 4))
    finally:
        store.close()
    assert report.national.transactions == 5
    assert report.national.growth == Decimal("1.5")  # (5 - 2) / 2
    assert earliest.national.transactions == 0
    assert earliest.national.growth is None
    assert earliest.national.success_rate is None


# --- The files -------------------------------------------------------------------------------


def test_five_files_are_written_named_after_the_quarter(written: list[Path]) -> None:
    assert [p.name for p in written] == [
        "quarterly-1405-Q3.html",
        "quarterly-1405-Q3.csv",
        "quarterly-1405-Q3.json",
        "quarterly-1405-Q3-purposes.csv",
        "quarterly-1405-Q3-protocols.csv",
    ]
    assert all(p.stat().st_size > 0 for p in written)


def test_the_csv_has_a_header_and_one_row_per_agency_in_rank_order(written: list[Path]) -> None:
    rows = list(csv.DictReader(io.StringIO(written[1].read_text(encoding="utf-8"))))
    by_id = {r["agency_id"]: r for r in rows}

    assert [r["agency_id"] for r in rows] == ["nocr", "tax", "cra", "post"]
    assert by_id["nocr"] == {
        "rank": "1",
        "agency_id": "nocr",
        "agency_name": "National Organization for Civil Registration",
        "services_offered": "1",
        "services": ECHO,
        "methods_offered": "4",
        "transactions_served": "8",
        "successful_served": "6",
        "transactions_consumed": "0",
        "success_rate": "0.75",
        "windows_with_calls": "5",
        "windows_answered": "4",
        "availability": "0.8",
        "answered_calls": "7",
        "latency_p50_ns": str(binned(40 * MS)),
        "latency_p95_ns": str(binned(70 * MS)),
        "distinct_consumers": "2",
        "government_services": "1",
        "e_service_share": "1",
        "visits_per_exchange": "0.5",
        "visits_avoided": "3",
        "in_person_visits_per_quarter": "24",
        "visit_reduction": "0.125",
        "behind_target": "no",
        "reasons": "",
    }
    assert by_id["tax"]["availability"] == str(4 / 6)
    assert by_id["tax"]["visit_reduction"] == "0.12"
    assert by_id["tax"]["latency_p95_ns"] == str(binned(300 * MS))
    assert by_id["tax"]["behind_target"] == "yes"
    assert by_id["post"]["agency_name"] == POST_NAME  # CSV quoting keeps it intact
    # Figures that cannot be computed are empty cells, not zeros.
    for column in ("success_rate", "availability", "latency_p50_ns", "e_service_share"):
        assert by_id["post"][column] == ""
    assert by_id["post"]["reasons"] == (
        "e-service share unknown: its number of government services is not reported; "
        "visit reduction unknown: its in-person visit baseline is not reported"
    )
    assert by_id["cra"]["visit_reduction"] == "0"


def test_the_json_holds_the_quarter_every_figure_and_the_definitions(written: list[Path]) -> None:
    data = json.loads(written[2].read_text(encoding="utf-8"))

    assert data["quarter"] == {
        "id": "1405-Q3",
        "year": 1405,
        "quarter": 3,
        "months": "Mehr\N{EN DASH}Azar 1405",
        "first_day": "1405/07/01",
        "last_day": "1405/09/30",
        "first_day_gregorian": "2026-09-23",
        "last_day_gregorian": "2026-12-21",
        "timezone": "Asia/Tehran",
        "start": "2026-09-23T00:00:00+03:30",
        "end": "2026-12-22T00:00:00+03:30",
        "start_ns": T0,
        "end_ns": END,
        "previous": "1405-Q2",
    }
    assert data["targets"] == {"e_service_share": 1, "visit_reduction": 0.12}
    assert data["national"] == {
        "agencies_connected": 4,
        "agencies_active": 3,
        "services_offered": 2,
        "methods_offered": 6,
        "transactions": 19,
        "successful": 10,
        "success_rate": pytest.approx(10 / 19),
        "transactions_previous": 5,
        "growth": 2.8,
        "refused_before_identification": 0,
        "from_undeclared_agencies": 0,
    }
    agencies = {a["id"]: a for a in data["agencies"]}
    assert agencies["tax"] == {
        "id": "tax",
        "name": "National Tax Administration",
        "services": [{"name": TAX, "methods": ["Assess", "Pay"]}],
        "services_offered": 1,
        "methods_offered": 2,
        "transactions_served": 8,
        "successful_served": 4,
        "transactions_consumed": 2,
        "success_rate": 0.5,
        "windows_with_calls": 6,
        "windows_answered": 4,
        "availability": pytest.approx(4 / 6),
        "answered_calls": 5,
        "latency_p50_ns": binned(120 * MS),
        "latency_p95_ns": binned(300 * MS),
        "distinct_consumers": 1,
        "government_services": 4,
        "e_service_share": 0.25,
        "visits_per_exchange": 3,
        "visits_avoided": 12,
        "in_person_visits_per_quarter": 100,
        "visit_reduction": 0.12,
        "calls_by_purpose": [],  # no call of this ledger names a grant
    }
    assert agencies["post"]["name"] == POST_NAME
    assert agencies["post"]["e_service_share"] is None
    assert agencies["nocr"]["latency_p50_ns"] == binned(40 * MS)
    assert [(i["agency"], i["rank"], i["behind_target"]) for i in data["indicators"]] == [
        ("nocr", 1, False),
        ("tax", 2, True),
        ("cra", 3, True),
        ("post", 4, True),
    ]
    assert data["indicators"][1]["reasons"] == [
        "e-service share 25.0% is below the 100% target (1 of 4 services on the exchange)"
    ]
    assert {"availability", "latency", "rank", "behind_target"} <= data["definitions"].keys()


def test_the_html_escapes_agency_names_and_shows_both_calendars(report: QuarterlyReport) -> None:
    html = render_html(report)

    assert "Post &lt;&amp;&gt; &quot;Parcels&quot;" in html
    assert POST_NAME not in html
    assert "<&>" not in html
    assert "1405/07/01 (2026-09-23)" in html
    assert "1405/09/30 (2026-12-21)" in html
    assert "Mehr\N{EN DASH}Azar 1405" in html


def test_the_html_is_self_contained(written: list[Path], report: QuarterlyReport) -> None:
    html = written[0].read_text(encoding="utf-8")

    assert html == render_html(report)
    for outside in ("<script", "src=", "href=", "url(", "@import", "<link"):
        assert outside not in html
    assert html.count("<svg") == 4


def test_the_html_explains_how_the_figures_are_computed(report: QuarterlyReport) -> None:
    html = render_html(report)

    assert "How these figures are computed" in html
    assert "Nearest-rank percentiles" in html
    assert "five-minute windows" in html


def test_render_csv_matches_the_written_file(written: list[Path], report: QuarterlyReport) -> None:
    assert written[1].read_bytes() == render_csv(report).encode()


def test_a_name_a_spreadsheet_would_run_as_a_formula_is_defused_in_the_csv() -> None:
    from tabadol.reports.render import _spreadsheet_safe

    assert _spreadsheet_safe('=HYPERLINK("x")') == '\'=HYPERLINK("x")'
    assert _spreadsheet_safe("-1+2") == "'-1+2"
    assert _spreadsheet_safe("National Post") == "National Post"
