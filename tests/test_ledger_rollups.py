"""Rollups: the ledger's sums kept as records are written, read by the reports instead of the
records, checked by verify and rebuilt from the records on demand."""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import pytest

from tabadol.cli import main
from tabadol.ledger import rollup
from tabadol.ledger.record import GENESIS, LedgerRecord
from tabadol.ledger.seal import Sealer
from tabadol.ledger.store import LedgerStore, LedgerWriteError, MemoryLedgerStore, SqliteLedgerStore
from tabadol.ledger.store.base import UNAVAILABLE, CallGroup
from tabadol.pki import CertificateAuthority
from tests.conftest import broker_toml
from tests.test_ledger import record, tamper
from tests.test_ledger_store_contract import OpenStore, open_store, seal_with, sealer

__all__ = ["open_store", "sealer"]  # fixtures, used by name

MS = 1_000_000
MINUTE = 60 * 1_000_000_000
HOUR = 60 * MINUTE
TEHRAN = rollup.DAY_ZONE


def ns(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, zone: dt.tzinfo = dt.UTC
) -> int:
    return rollup.to_ns(dt.datetime(year, month, day, hour, minute, tzinfo=zone))


def binned(duration_ns: int) -> int:
    return rollup.bin_value(rollup.bin_of(duration_ns))


def exact_percentile(values: list[int], p: int) -> int:
    ordered = sorted(values)
    return ordered[max(1, (len(ordered) * p + 99) // 100) - 1]


# --- the pure module ----------------------------------------------------------------------


def test_bins_are_contiguous_and_each_duration_falls_in_its_own() -> None:
    previous_high = -1
    for index in range(40 * 64):
        low, high = rollup.bin_bounds(index)
        assert low == previous_high + 1, index
        assert rollup.bin_of(low) == rollup.bin_of(high) == index
        assert low <= rollup.bin_value(index) <= high
        previous_high = high
    assert rollup.bin_of(-5) == 0  # a clock stepped back: counts as no time


def test_a_bins_midpoint_is_within_the_stated_bound_and_exact_below_64_ns() -> None:
    rng = random.Random(12)
    for value in range(64):
        assert binned(value) == value
    samples = [rng.randrange(64, 2**62) for _ in range(20_000)] + [2**k for k in range(6, 62)]
    samples += [2**k - 1 for k in range(7, 62)]
    for value in samples:
        assert abs(binned(value) - value) <= rollup.RELATIVE_ERROR * value, value


def test_percentiles_from_a_histogram_are_the_nearest_rank_within_the_bound() -> None:
    rng = random.Random(7)
    for size in (1, 2, 3, 10, 99, 1000):
        values = [int(rng.lognormvariate(17, 2)) for _ in range(size)]
        histogram = Counter(map(rollup.bin_of, values))
        found = rollup.percentiles(histogram, (1, 50, 90, 95, 99, 100))
        for p, value in found.items():
            exact = exact_percentile(values, p)
            assert value == binned(exact)  # the midpoint of the exact value's own bin
            assert abs(value - exact) <= rollup.RELATIVE_ERROR * exact
    assert rollup.percentiles({}, (50,)) == {}


def test_histograms_encode_add_and_subtract_back() -> None:
    histogram = {0: 2, 700: 1, 1200: 5}
    assert rollup.decode_histogram(rollup.encode_histogram(histogram)) == histogram
    both = dict(histogram)
    rollup.add_histogram(both, {700: 3, 9: 1})
    assert both == {0: 2, 9: 1, 700: 4, 1200: 5}
    rollup.add_histogram(both, {700: 3, 9: 1}, -1)
    assert both == histogram


def test_a_rollup_adds_up_and_a_batch_taken_away_leaves_the_rest() -> None:
    first, second = traffic(seed=1), traffic(seed=2)
    total = rollup.rollup(first)
    total.add(rollup.rollup(second))
    assert total == rollup.rollup([*first, *second])
    total.add(rollup.rollup(second), -1)
    assert total == rollup.rollup(first)
    assert list(total.differences(rollup.rollup(first))) == []
    changed = rollup.rollup(first[1:])
    assert next(total.differences(changed)).startswith("call group ")


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        # Tehran at +04:30 (daylight time, until 2022): midnight is 19:30 UTC.
        (ns(2021, 6, 21, 12), ns(2021, 6, 24), (ns(2021, 6, 21, 19, 30), ns(2021, 6, 23, 19, 30))),
        # At +03:30 since 2022: 20:30 UTC.
        (ns(2024, 1, 1), ns(2024, 1, 3), (ns(2024, 1, 1, 20, 30), ns(2024, 1, 2, 20, 30))),
        # Exactly on midnights: every day is whole, nothing left at the edges.
        (ns(2021, 6, 21, 19, 30), ns(2021, 6, 23, 19, 30), (ns(2021, 6, 21, 19, 30), ns(2021, 6, 23, 19, 30))),
        # The night Tehran left daylight time (2021-09-21 has 25 hours): both offsets.
        (ns(2021, 9, 20, 19, 30), ns(2021, 9, 23, 20, 30), (ns(2021, 9, 20, 19, 30), ns(2021, 9, 23, 20, 30))),
        (ns(2021, 9, 21, 19, 30), ns(2021, 9, 22, 20, 30), (ns(2021, 9, 21, 20, 30), ns(2021, 9, 22, 20, 30))),
        # Less than a day, or an empty range: no whole day, the records answer.
        (ns(2024, 1, 1, 21), ns(2024, 1, 2, 20), (ns(2024, 1, 1, 21), ns(2024, 1, 1, 21))),
        (ns(2024, 1, 2), ns(2024, 1, 1), (ns(2024, 1, 2), ns(2024, 1, 2))),
    ],
)  # fmt: skip
def test_whole_days_of_a_range_are_tehran_days(
    start: int, end: int, expected: tuple[int, int]
) -> None:
    assert rollup.whole_days(start, end) == expected
    a, b = expected
    if a < b:
        assert rollup.day_of(a)[0] == a and rollup.day_of(b)[0] == b


