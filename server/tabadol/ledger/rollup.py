"""Rollups: the ledger's records summed as they are written, so that reports read a few rows
per day instead of every record. Pure: no store, no clock.

Two kinds of row (docs/ledger.md, "Rollups"):

- a **call group**: per Asia/Tehran day, consumer, provider, service, method, status,
  forwarded, verified, the grant that admitted the calls and the protocol they came in by:
  calls, summed duration and bytes, and a duration histogram;
- a **provider day**: per provider and Asia/Tehran day, its five-minute windows' counts (the
  calls forwarded to it that started in the window, and how many of those it answered:
  status other than UNAVAILABLE), two bitmasks of them (windows with calls, windows
  answered) that OR across chains and archives, and the duration histogram of the calls
  it answered: the availability and latency figures' input, a few rows per quarter.

Every figure is a sum, so rollups add up across batches, chains and days, and a batch
taken away (archived) subtracts exactly. The histogram is log-linear on integers only, so
every machine puts a duration in the same bin: a percentile read from it is within
``RELATIVE_ERROR`` of the true nearest-rank value.
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from tabadol.ledger.record import LedgerRecord

UNAVAILABLE = 14  # gRPC's code when the provider could not be reached: it answered nothing
DAY_ZONE = ZoneInfo("Asia/Tehran")  # the reports' days and quarters
WINDOW_NS = 5 * 60 * 1_000_000_000  # availability is counted in five-minute windows
_HOUR_NS = 3600 * 1_000_000_000
_HALF_HOUR_NS = _HOUR_NS // 2
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

# Log-linear bins: durations below 2**SUB_BITS ns each have their own bin (exact); above,
# each power of two is cut into 2**SUB_BITS equal bins. A bin's midpoint is within half a
# bin of any value in it: 1 / 2**(SUB_BITS + 1) of the bin's lower bound.
SUB_BITS = 6
_SUB = 1 << SUB_BITS
RELATIVE_ERROR = 1 / (2 * _SUB)  # 0.78125%


def bin_of(duration_ns: int) -> int:
    """The histogram bin of a duration. A negative duration (a clock stepped back during
    the call) counts as 0."""
    if duration_ns < _SUB:
        return max(duration_ns, 0)
    shift = duration_ns.bit_length() - 1 - SUB_BITS
    return shift * _SUB + (duration_ns >> shift)


def bin_bounds(index: int) -> tuple[int, int]:
    """The smallest and largest duration (ns) in a bin."""
    if index < 2 * _SUB:
        return index, index
    shift, mantissa = divmod(index, _SUB)
    shift -= 1
    low = (_SUB + mantissa) << shift
    return low, low + (1 << shift) - 1


def bin_value(index: int) -> int:
    """The duration a bin stands for: its midpoint."""
    low, high = bin_bounds(index)
    return (low + high) // 2


Histogram = dict[int, int]  # bin -> calls


def percentiles(histogram: Mapping[int, int], percents: Sequence[int]) -> dict[int, int]:
    """Nearest-rank percentiles (ns) read from a histogram: the p-th is the midpoint of the
    bin that holds the value at position ceil(p/100 * n). Empty: no percentiles."""
    n = sum(histogram.values())
    if n <= 0:
        return {}
    wanted = sorted((((n * p + 99) // 100), p) for p in percents)
    result: dict[int, int] = {}
    seen, next_wanted = 0, 0
    for index in sorted(histogram):
        seen += histogram[index]
        while next_wanted < len(wanted) and wanted[next_wanted][0] <= seen:
            result[wanted[next_wanted][1]] = bin_value(index)
            next_wanted += 1
    return result


def add_histogram(into: Histogram, other: Mapping[int, int], sign: int = 1) -> None:
    """Add (or with ``sign=-1`` take away) another histogram's counts; empty bins go."""
    for index, calls in other.items():
        total = into.get(index, 0) + sign * calls
        if total:
            into[index] = total
        else:
            into.pop(index, None)


def encode_histogram(histogram: Mapping[int, int]) -> str:
    """``[[bin, calls], ...]`` in bin order: JSON that any SQL console can read."""
    return json.dumps(sorted(histogram.items()), separators=(",", ":"))


def decode_histogram(text: str | bytes) -> Histogram:
    histogram: Histogram = dict(json.loads(text))  # JSON's integers are ints already
    return histogram


def _entry_key(entry: str) -> int:
    return int(entry[: entry.index(",")])


def _entry(key: int, counts: Sequence[int]) -> str:
    return ",".join(map(str, (key, *counts)))


