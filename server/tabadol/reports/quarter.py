"""Solar Hijri quarters, the periods agencies report in: "1405-Q3" is Mehr to Azar 1405.

A quarter runs from 00:00 Asia/Tehran on its first day to 00:00 on the next quarter's first day.
All calendar arithmetic is jdatetime's; only Gregorian dates are stepped here.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import jdatetime  # type: ignore[import-untyped]  # ships no type information

TEHRAN = ZoneInfo("Asia/Tehran")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_FORM = re.compile(r"(?P<year>[0-9]+)-[Qq](?P<quarter>[0-9]+)")
MONTH_NAMES: tuple[str, ...] = tuple(jdatetime.date.j_months_en)
FIRST_YEAR: int = jdatetime.MINYEAR
LAST_YEAR: int = jdatetime.MAXYEAR  # 9377: the last year jdatetime can represent


def _gregorian(year: int, month: int, day: int) -> dt.date:
    """The Gregorian date of a Solar Hijri one."""
    date: dt.date = jdatetime.date(year, month, day).togregorian()
    return date


def _solar(date: dt.date) -> tuple[int, int, int]:
    """(year, month, day) in the Solar Hijri calendar of a Gregorian date."""
    solar = jdatetime.date.fromgregorian(date=date)
    return int(solar.year), int(solar.month), int(solar.day)


def _first_day(year: int, quarter: int) -> dt.date:
    """The Gregorian date of a quarter's first day; quarter 5 is the next year's first."""
    if quarter == 5:
        return _gregorian(year + 1, 1, 1)
    return _gregorian(year, 3 * (quarter - 1) + 1, 1)


def _ns(moment: dt.datetime) -> int:
    """UTC epoch nanoseconds, exactly (no float on the way)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def solar_date(date: dt.date) -> str:
    """A Gregorian date written as the Solar Hijri one, e.g. ``1405/07/01``."""
    year, month, day = _solar(date)
    return f"{year:04d}/{month:02d}/{day:02d}"


def both_dates(date: dt.date) -> str:
    """``1405/07/01 (2026-09-23)``: Solar Hijri, with the Gregorian date beside it."""
    return f"{solar_date(date)} ({date.isoformat()})"


@dataclass(frozen=True, order=True)
class Quarter:
    """One quarter of a Solar Hijri year: Q1 is months 1-3 (Farvardin to Khordad), and so on."""

    year: int
    quarter: int

    def __post_init__(self) -> None:
        if not 1 <= self.quarter <= 4:
            raise ValueError(f"quarter {self.quarter} does not exist; a year has Q1-Q4")
        if not FIRST_YEAR <= self.year <= LAST_YEAR or (self.year, self.quarter) == (LAST_YEAR, 4):
            raise ValueError(
                f"{self}: outside the calendar's range ({FIRST_YEAR}-Q1 to {LAST_YEAR}-Q3, "
                "the quarters jdatetime can place)"
            )

    @classmethod
    def parse(cls, text: str) -> Quarter:
        """Read ``1405-Q3``: a Solar Hijri year, a dash and Q1-Q4."""
        match = _FORM.fullmatch(text.strip())
        if not match:
            raise ValueError(
                f"{text!r} is not a quarter; write the Solar Hijri year, a dash and Q1-Q4, "
                "e.g. 1405-Q3"
            )
        if not 1 <= int(match["quarter"]) <= 4:
            raise ValueError(f"{text!r}: there is no Q{match['quarter']}; a year has Q1-Q4")
        return cls(int(match["year"]), int(match["quarter"]))

    @classmethod
    def containing(cls, moment: dt.datetime) -> Quarter:
        """The quarter a moment falls in, on Tehran's calendar; the moment must be time-zone aware."""
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError(f"{moment.isoformat()} has no time zone; which quarter is ambiguous")
        year, month, _ = _solar(moment.astimezone(TEHRAN).date())
        return cls(year, (month - 1) // 3 + 1)

    def __str__(self) -> str:
        return f"{self.year}-Q{self.quarter}"

    @property
    def first_month(self) -> int:
        return 3 * (self.quarter - 1) + 1

    def previous(self) -> Quarter:
        if self.quarter == 1:
            return Quarter(self.year - 1, 4)
        return Quarter(self.year, self.quarter - 1)

    def next(self) -> Quarter:
        if self.quarter == 4:
            return Quarter(self.year + 1, 1)
        return Quarter(self.year, self.quarter + 1)

    @property
    def first_day(self) -> dt.date:
        """The Gregorian date of the quarter's first day."""
        return _first_day(self.year, self.quarter)

    @property
    def last_day(self) -> dt.date:
        """The Gregorian date of the quarter's last day: the day before the next one starts."""
        return _first_day(self.year, self.quarter + 1) - dt.timedelta(days=1)

    @property
    def first_day_solar(self) -> str:
        """``1405/07/01``."""
        return solar_date(self.first_day)

    @property
    def last_day_solar(self) -> str:
        """``1405/09/30``."""
        return solar_date(self.last_day)

    @property
    def start(self) -> dt.datetime:
        """00:00 Asia/Tehran on the first day (inclusive)."""
        return dt.datetime.combine(self.first_day, dt.time(), tzinfo=TEHRAN)

    @property
    def end(self) -> dt.datetime:
        """00:00 Asia/Tehran on the next quarter's first day (exclusive)."""
        return dt.datetime.combine(
            _first_day(self.year, self.quarter + 1), dt.time(), tzinfo=TEHRAN
        )

    @property
    def start_ns(self) -> int:
        return _ns(self.start)

    @property
    def end_ns(self) -> int:
        return _ns(self.end)

    @property
    def months(self) -> str:
        """The month names it spans, e.g. ``Mehr-Azar 1405`` (with an en dash)."""
        first = MONTH_NAMES[self.first_month - 1]
        last = MONTH_NAMES[self.first_month + 1]
        return f"{first}\N{EN DASH}{last} {self.year}"

    @property
    def period(self) -> str:
        """First and last day, each in both calendars: ``1405/07/01 (2026-09-23) - ...``."""
        return f"{both_dates(self.first_day)} \N{EN DASH} {both_dates(self.last_day)}"