def test_whole_days_of_all_time_span_1971_to_2262() -> None:
    a, b = rollup.whole_days(0, 2**63 - 1)
    assert rollup.day_of(a)[0] == a and rollup.day_of(b)[0] == b
    assert dt.datetime.fromtimestamp(a / 1e9, TEHRAN).date() == dt.date(1971, 1, 1)
    assert dt.datetime.fromtimestamp(b / 1e9, TEHRAN).year == 2262


def test_tehran_midnights_start_availability_windows() -> None:
    for day in (
        dt.date(1979, 3, 1),
        dt.date(2021, 6, 22),
        dt.date(2021, 9, 22),
        dt.date(2025, 5, 5),
    ):
        midnight = rollup.to_ns(dt.datetime.combine(day, dt.time(), tzinfo=TEHRAN))
        assert rollup.day_of(midnight)[0] == midnight
        assert midnight % rollup.WINDOW_NS == 0


# --- fixtures: traffic and the answers computed from the records ----------------------------

# Midnights of Tehran days around the end of daylight time: 2021-09-21 has 25 hours.
DAYS = [ns(2021, 9, day, zone=TEHRAN) for day in (20, 21, 22, 23)]


def traffic(seed: int, n: int = 150) -> list[LedgerRecord]:
    """Calls spread over DAYS (and a day after), every outcome: refused (no endpoint),
    unavailable, unverified, several consumers, services and methods."""
    rng = random.Random(seed)
    calls = []
    for i in range(n):
        start = rng.randrange(DAYS[0] - HOUR, DAYS[-1] + 30 * HOUR)
        duration = int(rng.lognormvariate(16, 1.5)) if i % 17 else rng.randrange(0, 64)
        status = rng.choice((0, 0, 0, 5, UNAVAILABLE))
        calls.append(
            record(
                seed * 10_000 + i,
                start_ns=start,
                end_ns=start + duration,
                consumer=rng.choice(("post", "tax", "")),
                provider=rng.choice(("nocr", "tax")),
                service=rng.choice(("s.S", "t.T")),
                method=rng.choice(("A", "B")),
                status_code=status,
                endpoint="" if rng.random() < 0.15 else "10.0.0.1:443",
                consumer_verified=rng.random() > 0.1,
                request_bytes=rng.randrange(1000),
                response_bytes=rng.randrange(1000),
            )
        )
    calls.append(record(seed * 10_000 + n, start_ns=5 * MS, end_ns=9 * MS))  # 1970
    return calls