def masks_after(calls: int, answered: int, touched: Mapping[int, Sequence[int]]) -> tuple[int, int]:
    """A provider day's window bitmasks once the windows ``touched`` (index -> the new
    [calls, answered], as add_encoded returns them) changed; the other bits stay as they
    were, so a mask changed by hand elsewhere stays wrong for verify to find."""
    for index, (n, ok) in touched.items():
        bit = 1 << index
        calls = calls | bit if n > 0 else calls & ~bit
        answered = answered | bit if ok > 0 else answered & ~bit
    return calls, answered


def add_encoded(mine: str, added: str) -> tuple[str, dict[int, list[int]]]:
    """Two encoded tables of ``[[key, count, ...], ...]`` (histograms, windows) added as
    text: (the sum, encoded; {key: its counts now} of the keys ``added`` changed). Entries
    at zero everywhere go. The stores merge a batch's few entries into a day's row on every
    write: an entry already there is found and rewritten in place, without decoding the
    rest of ``mine``."""
    changes = json.loads(added)
    if mine != "[]" and not (mine.startswith("[[") and mine.endswith("]]") and " " not in mine):
        mine = json.dumps(json.loads(mine), separators=(",", ":"))  # as encode_* writes it
    if len(changes) * 8 > mine.count("["):
        return _add_decoded(mine, changes)
    changed: dict[int, list[int]] = {}
    inserted: list[tuple[int, list[int]]] = []
    for key, *counts in changes:
        # "[key," is that entry's start and nothing else: a count follows a comma.
        at = mine.find(f"[{key},")
        if at < 0:
            if any(counts):
                inserted.append((key, counts))
            changed[key] = counts
            continue
        end = mine.index("]", at)
        counts = [
            int(n) + c for n, c in zip(mine[at + 1 : end].split(",")[1:], counts, strict=True)
        ]
        changed[key] = counts
        if any(counts):
            mine = f"{mine[: at + 1]}{_entry(key, counts)}{mine[end:]}"
        elif mine[at - 1] == ",":  # not the first entry: it goes with the comma before it
            mine = mine[: at - 1] + mine[end + 1 :]
        elif mine[end + 1] == ",":  # the first of several
            mine = mine[:at] + mine[end + 2 :]
        else:  # the only one
            mine = "[]"
    if inserted:
        parts = mine[2:-2].split("],[") if mine != "[]" else []
        for key, counts in inserted:
            parts.insert(bisect.bisect_left(parts, key, key=_entry_key), _entry(key, counts))
        mine = "[[" + "],[".join(parts) + "]]"
    return mine, changed


def _add_decoded(mine: str, changes: list[list[int]]) -> tuple[str, dict[int, list[int]]]:
    """add_encoded for many changes: decode, add, encode."""
    table = {key: counts for key, *counts in json.loads(mine)}
    changed: dict[int, list[int]] = {}
    for key, *counts in changes:
        before = table.get(key)
        if before is not None:
            counts = [a + b for a, b in zip(before, counts, strict=True)]
        if any(counts):
            table[key] = counts
        else:
            table.pop(key, None)
        changed[key] = counts
    encoded = json.dumps([[key, *table[key]] for key in sorted(table)], separators=(",", ":"))
    return encoded, changed


# -- days -------------------------------------------------------------------------------


