"""The registry in memory, for fast tests: one store per name, shared within the process."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import AsyncIterator, Collection

from tabadol.registry.entries import Entries
from tabadol.registry.store.base import (
    GENESIS_CHAIN,
    Announcement,
    CrlTrusted,
    RegistryHead,
    RegistryRefused,
    RegistryVersion,
    StoredCrl,
    crl_refused,
    number_refused,
    version_chain,
)


class MemoryRegistryStore:
    def __init__(self, where: str = "memory:") -> None:
        self.where = where
        self._versions: list[RegistryVersion] = []
        self._crls: list[StoredCrl] = []  # as published, oldest first
        self._lock = threading.Lock()
        self._listeners: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Announcement]]] = set()

    def head(self) -> RegistryHead | None:
        with self._lock:
            last = self._versions[-1] if self._versions else None
        return RegistryHead(last.number, last.digest) if last is not None else None

    def current(self) -> RegistryVersion | None:
        with self._lock:
            return self._versions[-1] if self._versions else None

    def version(self, number: int) -> RegistryVersion | None:
        with self._lock:
            return next((v for v in self._versions if v.number == number), None)

    def history(self, after: int = 0, limit: int | None = None) -> list[RegistryVersion]:
        with self._lock:
            later = [v for v in self._versions if v.number > after]
        return later if limit is None else later[:limit]

    def commit(
        self, entries: Entries, by: str, reason: str, digest: str, number: int | None = None
    ) -> RegistryVersion:
        with self._lock:
            newest = self._versions[-1].number if self._versions else 0
            refused = number_refused(self.where, number, newest)
            if refused is not None:
                raise RegistryRefused(refused)
            chosen = number if number is not None else newest + 1
            now = dt.datetime.now(dt.UTC)
            previous = self._versions[-1].chain if self._versions else GENESIS_CHAIN
            chain = version_chain(previous, chosen, now, by, reason, digest)
            version = RegistryVersion(chosen, now, by, reason, entries, digest, chain)
            self._versions.append(version)
        self._announce(Announcement("registry", version.number))
        return version

    def crls(self, above: int | None = None, skip: Collection[int] = ()) -> list[StoredCrl]:
        with self._lock:
            rows = list(reversed(self._crls))
        rows.sort(key=lambda c: c.number, reverse=True)  # stable: later rows first on a tie
        return [c for c in rows if (above is None or c.number > above) and c.id not in skip]

    def publish_crl(self, der: bytes, number: int, by: str, trusted: CrlTrusted) -> StoredCrl:
        with self._lock:
            held = next(
                (c for c in sorted(self._crls, key=lambda c: -c.number) if trusted(c)), None
            )
            if held is not None and number <= held.number:
                raise RegistryRefused(crl_refused(self.where, held.number, number))
            stored = StoredCrl(number, der, dt.datetime.now(dt.UTC), by, len(self._crls) + 1)
            self._crls.append(stored)
        self._announce(Announcement("crl", number))
        return stored

    def _announce(self, announcement: Announcement) -> None:
        for loop, queue in list(self._listeners):
            loop.call_soon_threadsafe(queue.put_nowait, announcement)

    async def announcements(self) -> AsyncIterator[Announcement]:
        listener = (asyncio.get_running_loop(), asyncio.Queue[Announcement]())
        self._listeners.add(listener)
        try:
            while True:
                yield await listener[1].get()
        finally:
            self._listeners.discard(listener)

    def close(self) -> None:
        pass


_STORES: dict[str, MemoryRegistryStore] = {}


def memory_store(url: str) -> MemoryRegistryStore:
    """The process's store of that name (``memory://NAME``), made on first use."""
    return _STORES.setdefault(url, MemoryRegistryStore(url))
