"""Solar Hijri (Persian) calendar dates, the calendar Iranian agencies record in."""

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class SolarDate:
    """A Solar Hijri date, displayed the Iranian way: 1370/05/23."""

    year: int
    month: int
    day: int

    def __str__(self) -> str:
        return f"{self.year:04d}/{self.month:02d}/{self.day:02d}"


def month_length(month: int) -> int:
    """Days in a month (1-12); Esfand counts as 30 because leap years are not modelled."""
    if month <= 6:
        return 31
    return 30


def date_problem(date: SolarDate) -> str | None:
    """Why `date` is not a calendar date, or None when it is one."""
    if date.year < 1:
        return f"year {date.year} is before the Solar Hijri era"
    if not 1 <= date.month <= 12:
        return f"month {date.month} is out of range 1-12"
    if not 1 <= date.day <= month_length(date.month):
        return f"day {date.day} is out of range 1-{month_length(date.month)} for month {date.month}"
    return None
