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
from tabadol.ledger.store.sqlite import SqliteLedgerStore

if TYPE_CHECKING:
    from tabadol.config import LedgerSection

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
    return SqliteLedgerStore(path, readonly=readonly)
