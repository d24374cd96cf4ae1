"""Where the registry is kept: one small interface, implementations side by side."""

from __future__ import annotations

from tabadol.errors import ConfigError
from tabadol.registry.store.base import (
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
)


def open_registry(url: str) -> Registry:
    """The registry at ``url``: ``postgresql://...``, or ``memory://NAME`` for tests.
    RegistryUnavailable when the database cannot be reached (naming it, not its password)."""
    if url.startswith(("postgresql://", "postgres://")):
        from tabadol.registry.store.postgres import PostgresRegistryStore

        return PostgresRegistryStore(url)
    if url.startswith("memory://"):
        from tabadol.registry.store.memory import memory_store

        return memory_store(url)
    raise ConfigError(f"[registry] url: {url.split('://')[0]!r} is not a registry database")


__all__ = [
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
]
