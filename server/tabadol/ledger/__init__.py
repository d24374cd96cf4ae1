"""The transaction ledger: one record per call, hash-chained and sealed, off the hot path.

The names below load on first use: ``tabadol.ledger.record`` and the other pure modules
must not pull in the writer's and the stores' SQLite and threads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tabadol.ledger.record import LedgerRecord, Seal, StoredRecord
    from tabadol.ledger.verify import Verdict, verify
    from tabadol.ledger.writer import LedgerWriter

__all__ = ["LedgerRecord", "LedgerWriter", "Seal", "StoredRecord", "Verdict", "verify"]
_HOMES = {
    "LedgerRecord": "record",
    "Seal": "record",
    "StoredRecord": "record",
    "Verdict": "verify",
    "verify": "verify",
    "LedgerWriter": "writer",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tabadol.ledger' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tabadol.ledger.{home}"), name)
