"""The transaction ledger: one record per call, hash-chained and sealed, off the hot path.

``LedgerWriter`` loads on first use: ``tabadol.ledger.record`` and the other pure modules
must not pull in the writer's SQLite and threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tabadol.ledger.record import LedgerRecord, Seal, StoredRecord

# Imported here, not on first use: once the submodule ``verify`` is loaded, the package's
# attribute of that name would be the module, never the function.
from tabadol.ledger.verify import Verdict, verify

if TYPE_CHECKING:
    from tabadol.ledger.writer import LedgerWriter

__all__ = ["LedgerRecord", "LedgerWriter", "Seal", "StoredRecord", "Verdict", "verify"]


def __getattr__(name: str) -> object:
    if name == "LedgerWriter":
        from tabadol.ledger.writer import LedgerWriter

        return LedgerWriter
    raise AttributeError(f"module 'tabadol.ledger' has no attribute {name!r}")
