"""The registry of agencies, services, grants and limits, kept in a database as numbered,
immutable versions that every broker node follows (docs/registry.md)."""

from tabadol.registry.store import (
    Registry,
    RegistryRefused,
    RegistryUnavailable,
    RegistryVersion,
    open_registry,
)

__all__ = [
    "Registry",
    "RegistryRefused",
    "RegistryUnavailable",
    "RegistryVersion",
    "open_registry",
]
