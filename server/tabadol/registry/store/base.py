"""The registry's storage interface: immutable, numbered versions of the entries, and the
exchange's current CRL, each announced to the broker nodes when it changes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Literal, Protocol

from tabadol.errors import TabadolError
from tabadol.registry.entries import Entries


class RegistryUnavailable(TabadolError):
    """The registry database cannot be reached; the message names it, never its password."""


class RegistryRefused(TabadolError):
    """The store refused a change (a CRL not newer than the one stored, say)."""


class RegistryBusy(RegistryUnavailable):
    """Another change held the registry's lock past the wait allowed; nothing was changed."""


MAX_SKIP = 1_000_000  # how far above the newest version one commit may number itself
MAX_VERSION = 2**53  # far below bigint's 2**63, exact as a JSON number everywhere
MAX_CRL_BYTES = 16 * 1024 * 1024  # a larger row is no CRL of this exchange's: never read
LOCK_TIMEOUT_S = 10.0  # how long a change waits for another to finish
GENESIS_CHAIN = "0" * 64  # what the first version of the audit chain follows
_CHAIN = re.compile(r"[0-9a-f]{64}")


def version_chain(
    previous: str,
    number: int,
    created_at: dt.datetime,
    created_by: str,
    reason: str,
    digest: str,
) -> str:
    """The audit chain's link for a version: SHA-256 of the previous link's 32 bytes and the
    canonical JSON of [number, created_at (ISO 8601 UTC, microseconds), created_by, reason,
    digest]. The digest covers the entries, so a version changed in any part, or one taken
    out from between two others, no longer links. ValueError for a ``previous`` that is not
    a link, or a time without its zone."""
    if not is_chain(previous):
        raise ValueError(f"the previous version's chain {previous!r} is not 64 hex digits")
    if created_at.tzinfo is None or created_at.utcoffset() is None:
        raise ValueError(f"created_at {created_at.isoformat()} has no time zone")
    when = created_at.astimezone(dt.UTC).isoformat(timespec="microseconds")
    canonical = json.dumps(
        [number, when, created_by, reason, digest], separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(bytes.fromhex(previous) + canonical.encode()).hexdigest()


def next_chain(
    where: str,
    newest: int,
    previous: str | None,
    number: int,
    created_at: dt.datetime,
    created_by: str,
    reason: str,
    digest: str,
) -> str:
    """The link of version ``number``, committed over version ``newest`` whose link is
    ``previous`` (None or "" for none: before the audit chain, the chain starts here).
    RegistryRefused when the newest's link is not one: a row changed by hand."""
    try:
        return version_chain(
            previous or GENESIS_CHAIN, number, created_at, created_by, reason, digest
        )
    except ValueError as e:
        raise RegistryRefused(
            f"{where}: cannot commit version {number}: version {newest}'s audit chain is "
            f"broken ({e}); `tabadol registry verify` names what was changed"
        ) from None


def is_chain(text: object) -> bool:
    """Whether ``text`` is a chain link as the stores write it: 64 lowercase hex digits."""
    return isinstance(text, str) and _CHAIN.fullmatch(text) is not None


def number_refused(where: str, number: int | None, newest: int) -> str | None:
    """Why the next version (or version ``number``) cannot be committed over ``newest``;
    None if it can. A number far above the newest is a typo that would use up the numbers
    every later version needs, and versions are never deleted."""
    if number is not None and number <= newest:
        return (
            f"{where}: cannot commit version {number}: the registry's newest version is "
            f"{newest}, and a version number must be above it (--skip-to {newest + 1} or more)"
        )
    if number is not None and number > newest + MAX_SKIP:
        return (
            f"{where}: cannot commit version {number}: that is more than {MAX_SKIP:,} above "
            f"the registry's newest version, {newest} (a typo?); versions are never deleted, "
            "so numbers used up would stay used up: --skip-to only needs to be above the "
            f"highest version any node reports (at most {newest + MAX_SKIP})"
        )
    if (number if number is not None else newest + 1) > MAX_VERSION:
        return (
            f"{where}: cannot commit a version above {newest}: version numbers stop at "
            f"{MAX_VERSION}; a version numbered that high was written past `registry import`"
        )
    return None


def crl_refused(where: str, held: int, number: int) -> str:
    """Why CRL ``number`` cannot be published over ``held``."""
    return (
        f"{where}: the registry holds CRL number {held}; number {number} is not newer "
        "(a CRL only moves forward)"
    )


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
    # The audit chain's link (``version_chain``), computed by the store in the commit's
    # transaction; "" for a version committed before the registry kept one.
    chain: str = ""


@dataclass(frozen=True)
class StoredCrl:
    """A row of the CRL table. Its ``number`` is what the writer said: it counts only when
    the DER's own CRL number says the same and the CA signed it (``registry.crl``)."""

    number: int
    der: bytes
    published_at: dt.datetime
    published_by: str
    id: int = 0  # the row's own, in the order rows were added


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

    def history(self, after: int = 0, limit: int | None = None) -> list[RegistryVersion]:
        """The versions numbered above ``after``, oldest first, at most ``limit`` of them."""
        ...

    def commit(
        self, entries: Entries, by: str, reason: str, digest: str, number: int | None = None
    ) -> RegistryVersion:
        """Store ``entries`` as the next version (or as version ``number``, which must be
        above the newest: RegistryRefused if not), in one transaction, and announce it."""
        ...

    def close(self) -> None: ...


CrlTrusted = Callable[[StoredCrl], bool]


class CrlStore(Protocol):
    """The exchange's CRLs as published: the newest that counts is the current one."""

    def crls(self, above: int | None = None, skip: Collection[int] = ()) -> list[StoredCrl]:
        """The stored CRLs (numbered above ``above``, if given), newest first, but for the
        rows whose id is in ``skip`` (judged already: not read again). Whoever can write the
        table can add any row: the reader decides which count."""
        ...

    def publish_crl(self, der: bytes, number: int, by: str, trusted: CrlTrusted) -> StoredCrl:
        """Store a CRL whose number is above every stored row that ``trusted`` accepts
        (RegistryRefused if not) and announce it, in one transaction. The caller has
        checked it is the CA's."""
        ...


class Announcements(Protocol):
    def announcements(self) -> AsyncIterator[Announcement]:
        """Committed changes as they are announced; RegistryUnavailable when the
        connection is lost (the caller listens again, and polls meanwhile)."""
        ...


class Registry(RegistryStore, CrlStore, Announcements, Protocol):
    """What ``open_registry`` returns."""