def in_range(records: Iterable[LedgerRecord], start: int, end: int) -> list[LedgerRecord]:
    return [r for r in records if start <= r.start_ns < end]


def expected_groups(records: list[LedgerRecord]) -> list[CallGroup]:
    groups: dict[tuple[str, str, str, str, int, bool, bool], list[int]] = defaultdict(
        lambda: [0, 0]
    )
    for r in records:
        key = (r.consumer, r.provider, r.service, r.method, r.status_code, r.endpoint != "", r.consumer_verified)  # fmt: skip
        groups[key][0] += 1
        groups[key][1] += r.end_ns - r.start_ns
    return [
        CallGroup(c, p, s, m, code, fwd, n, total, verified)
        for (c, p, s, m, code, fwd, verified), (n, total) in sorted(groups.items())
    ]


def expected_windows(records: list[LedgerRecord]) -> dict[str, tuple[int, int]]:
    answered: dict[str, dict[int, bool]] = defaultdict(dict)
    for r in records:
        if r.endpoint:
            window = r.start_ns // rollup.WINDOW_NS
            windows = answered[r.provider]
            windows[window] = windows.get(window, False) or r.status_code != UNAVAILABLE
    return {p: (len(w), sum(w.values())) for p, w in answered.items()}


def write(store: LedgerStore, sealer: Sealer, batches: Iterable[list[LedgerRecord]]) -> None:
    for k, batch in enumerate(batches):
        chain = store.chain_for(f"node-{k % 2}")
        store.append_sealed(batch, seal_with(sealer, chain), sealer.cert_pem, chain)


RANGES = {
    "whole days": (DAYS[0], DAYS[-1]),
    "edges on both sides": (DAYS[0] - 3 * HOUR + 7, DAYS[2] + 5 * HOUR + 11),
    "within one day": (DAYS[1] + HOUR, DAYS[1] + 9 * HOUR),
    "all time": (0, 2**63 - 1),
}


@pytest.mark.parametrize("span", sorted(RANGES))
def test_reports_from_rollups_match_reports_from_the_records(
    open_store: OpenStore, sealer: Sealer, span: str
) -> None:
    calls = traffic(seed=3) + traffic(seed=4)
    store = open_store()
    write(store, sealer, [calls[i : i + 40] for i in range(0, len(calls), 40)])
    start, end = RANGES[span]
    chosen = in_range(calls, start, end)
    assert store.count_between(start, end) == len(chosen)
    assert store.call_groups(start, end) == expected_groups(chosen)
    assert store.provider_windows(start, end, rollup.WINDOW_NS) == expected_windows(chosen)
    answered: dict[str, Counter[int]] = defaultdict(Counter)
    for r in chosen:
        if r.endpoint and r.status_code != UNAVAILABLE:
            answered[r.provider][rollup.bin_of(r.end_ns - r.start_ns)] += 1
    assert store.answered_histograms(start, end) == answered
    for consumers in (None, ["tax"]):
        latencies = store.latency_percentiles(start, end, (50, 95, 99), consumers=consumers)
        per_service: dict[str, list[int]] = defaultdict(list)
        for r in chosen:
            if r.consumer_verified and (consumers is None or r.consumer in ("", *consumers)):
                per_service[r.service].append(r.end_ns - r.start_ns)
        assert latencies.keys() == per_service.keys()
        for service, durations in per_service.items():
            calls_found, table = latencies[service]
            assert calls_found == len(durations)
            for p in (50, 95, 99):
                exact = exact_percentile(durations, p)
                assert table[p] == binned(exact)
                assert abs(table[p] - exact) <= rollup.RELATIVE_ERROR * exact


