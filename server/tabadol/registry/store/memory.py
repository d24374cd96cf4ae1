"""The registry in memory, for fast tests: one store per name, shared within the process."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import AsyncIterator

from tabadol.registry.entries import Entries
from tabadol.registry.store.base import (
    Announcement,
    RegistryHead,
    RegistryRefused,
    RegistryVersion,
    StoredCrl,
)


class MemoryRegistryStore:
    def __init__(self, where: str = "memory:") -> None:
        self.where = where
        self._versions: list[RegistryVersion] = []
        self._crl: StoredCrl | None = None
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
            return self._versions[number - 1] if 1 <= number <= len(self._versions) else None

    def history(self) -> list[RegistryVersion]:
        with self._lock:
            return list(self._versions)

    def commit(self, entries: Entries, by: str, reason: str, digest: str) -> RegistryVersion:
        with self._lock:
            version = RegistryVersion(
                len(self._versions) + 1, dt.datetime.now(dt.UTC), by, reason, entries, digest
            )
            self._versions.append(version)
        self._announce(Announcement("registry", version.number))
        return version

    def crl(self) -> StoredCrl | None:
        return self._crl

    def publish_crl(self, der: bytes, number: int, by: str) -> StoredCrl:
        with self._lock:
            if self._crl is not None and number <= self._crl.number:
                raise RegistryRefused(
                    f"{self.where}: the registry holds CRL number {self._crl.number}; "
                    f"number {number} is not newer"
                )
            self._crl = StoredCrl(number, der, dt.datetime.now(dt.UTC), by)
            stored = self._crl
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
