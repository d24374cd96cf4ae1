"""Where the ledger lives: one small interface, implementations side by side."""

from tabadol.ledger.store.base import CallGroup, LedgerStore, LedgerWriteError
from tabadol.ledger.store.sqlite import SqliteLedgerStore

__all__ = ["CallGroup", "LedgerStore", "LedgerWriteError", "SqliteLedgerStore"]
