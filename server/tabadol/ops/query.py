"""Jaeger query-API parameters to a TraceQuery. Pure: strings in, values or ValueError out."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal

from tabadol.ops.model import TraceQuery
from tabadol.status import Code

GRPC_CODES = {code.name: code.value for code in Code}
MAX_LIMIT = 1500  # Jaeger's UI offers up to 1500 results
# Each tag filter is a subquery: thousands of them overflow SQLite's expression tree.
MAX_TAGS = 32
_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # MICRO SIGN
    "μs": 1_000,  # GREEK SMALL LETTER MU, as Go writes it
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
    "d": 86400 * 10**9,
}
# Every number reaches SQLite, whose integers are signed 64-bit: larger is a bad request.
_INT64_MAX = 2**63 - 1
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|μs|ms|s|m|h|d)\s*")


def parse_duration_ns(text: str) -> int:
    """'1.5s', '250ms', '300us', '2h' (Go duration style, one unit) to nanoseconds."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 250ms, 1.5s or 2h")
    return int(Decimal(match[1]) * _UNITS_NS[match[2]])


def _in_range(name: str, value: int, text: str | None = None) -> int:
    """``value`` if SQLite can hold it; otherwise a ValueError naming the parameter."""
    if not -_INT64_MAX <= value <= _INT64_MAX:
        shown = f" {text!r}" if text is not None and len(text) <= 40 else ""
        raise ValueError(f"{name}{shown} is too large: times reach 292 years at most")
    return value


def parse_tags(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Tags as Jaeger's API takes them: ``tags={"k":"v"}`` (JSON) or ``tag=k:v`` (repeated)."""
    tags: list[tuple[str, str]] = []
    for value in values:
        value = value.strip()
        if value.startswith(("{", "[")):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"tags is not a JSON object: {e}") from None
            except RecursionError:
                raise ValueError("tags is nested too deeply to be a JSON object of tags") from None
            if not isinstance(parsed, dict):
                raise ValueError("tags must be a JSON object of key: value")
            tags += [(str(k), _tag_text(v)) for k, v in parsed.items()]
        elif value:
            key, sep, text = value.partition(":") if ":" in value else value.partition("=")
            if not sep or not key:
                raise ValueError(f"tag {value!r} is not key:value")
            tags.append((key.strip(), text.strip()))
        if len(tags) > MAX_TAGS:
            raise ValueError(f"tags: at most {MAX_TAGS} tag filters in one search")
    return tuple(tags)


def _tag_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_status(text: str | None) -> str | None:
    if not text:
        return None
    status = text.strip().upper()
    if status in ("OK", "ERROR") and text.strip().lower() in ("ok", "error"):
        return text.strip().lower()
    if status not in GRPC_CODES:
        raise ValueError(f"status {text!r} is not ok, error or a gRPC code name")
    return status


def trace_query(params: Mapping[str, Sequence[str]], now_ns: int) -> TraceQuery:
    """Build a query from multi-valued URL parameters, Jaeger's names and units (µs)."""

    def one(name: str) -> str | None:
        values = params.get(name)
        return values[-1] if values else None

    def micros(name: str) -> int | None:
        text = one(name)
        if text in (None, ""):
            return None
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{name} must be microseconds since the epoch, got {text!r}") from None
        return _in_range(name, value * 1000, text)

    start, end = micros("start"), micros("end")
    lookback = one("lookback")
    if start is None and lookback not in (None, "", "custom"):
        try:
            back = parse_duration_ns(lookback)
        except ValueError as e:
            raise ValueError(f"lookback: {e}") from None
        start = _in_range("lookback", (end or now_ns) - back, lookback)
    limit_text = one("limit") or "20"
    offset_text = one("offset") or "0"
    try:
        limit, offset = int(limit_text), int(offset_text)
    except ValueError:
        raise ValueError("limit and offset must be whole numbers") from None
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise ValueError(f"limit must be 1-{MAX_LIMIT} and offset at least 0")
    if offset > _INT64_MAX - limit:
        raise ValueError(f"offset {offset_text!r} is too large")
    operation = one("operation") or None
    min_d, max_d = one("minDuration"), one("maxDuration")

    def duration(name: str, text: str | None) -> int | None:
        if not text:
            return None
        try:
            nanos = parse_duration_ns(text)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        return _in_range(name, nanos, text)

    return TraceQuery(
        service=one("service") or None,
        operation=operation,
        tags=parse_tags([*params.get("tags", ()), *params.get("tag", ())]),
        min_duration_ns=duration("minDuration", min_d),
        max_duration_ns=duration("maxDuration", max_d),
        start_ns=start,
        end_ns=end,
        status=parse_status(one("status")),
        limit=limit,
        offset=offset,
    )


def window_ns(
    params: Mapping[str, Sequence[str]], now_ns: int, default_lookback_ms: int
) -> tuple[int, int]:
    """The (start, end) of ``endTs`` and ``lookback``, both in milliseconds as Jaeger has them."""

    def millis(name: str, default: int) -> int:
        values = params.get(name)
        if not values or values[-1] == "":
            return default
        try:
            number = int(values[-1])
        except ValueError:
            raise ValueError(f"{name} must be milliseconds, got {values[-1]!r}") from None
        # Checked as nanoseconds, the unit the store is asked in.
        _in_range(name, number * 1_000_000, values[-1])
        return number

    end_ms = millis("endTs", now_ns // 1_000_000)
    lookback_ms = millis("lookback", default_lookback_ms)
    start = _in_range("lookback", (end_ms - lookback_ms) * 1_000_000, str(lookback_ms))
    return start, end_ms * 1_000_000