def test_rollup_rows_are_the_rollup_of_each_chains_records(
    open_store: OpenStore, sealer: Sealer
) -> None:
    store = open_store()
    write(store, sealer, [traffic(seed=5)[:70], traffic(seed=6)[:50], traffic(seed=7)[:30]])
    for chain in store.chains():
        expected = rollup.rollup(r.record for r in store.records(chain))
        assert store.rollup_rows(chain) == expected
        assert store.rollup_rows(chain, archived=True) == rollup.Rollup()
        day = (DAYS[1], DAYS[2])
        of_day = rollup.rollup(r.record for r in store.records(chain) if day[0] <= r.record.start_ns < day[1])  # fmt: skip
        assert store.rollup_rows(chain, days=day) == of_day
        assert store.rebuild_rollup(chain) == expected  # nothing to repair
        assert store.rollup_rows(chain) == expected


def test_a_range_not_on_day_boundaries_counts_its_edges(
    open_store: OpenStore, sealer: Sealer
) -> None:
    store = open_store()
    edge, inside, after = DAYS[1] - 1, DAYS[1] + HOUR, DAYS[2] + 1
    write(
        store,
        sealer,
        [[record(i, start_ns=t, end_ns=t + MS) for i, t in enumerate((edge, inside, after))]],
    )
    assert store.count_between(edge, after + 1) == 3  # one day whole, one call on each side
    assert store.count_between(edge + 1, after) == 1
    assert store.count_between(DAYS[1], DAYS[2]) == 1
    assert store.provider_windows(edge, after + 1, rollup.WINDOW_NS) == {"nocr": (3, 3)}


def test_a_batch_that_cannot_be_written_leaves_neither_records_nor_rollups(sealer: Sealer) -> None:
    store = MemoryLedgerStore()
    store.fail = "disk full"
    with pytest.raises(LedgerWriteError, match="disk full"):
        store.append_sealed(traffic(seed=8), seal_with(sealer, ""), sealer.cert_pem)
    store.fail = None
    assert store.head("") == (0, GENESIS)
    assert store.rollup_rows("") == rollup.Rollup() and store.count_between(0, 2**63 - 1) == 0


def test_a_failing_rollup_write_on_sqlite_takes_the_batch_back_with_it(
    tmp_path: Path, sealer: Sealer
) -> None:
    """The rollup is written in the batch's own transaction: when it fails, so does the batch."""
    store = SqliteLedgerStore(tmp_path / "ledger.db")
    write(store, sealer, [traffic(seed=9)[:20]])
    before = store.rollup_rows()
    tamper(
        tmp_path / "ledger.db",
        "CREATE TRIGGER full BEFORE INSERT ON rollup_provider_days BEGIN SELECT RAISE(ABORT, 'disk full'); END",
    )
    head = store.head()
    with pytest.raises(LedgerWriteError, match="disk full"):
        store.append_sealed(traffic(seed=10)[:20], seal_with(sealer, ""), sealer.cert_pem)
    assert store.head() == head and len(list(store.seals())) == 1
    assert store.rollup_rows() == before
    store.close()


def test_a_ledger_written_before_rollups_gets_them_from_its_records_once(
    tmp_path: Path, sealer: Sealer
) -> None:
    path = tmp_path / "ledger.db"
    store = SqliteLedgerStore(path)
    calls = traffic(seed=11)
    write(store, sealer, [calls])
    store.close()
    tamper(path, "DROP TABLE rollup_groups", "DROP TABLE rollup_provider_days")
    old = SqliteLedgerStore(path, readonly=True)  # read-only, as the ops console: records answer
    assert old.count_between(*RANGES["whole days"]) == len(in_range(calls, *RANGES["whole days"]))
    assert old.rollup_rows() == rollup.Rollup()
    old.close()
    store = SqliteLedgerStore(path)  # a broker opens it: the rollups are built
    assert store.rollup_rows() == rollup.rollup(calls)
    store.close()


# --- verify and rebuild, from the command line ----------------------------------------------


