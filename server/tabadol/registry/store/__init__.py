"""Where the registry is kept: one small interface, implementations side by side."""

from __future__ import annotations

from tabadol.database import is_sqlite_url, sqlite_path
from tabadol.errors import ConfigError
from tabadol.registry.store.base import (
    GENESIS_CHAIN,
    Announcement,
    CrlStore,
    CrlTrusted,
    Registry,
    RegistryBusy,
    RegistryHead,
    RegistryRefused,
    RegistryStore,
    RegistryUnavailable,
    RegistryVersion,
    StoredCrl,
    version_chain,
)


def open_registry(url: str) -> Registry:
    """The registry at ``url``: ``postgresql://...``, ``sqlite:///PATH`` (relative to the
    working directory: the configuration's loader makes it absolute), or ``memory://NAME``
    for tests. Opened on first use: RegistryUnavailable then when the database cannot be
    reached or read (naming it, not its password)."""
    if url.startswith(("postgresql://", "postgres://")):
        from tabadol.registry.store.postgres import PostgresRegistryStore

        return PostgresRegistryStore(url)
    if is_sqlite_url(url):
        from tabadol.registry.store.sqlite import SqliteRegistryStore

        try:
            return SqliteRegistryStore(sqlite_path(url))
        except ValueError as e:
            raise ConfigError(f"[registry] url: {e}") from None
    if url.startswith("memory://"):
        from tabadol.registry.store.memory import memory_store

        return memory_store(url)
    raise ConfigError(f"[registry] url: {url.split('://')[0]!r} is not a registry database")


__all__ = [
    "GENESIS_CHAIN",
    "Announcement",
    "CrlStore",
    "CrlTrusted",
    "Registry",
    "RegistryBusy",
    "RegistryHead",
    "RegistryRefused",
    "RegistryStore",
    "RegistryUnavailable",
    "RegistryVersion",
    "StoredCrl",
    "open_registry",
    "version_chain",
]
