"""Where the ledger lives: one small interface split by role, implementations side by side,
and one factory that everything else calls."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tabadol.ledger.store.base import (
    CallGroup,
    LedgerLog,
    LedgerMissing,
    LedgerQueries,
    LedgerStore,
    LedgerWriteError,
)
from tabadol.ledger.store.memory import MemoryLedgerStore

if TYPE_CHECKING:
    from tabadol.config import LedgerSection
    from tabadol.ledger.store.sqlite import SqliteLedgerStore

__all__ = [
    "CallGroup",
    "LedgerLog",
    "LedgerMissing",
    "LedgerQueries",
    "LedgerStore",
    "LedgerWriteError",
    "MemoryLedgerStore",
    "SqliteLedgerStore",
    "open_ledger",
    "open_ledger_at",
]


def open_ledger(settings: LedgerSection, *, readonly: bool = False) -> LedgerStore:
    """The ledger ``[ledger]`` names: PostgreSQL at ``url``, else the SQLite file at
    ``path``. LedgerWriteError says why it cannot be opened."""
    return open_ledger_at(settings.url, settings.path, readonly=readonly)


def open_ledger_at(url: str | None, path: Path, *, readonly: bool = False) -> LedgerStore:
    """``open_ledger`` from the two settings themselves: a verify worker process opens its
    own handle with this, without loading the configuration's modules."""
    if url is not None:
        from tabadol.ledger.store.postgres import PostgresLedgerStore

        return PostgresLedgerStore(url, readonly=readonly)
    from tabadol.ledger.store.sqlite import SqliteLedgerStore

    return SqliteLedgerStore(path, readonly=readonly)


def __getattr__(name: str) -> object:
    # sqlite3 loads on first use: the pure modules that read store.base must not load it.
    if name == "SqliteLedgerStore":
        from tabadol.ledger.store.sqlite import SqliteLedgerStore

        return SqliteLedgerStore
    raise AttributeError(f"module 'tabadol.ledger.store' has no attribute {name!r}")
