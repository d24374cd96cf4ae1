"""Ledger records out as CSV or JSON lines, for auditors and other systems."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import TextIO

from tabadol.ledger.record import FIELD_NAMES, StoredRecord

COLUMNS = ("seq", *FIELD_NAMES, "duration_ns", "digest")


def _row(stored: StoredRecord) -> dict[str, object]:
    record = stored.record
    row: dict[str, object] = {"seq": stored.seq}
    row.update({name: getattr(record, name) for name in FIELD_NAMES})
    row["duration_ns"] = record.duration_ns
    row["digest"] = stored.digest
    return row


def export(records: Iterable[StoredRecord], out: TextIO, fmt: str) -> int:
    """Write records to ``out`` as ``csv`` or ``jsonl``; returns how many."""
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        for stored in records:
            writer.writerow(_row(stored))
            count += 1
    elif fmt == "jsonl":
        for stored in records:
            out.write(json.dumps(_row(stored), separators=(",", ":")) + "\n")
            count += 1
    else:
        raise ValueError(f"unknown format {fmt!r}; expected csv or jsonl")
    return count
