"""Where the ledger lives: one small interface split by role, implementations side by side,
and one factory that everything else calls."""

from __future__ import annotations

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
]


def open_ledger(settings: LedgerSection, *, readonly: bool = False) -> LedgerStore:
    """The ledger ``[ledger]`` names: PostgreSQL at ``url``, else the SQLite file at
    ``path``. LedgerWriteError says why it cannot be opened."""
    if settings.url is not None:
        from tabadol.ledger.store.postgres import PostgresLedgerStore

        return PostgresLedgerStore(settings.url, readonly=readonly)
    return SqliteLedgerStore(settings.path, readonly=readonly)
