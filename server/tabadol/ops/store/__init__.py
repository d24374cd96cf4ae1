"""Where spans are kept: one small interface, implementations side by side."""

from tabadol.ops.store.base import SpanStore, StoreFull, StoreLimits
from tabadol.ops.store.sqlite import SqliteSpanStore

__all__ = ["SpanStore", "SqliteSpanStore", "StoreFull", "StoreLimits"]