def to_ns(moment: dt.datetime) -> int:
    """UTC epoch nanoseconds, exactly (no float on the way)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


@functools.lru_cache(maxsize=4096)
def _day_of_hour(hour: int) -> tuple[int, int]:
    moment = _EPOCH + dt.timedelta(microseconds=(hour * _HOUR_NS + _HALF_HOUR_NS) // 1000)
    local = moment.astimezone(DAY_ZONE).date()
    start = dt.datetime.combine(local, dt.time(), tzinfo=DAY_ZONE)
    end = dt.datetime.combine(local + dt.timedelta(days=1), dt.time(), tzinfo=DAY_ZONE)
    return to_ns(start), to_ns(end)


def day_of(ns: int) -> tuple[int, int]:
    """The Asia/Tehran day a moment falls in: (its start, the next day's start), UTC ns.
    Tehran's midnights fall on the half hour UTC (offsets +03:30 and, until 2022, +04:30),
    so each half-hour-aligned hour lies inside one day: the answer is cached by that hour."""
    return _day_of_hour((ns - _HALF_HOUR_NS) // _HOUR_NS)


_FIRST_DAY_NS = to_ns(dt.datetime(1971, 1, 1, tzinfo=dt.UTC))
_LAST_DAY_NS = to_ns(dt.datetime(9990, 1, 1, tzinfo=dt.UTC))


def whole_days(start_ns: int, end_ns: int) -> tuple[int, int]:
    """(a, b): the days wholly inside [start_ns, end_ns) are those starting in [a, b), and
    [start_ns, a) and [b, end_ns) are what is left at the edges (a <= b; a == b: no whole
    day). Ends beyond the calendar's range stand for "all time" on that side."""
    if end_ns <= start_ns:
        return start_ns, start_ns
    a, after = day_of(max(start_ns, _FIRST_DAY_NS))
    if a < start_ns:
        a = after
    b = day_of(min(end_ns, _LAST_DAY_NS))[0]
    return (a, b) if a < b else (start_ns, start_ns)


# -- rollups of records -----------------------------------------------------------------


class GroupKey(NamedTuple):
    """What a call group row is keyed by. (A named tuple: verify builds hundreds of
    thousands of these from the rows, and a tuple is built, hashed and pickled in C.)"""

    day_ns: int  # the day's start (UTC ns): docs/ledger.md, "Rollups"
    consumer: str
    provider: str
    service: str
    method: str
    status_code: int
    forwarded: bool  # an endpoint was chosen: the call reached for the provider
    verified: bool  # the consumer was identified by its certificate
    grant: str = ""  # the id of the grant that admitted the calls; "" when none did
    protocol: str = "grpc"  # what the calls came in by: grpc, connect or rest


@dataclass(slots=True)
class GroupTotals:
    calls: int = 0
    duration_ns: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    histogram: Histogram = field(default_factory=dict)

    def __reduce__(self) -> tuple[type[GroupTotals], tuple[Any, ...]]:
        return GroupTotals, (
            self.calls,
            self.duration_ns,
            self.request_bytes,
            self.response_bytes,
            self.histogram,
        )

    def add(self, other: GroupTotals, sign: int = 1) -> None:
        self.calls += sign * other.calls
        self.duration_ns += sign * other.duration_ns
        self.request_bytes += sign * other.request_bytes
        self.response_bytes += sign * other.response_bytes
        add_histogram(self.histogram, other.histogram, sign)


class ProviderDayKey(NamedTuple):
    """What a provider day row is keyed by."""

    day_ns: int  # the Asia/Tehran day's start (UTC ns): a multiple of WINDOW_NS
    provider: str


Windows = dict[int, list[int]]  # window index in the day -> [calls forwarded, answered]


@dataclass(slots=True, eq=False)
class ProviderDay:
    """A provider's day: per five-minute window (index from the day's start; a day has 276,
    288 or 300 of them) the calls forwarded to it and how many it answered, only windows
    with calls; and the duration histogram of the calls it answered."""

    windows: Windows = field(default_factory=dict)
    histogram: Histogram = field(default_factory=dict)
    # The masks a store keeps beside the windows (read back for verify: the reports read
    # them, not the windows); None for a day summed from records.
    stored_masks: tuple[int, int] | None = None

    def __reduce__(self) -> tuple[type[ProviderDay], tuple[Any, ...]]:
        return ProviderDay, (self.windows, self.histogram, self.stored_masks)

    def __eq__(self, other: object) -> bool:
        """Same counts; and a row whose stored masks disagree with its windows equals none."""
        if not isinstance(other, ProviderDay):
            return NotImplemented
        return (
            self.windows == other.windows
            and self.histogram == other.histogram
            and self.masks_agree()
            and other.masks_agree()
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, as dataclasses with eq are

    def masks_agree(self) -> bool:
        return self.stored_masks is None or self.stored_masks == self.masks()

    def add(self, other: ProviderDay, sign: int = 1) -> None:
        """Add another day's counts (``sign=-1``: take them away); empty windows go."""
        windows = self.windows
        for index, (calls, answered) in other.windows.items():
            mine = windows.get(index)
            if mine is None:
                windows[index] = [sign * calls, sign * answered]
                continue
            mine[0] += sign * calls
            mine[1] += sign * answered
            if mine[0] == 0 and mine[1] == 0:
                del windows[index]
        add_histogram(self.histogram, other.histogram, sign)

    def masks(self) -> tuple[int, int]:
        """(windows with calls, windows answered) as bitmasks: bit i is window i."""
        return masks_of(self.windows)

    def empty(self) -> bool:
        return not self.windows and not self.histogram


def masks_of(windows: Mapping[int, Sequence[int]]) -> tuple[int, int]:
    """Bitmasks of a day's windows: bit i set iff window i had calls (had answers)."""
    calls_mask = answered_mask = 0
    for index, (calls, answered) in windows.items():
        if calls > 0:
            calls_mask |= 1 << index
        if answered > 0:
            answered_mask |= 1 << index
    return calls_mask, answered_mask


def encode_windows(windows: Mapping[int, Sequence[int]]) -> str:
    """``[[index, calls, answered], ...]`` in window order (JSON, as histograms)."""
    return json.dumps(
        [[i, *counts] for i, counts in sorted(windows.items())], separators=(",", ":")
    )


def decode_windows(text: str | bytes) -> Windows:
    return {i: [calls, answered] for i, calls, answered in json.loads(text)}


def encode_mask(mask: int) -> str:
    """A window bitmask as lowercase hex text (bit 0 is the last digit's lowest bit)."""
    return format(mask, "x")


def decode_mask(text: str) -> int:
    return int(text, 16)


@dataclass
class Rollup:
    """Call groups and provider days of some records; adds up (``add``) and takes away."""

    groups: dict[GroupKey, GroupTotals] = field(default_factory=dict)
    provider_days: dict[ProviderDayKey, ProviderDay] = field(default_factory=dict)

    def add(self, other: Rollup, sign: int = 1) -> None:
        """Add another rollup (``sign=-1``: take it away). Rows left at zero calls go."""
        for key, totals in other.groups.items():
            mine = self.groups.setdefault(key, GroupTotals())
            mine.add(totals, sign)
            if mine.calls == 0 and not mine.histogram:
                del self.groups[key]
        for dkey, day in other.provider_days.items():
            my_day = self.provider_days.get(dkey)
            if my_day is None:
                my_day = self.provider_days[dkey] = ProviderDay()
            if day.stored_masks is not None and sign > 0:  # rows summed: their masks OR
                calls, answered = my_day.stored_masks or my_day.masks()
                stored_calls, stored_answered = day.stored_masks
                my_day.stored_masks = (calls | stored_calls, answered | stored_answered)
            else:
                my_day.stored_masks = None
            my_day.add(day, sign)
            if my_day.empty():
                del self.provider_days[dkey]

    def digest(self) -> str:
        """SHA-256 (hex) of the rows, one canonical JSON line each in key order, a provider
        day with its masks as stored: what an archived prefix's statement signs of a
        chain's archived rows (docs/ledger.md, "Archives")."""
        sha = hashlib.sha256()
        encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
        for key in sorted(self.groups):
            t = self.groups[key]
            row = [
                "group", key.day_ns, key.consumer, key.provider, key.service, key.method,
                key.status_code, key.forwarded, key.verified, t.calls, t.duration_ns,
                t.request_bytes, t.response_bytes, sorted(t.histogram.items()),
            ]  # fmt: skip
            # A gRPC row is as before protocols, and one of no grant as before grants, so
            # old statements hold.
            if key.protocol != "grpc":
                row += [key.grant, key.protocol]
            elif key.grant:
                row.append(key.grant)
            sha.update(encode(row).encode() + b"\n")
        for dkey in sorted(self.provider_days):
            day = self.provider_days[dkey]
            calls_mask, answered_mask = day.stored_masks or day.masks()
            row = [
                "provider day", dkey.day_ns, dkey.provider, sorted(day.windows.items()),
                encode_mask(calls_mask), encode_mask(answered_mask), sorted(day.histogram.items()),
            ]  # fmt: skip
            sha.update(encode(row).encode() + b"\n")
        return sha.hexdigest()

    def differences(self, other: Rollup) -> Iterator[str]:
        """What differs between two rollups, row by row, in key order (for verify)."""
        for key in sorted(self.groups.keys() | other.groups.keys()):
            mine, theirs = self.groups.get(key), other.groups.get(key)
            if mine != theirs:
                yield f"call group {describe_group(key)}: {_totals(mine)} != {_totals(theirs)}"
        for dkey in sorted(self.provider_days.keys() | other.provider_days.keys()):
            day, their_day = self.provider_days.get(dkey), other.provider_days.get(dkey)
            if day is not None and not day.masks_agree():
                yield f"provider day {_date(dkey.day_ns)} of {dkey.provider}: " + _masks(day)
            elif day != their_day:
                yield f"provider day {_date(dkey.day_ns)} of {dkey.provider}: " + _day_difference(
                    dkey.day_ns, day, their_day
                )


# What a rollup reads of a record, in this order (``rollup_of_fields``).
ROLLUP_FIELDS = (
    "start_ns", "end_ns", "consumer", "provider", "service", "method", "status_code",
    "endpoint", "consumer_verified", "request_bytes", "response_bytes", "grant", "protocol",
)  # fmt: skip
_rollup_fields = attrgetter(*ROLLUP_FIELDS)
RollupFields = tuple[int, int, str, str, str, str, int, str, bool, int, int, str, str]


def rollup(records: Iterable[LedgerRecord]) -> Rollup:
    """The rollup of some records."""
    return rollup_of_fields(map(_rollup_fields, records))


def rollup_of_fields(rows: Iterable[RollupFields]) -> Rollup:
    """The rollup of records given as their ROLLUP_FIELDS, as a store can read them without
    building each record. (Keyed by tuples while it sums: it runs on the writer's path,
    once per record, and a frozen dataclass is slow to build and hash.)"""
    groups: dict[tuple[int, str, str, str, str, int, bool, bool, str, str], GroupTotals] = {}
    days: dict[tuple[int, str], ProviderDay] = {}
    hour, day = None, 0  # a batch's records mostly share an hour: day_of once per hour
    for (
        start,
        end,
        consumer,
        provider,
        service,
        method,
        code,
        endpoint,
        verified,
        sent,
        got,
        grant,
        protocol,
    ) in rows:
        duration = end - start
        forwarded = endpoint != ""
        if (start - _HALF_HOUR_NS) // _HOUR_NS != hour:
            hour = (start - _HALF_HOUR_NS) // _HOUR_NS
            day = _day_of_hour(hour)[0]
        key = (day, consumer, provider, service, method, code, forwarded, verified, grant, protocol)
        totals = groups.get(key)
        if totals is None:
            totals = groups[key] = GroupTotals()
        totals.calls += 1
        totals.duration_ns += duration
        totals.request_bytes += sent
        totals.response_bytes += got
        index = bin_of(duration)
        histogram = totals.histogram
        histogram[index] = histogram.get(index, 0) + 1
        if forwarded:
            dkey = (day, provider)
            provider_day = days.get(dkey)
            if provider_day is None:
                provider_day = days[dkey] = ProviderDay()
            window_index = (start - day) // WINDOW_NS
            window = provider_day.windows.get(window_index)
            if window is None:
                window = provider_day.windows[window_index] = [0, 0]
            window[0] += 1
            if code != UNAVAILABLE:
                window[1] += 1
                answered = provider_day.histogram
                answered[index] = answered.get(index, 0) + 1
    return Rollup(
        {
            GroupKey(day, c, p, s, m, code, fwd, bool(verified), grant, protocol): totals
            for (day, c, p, s, m, code, fwd, verified, grant, protocol), totals in groups.items()
        },
        {ProviderDayKey(*dkey): provider_day for dkey, provider_day in days.items()},
    )


def utc(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _date(day_ns: int) -> dt.date:
    return (_EPOCH + dt.timedelta(microseconds=day_ns // 1000)).astimezone(DAY_ZONE).date()


def describe_group(key: GroupKey) -> str:
    return (
        f"{_date(key.day_ns)} {key.consumer or '-'} -> {key.provider}/{key.service}/{key.method} "
        f"status {key.status_code}{' forwarded' if key.forwarded else ''}"
        f"{'' if key.verified else ' unverified'}{f' grant {key.grant}' if key.grant else ''}"
        f"{f' by {key.protocol}' if key.protocol != 'grpc' else ''}"
    )


def _totals(totals: GroupTotals | None) -> str:
    if totals is None:
        return "no row"
    return (
        f"{totals.calls} calls, {totals.duration_ns} ns, {totals.request_bytes}+"
        f"{totals.response_bytes} bytes, histogram {encode_histogram(totals.histogram)}"
    )


def _masks(day: ProviderDay) -> str:
    stored, computed = day.stored_masks or (0, 0), day.masks()
    return (
        f"masks {encode_mask(stored[0])}/{encode_mask(stored[1])} != its windows' "
        f"{encode_mask(computed[0])}/{encode_mask(computed[1])}"
    )


def _day_difference(day_ns: int, mine: ProviderDay | None, theirs: ProviderDay | None) -> str:
    """The first window that differs (or the histograms), or which side has no row."""
    if mine is None or theirs is None:
        return "no row != a row" if mine is None else "a row != no row"
    for index in sorted(mine.windows.keys() | theirs.windows.keys()):
        a, b = mine.windows.get(index, [0, 0]), theirs.windows.get(index, [0, 0])
        if a != b:
            return (
                f"window {utc(day_ns + index * WINDOW_NS)}: {a[0]} calls, {a[1]} answered "
                f"!= {b[0]} calls, {b[1]} answered"
            )
    return (
        f"histogram of answered calls {encode_histogram(mine.histogram)} "
        f"!= {encode_histogram(theirs.histogram)}"
    )
