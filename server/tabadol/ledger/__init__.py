"""The transaction ledger: one record per call, hash-chained and sealed, off the hot path."""

from tabadol.ledger.record import LedgerRecord, Seal, StoredRecord
from tabadol.ledger.verify import Verdict, verify
from tabadol.ledger.writer import LedgerWriter

__all__ = ["LedgerRecord", "LedgerWriter", "Seal", "StoredRecord", "Verdict", "verify"]