@pytest.fixture
def config(tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, sealer: Sealer) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(
        broker_toml(pki_dir=pki.dir, contracts=echo_contracts, endpoints=["127.0.0.1:1"], grants="")
        + '\n[ledger]\npath = "l.db"\n'
    )
    store = SqliteLedgerStore(tmp_path / "l.db")
    write(store, sealer, [traffic(seed=12)[:60], traffic(seed=13)[:60]])
    store.close()
    return path


def test_a_tampered_rollup_is_reported_by_verify_and_repaired_by_rebuild(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = config.parent / "l.db"
    assert main(["ledger", "verify", "--config", str(config)]) == 0
    assert main(["ledger", "rollup", "--rebuild", "--config", str(config)]) == 0
    assert capsys.readouterr().out.endswith(f"{ledger}: rollups match the records\n")

    first_day = "(SELECT min(day_ns) FROM rollup_groups)"
    tamper(ledger, f"UPDATE rollup_groups SET calls = calls + 1 WHERE day_ns = {first_day}")
    tamper(ledger, "UPDATE rollup_provider_days SET windows = '[[0,1,0]]'")
    assert main(["ledger", "verify", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "OK: 120 records" in out  # the records are intact: only their sums were changed
    broken = [line for line in out.splitlines() if "BROKEN" in line]
    assert broken[0].startswith(f"{ledger}: BROKEN: the rollup row of call group ")
    assert "(rows != records)" in broken[0]
    assert broken[-1].endswith("rebuilds them from the records, and counts them)")

    assert main(["ledger", "rollup", "--rebuild", "--config", str(config)]) == 0
    assert "rollup rows differed from the records: rebuilt" in capsys.readouterr().out
    assert main(["ledger", "verify", "--config", str(config)]) == 0
    assert main(["ledger", "rollup", "--rebuild", "--config", str(config)]) == 0
    assert capsys.readouterr().out.endswith("rollups match the records\n")


def test_a_resumed_verify_checks_the_rollups_of_the_new_records_days(
    config: Path, pki: CertificateAuthority, sealer: Sealer, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = config.parent / "l.db"
    auditor = pki.dir / "auditors" / "sara"
    if not auditor.exists():
        pki.issue_person("auditor", "sara")
    assert main(["ledger", "verify", "--config", str(config), "--as", str(auditor)]) == 0
    late = DAYS[3] + 2 * HOUR
    store = SqliteLedgerStore(ledger)
    write(store, sealer, [[record(90_000, start_ns=late, end_ns=late + MS)]])
    store.close()
    # A row of another day changed: beyond what a resumed verify reads; --full sees it.
    tamper(ledger, f"UPDATE rollup_groups SET calls = calls + 1 WHERE day_ns = {DAYS[0]}")
    assert main(["ledger", "verify", "--config", str(config)]) == 0
    assert main(["ledger", "verify", "--config", str(config), "--full"]) == 1
    capsys.readouterr()
    # A row of the day the new record fell in: the resumed verify sees it.
    tamper(
        ledger,
        "UPDATE rollup_provider_days SET histogram = '[[0,1]]', windows = '[[0,1,1]]' "
        f"WHERE day_ns = {DAYS[3]}",
    )
    assert main(["ledger", "verify", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN: the rollup row of provider day 2021-09-23 of " in out
    assert "(rows != records)" in out


def test_a_provider_days_windows_or_masks_tampered_are_reported_by_verify(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report reads the masks, verify the windows too: each is checked against the other
    and against the records."""
    ledger = config.parent / "l.db"
    tamper(
        ledger,
        f"UPDATE rollup_provider_days SET windows = '[[0,1,1]]', calls_mask = '1', "
        f"answered_mask = '1' WHERE day_ns = {DAYS[3]} AND provider = 'nocr'",
    )
    assert main(["ledger", "verify", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert (
        "BROKEN: the rollup row of provider day 2021-09-23 of nocr: window 2021-09-22T20:30:00Z: "
        "1 calls, 1 answered != 0 calls, 0 answered (rows != records)"
    ) in out
    assert main(["ledger", "rollup", "--rebuild", "--config", str(config)]) == 0
    capsys.readouterr()

    tamper(ledger, "UPDATE rollup_provider_days SET answered_mask = '0'")
    assert main(["ledger", "verify", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN: the rollup row of provider day 2021-09-20 of nocr: masks " in out
    assert main(["ledger", "rollup", "--rebuild", "--config", str(config)]) == 0
    assert main(["ledger", "verify", "--config", str(config)]) == 0


# --- availability from provider days ----------------------------------------------------------

# 1400-Q1 (2021-03-21 .. 2021-06-22): Tehran moved to +04:30 at the start of 1400-01-02, a
# day of 23 hours (276 windows); 2021-09-21, in 1400-Q2, had 25 (300 windows).
Q1400 = (ns(2021, 3, 21, zone=TEHRAN), ns(2021, 6, 22, zone=TEHRAN))
SHORT_DAY = ns(2021, 3, 22, zone=TEHRAN)
LONG_DAY = ns(2021, 9, 21, zone=TEHRAN)


def calls_at(*moments: tuple[int, str, int, str]) -> list[LedgerRecord]:
    """Calls (start, provider, status, endpoint) of 1 ms each."""
    return [
        record(1000 + i, start_ns=t, end_ns=t + MS, provider=p, status_code=code, endpoint=e)
        for i, (t, p, code, e) in enumerate(moments)
    ]


def test_a_provider_days_windows_are_counted_from_the_days_midnight_on_dst_days() -> None:
    assert rollup.day_of(SHORT_DAY) == (SHORT_DAY, SHORT_DAY + 23 * HOUR)
    assert rollup.day_of(LONG_DAY) == (LONG_DAY, LONG_DAY + 25 * HOUR)
    last_short, last_long = SHORT_DAY + 23 * HOUR - 1, LONG_DAY + 25 * HOUR - 1
    rows = rollup.rollup(
        calls_at(
            (SHORT_DAY, "nocr", 0, "e"),
            (last_short, "nocr", UNAVAILABLE, "e"),
            (last_short - MS, "nocr", 0, ""),  # refused: no window
            (LONG_DAY + 5 * MINUTE, "nocr", 0, "e"),
            (last_long, "nocr", 0, "e"),
        )
    )
    short = rows.provider_days[rollup.ProviderDayKey(SHORT_DAY, "nocr")]
    long = rows.provider_days[rollup.ProviderDayKey(LONG_DAY, "nocr")]
    assert short.windows == {0: [1, 1], 275: [1, 0]}
    assert short.masks() == (1 | 1 << 275, 1)
    assert long.windows == {1: [1, 1], 299: [1, 1]}
    assert sum(long.histogram.values()) == 2 and sum(short.histogram.values()) == 1


def dst_quarter_traffic() -> list[LedgerRecord]:
    """Hand-built calls across 1400-Q1's edges and its 23-hour day: answered, unavailable,
    refused, two providers, several calls in one window."""
    start, end = Q1400
    five = 5 * MINUTE
    return calls_at(
        (start, "nocr", 0, "e"),  # the quarter's first window
        (start + 1, "nocr", UNAVAILABLE, "e"),  # same window: still answered
        (start - 1, "nocr", 0, "e"),  # before the quarter
        (SHORT_DAY - 1, "nocr", UNAVAILABLE, "e"),  # the day before's last window
        (SHORT_DAY, "nocr", UNAVAILABLE, "e"),
        (SHORT_DAY + five - 1, "nocr", UNAVAILABLE, "e"),  # window 0: unanswered
        (SHORT_DAY + five, "tax", 0, "e"),
        (SHORT_DAY + 23 * HOUR - 1, "tax", 0, "e"),  # window 275, the day's last
        (SHORT_DAY + 23 * HOUR, "tax", 7, "e"),  # the next day's first: answered (not 14)
        (SHORT_DAY + 2 * HOUR, "tax", 0, ""),  # refused: says nothing
        (end - 1, "tax", UNAVAILABLE, "e"),  # the quarter's last window
        (end, "tax", 0, "e"),  # after
    )


@pytest.mark.parametrize(
    "span",
    [
        Q1400,
        (SHORT_DAY - 3 * MINUTE, SHORT_DAY + 23 * HOUR + 1),  # edges on both sides
        (SHORT_DAY, SHORT_DAY + 23 * HOUR),  # the short day alone
        (Q1400[0] + 1, SHORT_DAY + 4 * HOUR),
    ],
)
def test_availability_from_provider_days_is_the_raw_records_definition_across_dst(
    open_store: OpenStore, sealer: Sealer, span: tuple[int, int]
) -> None:
    calls = dst_quarter_traffic()
    store = open_store()
    write(store, sealer, [calls[:5], calls[5:]])  # two chains where the store keeps several
    assert store.provider_windows(*span, rollup.WINDOW_NS) == expected_windows(
        in_range(calls, *span)
    )
    if span == Q1400:
        assert store.provider_windows(*span, rollup.WINDOW_NS) == {"nocr": (3, 1), "tax": (4, 3)}


def test_a_window_whose_calls_and_answer_are_on_two_chains_is_answered_once(
    open_store: OpenStore, sealer: Sealer
) -> None:
    window = DAYS[1] + 7 * HOUR
    store = open_store()
    for instance, calls in (
        ("node-a", calls_at((window, "nocr", UNAVAILABLE, "e"), (window + HOUR, "nocr", UNAVAILABLE, "e"))),
        ("node-b", calls_at((window + MINUTE, "nocr", 0, "e"), (window + 2 * MINUTE, "nocr", 0, "e"))),
    ):  # fmt: skip
        chain = store.chain_for(instance)
        store.append_sealed(calls, seal_with(sealer, chain), sealer.cert_pem, chain)
    for span in ((DAYS[1], DAYS[2]), (DAYS[1] + 1, DAYS[2] - 1), (0, 2**63 - 1)):
        assert store.provider_windows(*span, rollup.WINDOW_NS) == {"nocr": (2, 1)}
        assert store.answered_histograms(*span) == {"nocr": {rollup.bin_of(MS): 2}}


def test_archiving_moves_provider_days_exactly_and_availability_is_unchanged(
    open_store: OpenStore, sealer: Sealer
) -> None:
    """A window half archived, half live counts once; the live and archived rows are the
    rollups of the live and archived records, to the call."""
    store = open_store()
    chain = store.chain_for("node-a")
    window = DAYS[1] + 3 * HOUR
    first = calls_at((window, "nocr", UNAVAILABLE, "e"), (DAYS[0] + HOUR, "tax", 0, "e"))
    second = calls_at((window + MINUTE, "nocr", 0, "e"), (DAYS[2] + HOUR, "tax", UNAVAILABLE, "e"))
    calls = first + second + traffic(seed=14)
    for batch in (first, second, traffic(seed=14)):
        store.append_sealed(batch, seal_with(sealer, chain), sealer.cert_pem, chain)
    # Whole days, as a quarter's: the records at a range's edges are read from the live store.
    span = (ns(2021, 9, 19, zone=TEHRAN), ns(2021, 9, 26, zone=TEHRAN))
    windows, histograms = (
        store.provider_windows(*span, rollup.WINDOW_NS),
        store.answered_histograms(*span),
    )
    assert windows == expected_windows(in_range(calls, *span))

    store.remove_archived(
        chain,
        next(iter(store.seals(chain))),
        1,
        "first.tabadol-archive",
        sealer.sign,
        sealer.cert_pem,
    )
    assert store.rollup_rows(chain, archived=True) == rollup.rollup(first)
    assert store.rollup_rows(chain) == rollup.rollup(second + traffic(seed=14))
    assert store.provider_windows(*span, rollup.WINDOW_NS) == windows
    assert store.answered_histograms(*span) == histograms

    store.remove_archived(
        chain,
        list(store.seals(chain))[-1],
        2,
        "rest.tabadol-archive",
        sealer.sign,
        sealer.cert_pem,
    )
    assert store.rollup_rows(chain) == rollup.Rollup()
    assert store.rollup_rows(chain, archived=True) == rollup.rollup(calls)
    assert store.provider_windows(*span, rollup.WINDOW_NS) == windows
    assert store.answered_histograms(*span) == histograms
