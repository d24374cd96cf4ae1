"""The registry's storage interface: immutable, numbered versions of the entries, and the
exchange's current CRL, each announced to the broker nodes when it changes."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from tabadol.errors import TabadolError
from tabadol.registry.entries import Entries


class RegistryUnavailable(TabadolError):
    """The registry database cannot be reached; the message names it, never its password."""


class RegistryRefused(TabadolError):
    """The store refused a change (a CRL not newer than the one stored, say)."""


@dataclass(frozen=True)
class RegistryHead:
    """Which version is current, without its entries (what nodes poll)."""

    number: int
    digest: str


@dataclass(frozen=True)
class RegistryVersion:
    number: int
    created_at: dt.datetime
    created_by: str
    reason: str
    entries: Entries
    digest: str


@dataclass(frozen=True)
class StoredCrl:
    number: int
    der: bytes
    published_at: dt.datetime
    published_by: str


@dataclass(frozen=True)
class Announcement:
    """A committed change: a new registry version, or a newer CRL, with its number."""

    kind: Literal["registry", "crl"]
    number: int


class RegistryStore(Protocol):
    """Versions of the registry entries: append-only, one transaction per version."""

    where: str  # the database as messages name it (no password)

    def head(self) -> RegistryHead | None:
        """The current version's number and digest; None before the first import."""
        ...

    def current(self) -> RegistryVersion | None: ...

    def version(self, number: int) -> RegistryVersion | None: ...

    def history(self) -> list[RegistryVersion]:
        """Every version, oldest first."""
        ...

    def commit(self, entries: Entries, by: str, reason: str, digest: str) -> RegistryVersion:
        """Store ``entries`` as the next version, in one transaction, and announce it."""
        ...

    def close(self) -> None: ...


class CrlStore(Protocol):
    """The exchange's current CRL: it only moves forward."""

    def crl(self) -> StoredCrl | None: ...

    def publish_crl(self, der: bytes, number: int, by: str) -> StoredCrl:
        """Store a CRL whose number is above the stored one's (RegistryRefused if not) and
        announce it, in one transaction. The caller has checked it is the CA's."""
        ...


class Announcements(Protocol):
    def announcements(self) -> AsyncIterator[Announcement]:
        """Committed changes as they are announced; RegistryUnavailable when the
        connection is lost (the caller listens again, and polls meanwhile)."""
        ...


class Registry(RegistryStore, CrlStore, Announcements, Protocol):
    """What ``open_registry`` returns."""
