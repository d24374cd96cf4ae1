"""Horizontal bar charts as inline SVG text: no script, no external resource, escaped labels.

Each agency gets a row: its name on one line, then one bar per series under it. Bars carry
``data-agency`` and their series as a class, so the page can be styled and checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 520
LEFT = 8
VALUE_SPACE = 84  # right of the plot, for the value written after the longest bar
BAR = 13
BAR_GAP = 3
LABEL = 17  # the agency-name line above its bars
ROW_GAP = 9
LEGEND = 24
AXIS = 22
MAX_LABEL = 54  # characters; longer names are cut, with the whole name in a tooltip


@dataclass(frozen=True)
class Series:
    key: str  # a CSS class: served, consumed, share, reduction, p50, p95
    label: str


@dataclass(frozen=True)
class Row:
    agency: str
    label: str
    values: tuple[float | None, ...]  # one per series; None when there is no figure
    texts: tuple[str, ...]  # what is written after each bar
    behind: bool = False


@dataclass(frozen=True)
class Target:
    value: float
    label: str


@dataclass(frozen=True)
class Axis:
    maximum: float
    ticks: tuple[float, ...]


def nice_axis(largest: float, *, whole: bool = False) -> Axis:
    """An axis from 0 past ``largest`` in at most five steps of 1, 2, 2.5 or 5 x 10^k."""
    largest = max(largest, 1.0) if whole or largest <= 0 else largest
    magnitude = 10.0 ** math.floor(math.log10(largest / 5))
    steps = [m * magnitude for m in (1, 2, 2.5, 5, 10)]
    step = next(s for s in steps if largest / s <= 5 and (not whole or (s >= 1 and s == int(s))))
    count = math.ceil(largest / step - 1e-9)
    ticks = tuple(round(i * step, 12) for i in range(count + 1))
    return Axis(ticks[-1], ticks)


def _fmt(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def bar_chart(
    *,
    chart_id: str,
    title: str,
    series: Sequence[Series],
    rows: Sequence[Row],
    axis: Axis,
    tick_label: Callable[[float], str],
    target: Target | None = None,
    marks_behind: bool = False,
) -> str:
    """One chart as an ``<svg>`` element; sizes in CSS pixels at its natural width."""
    plot = WIDTH - LEFT - VALUE_SPACE
    row_height = LABEL + len(series) * (BAR + BAR_GAP) + ROW_GAP
    top = LEGEND + 8
    height = top + max(1, len(rows)) * row_height + AXIS

    def x(value: float) -> float:
        return LEFT + plot * min(value, axis.maximum) / axis.maximum

    parts = [
        f'<svg class="chart" id="{escape(chart_id)}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
        f'aria-labelledby="{escape(chart_id)}-title">',
        f'<title id="{escape(chart_id)}-title">{escape(title)}</title>',
    ]
    parts.append(_legend(series, target, marks_behind))
    bottom = height - AXIS
    for tick in axis.ticks:
        parts.append(
            f'<line class="grid" x1="{_fmt(x(tick))}" y1="{top - 4}" x2="{_fmt(x(tick))}" '
            f'y2="{bottom}"/>'
            f'<text class="tick" x="{_fmt(x(tick))}" y="{bottom + 15}" text-anchor="middle">'
            f"{escape(tick_label(tick))}</text>"
        )
    for index, row in enumerate(rows):
        y = top + index * row_height
        name = (
            row.label
            if len(row.label) <= MAX_LABEL
            else row.label[: MAX_LABEL - 1] + "\N{HORIZONTAL ELLIPSIS}"
        )
        flag = (
            ' <tspan class="behind-mark">\N{WARNING SIGN} behind target</tspan>'
            if row.behind and marks_behind
            else ""
        )
        parts.append(
            f'<text class="label" x="{LEFT}" y="{y + LABEL - 5}">'
            f"<title>{escape(row.label)}</title>{escape(name)}{flag}</text>"
        )
        bars = zip(series, row.values, row.texts, strict=True)
        for s_index, (s, value, text) in enumerate(bars):
            bar_y = y + LABEL + s_index * (BAR + BAR_GAP)
            width = x(value) - LEFT if value is not None else 0.0
            state = (
                " missing" if value is None else (" behind" if row.behind and marks_behind else "")
            )
            parts.append(
                f'<rect class="bar {escape(s.key)}{state}" data-agency="{escape(row.agency)}" '
                f'x="{LEFT}" y="{bar_y}" width="{_fmt(width)}" height="{BAR}">'
                f"<title>{escape(f'{row.label}: {s.label} {text}')}</title></rect>"
                f'<text class="value{state}" x="{_fmt(LEFT + width + 6)}" y="{bar_y + BAR - 2}">'
                f"{escape(text)}</text>"
            )
    if target is not None:
        tx = _fmt(x(target.value))
        parts.append(
            f'<line class="target" x1="{tx}" y1="{top - 6}" x2="{tx}" y2="{bottom}">'
            f"<title>{escape(target.label)}</title></line>"
        )
    parts.append(f'<line class="axis" x1="{LEFT}" y1="{bottom}" x2="{LEFT + plot}" y2="{bottom}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(series: Sequence[Series], target: Target | None, marks_behind: bool) -> str:
    items: list[str] = []
    x = LEFT
    for s in series:
        items.append(
            f'<rect class="swatch {escape(s.key)}" x="{x}" y="6" width="12" height="12"/>'
            f'<text class="legend" x="{x + 17}" y="16">{escape(s.label)}</text>'
        )
        x += 30 + 7 * len(s.label)
    if marks_behind:
        items.append(
            f'<rect class="swatch {escape(series[0].key)} behind" x="{x}" y="6" width="12" height="12"/>'
            f'<text class="legend" x="{x + 17}" y="16">behind target</text>'
        )
        x += 30 + 7 * len("behind target")
    if target is not None:
        items.append(
            f'<line class="target" x1="{x}" y1="4" x2="{x}" y2="20"/>'
            f'<text class="legend" x="{x + 6}" y="16">{escape(target.label)}</text>'
        )
    return f'<g class="legend">{"".join(items)}</g>'
