"""Where spans are kept: one small interface, implementations side by side, one factory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tabadol.database import describe, is_database_url, transport_problem
from tabadol.errors import TabadolError
from tabadol.ops.store.base import SpanStore, StoreFull, StoreLimits, StoreUnavailable
from tabadol.ops.store.memory import MemorySpanStore

if TYPE_CHECKING:
    from tabadol.ops.store.sqlite import SqliteSpanStore

MEMORY = "memory:"


def open_span_store(where: str | Path, limits: StoreLimits | None = None) -> SpanStore:
    """The span store ``where`` names: a ``postgresql://`` (or ``postgres://``) URL, or
    ``memory:``, or else the path of a SQLite file."""
    if is_database_url(where):
        from tabadol.ops.store.postgres import PostgresSpanStore  # psycopg only when asked

        if problem := transport_problem(str(where)):
            raise TabadolError(f"--db {describe(str(where))}: {problem}")
        return PostgresSpanStore(str(where), limits)
    if str(where) == MEMORY:
        return MemorySpanStore(limits)
    from tabadol.ops.store.sqlite import SqliteSpanStore

    return SqliteSpanStore(where, limits)


def shown(where: str | Path) -> str:
    """``where`` as it may be logged: a URL without its password."""
    return describe(where) if isinstance(where, str) and is_database_url(where) else str(where)


def __getattr__(name: str) -> object:
    # sqlite3 loads on first use: the pure modules beside the stores must not load it.
    if name == "SqliteSpanStore":
        from tabadol.ops.store.sqlite import SqliteSpanStore

        return SqliteSpanStore
    raise AttributeError(f"module 'tabadol.ops.store' has no attribute {name!r}")


__all__ = [
    "MemorySpanStore",
    "SpanStore",
    "SqliteSpanStore",
    "StoreFull",
    "StoreLimits",
    "StoreUnavailable",
    "open_span_store",
    "shown",
]
