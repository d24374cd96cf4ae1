"""A broker node following the registry database: the current version at start, then every
committed version within seconds (LISTEN/NOTIFY, polling as the fallback), applied with
``Broker.reload``; and while the database is unreachable, the last good version, its age
and the ``[registry] stale`` policy (docs/registry.md)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2

from tabadol.config import BrokerConfig
from tabadol.errors import ConfigError, TabadolError
from tabadol.registry.current import with_version
from tabadol.registry.entries import digest
from tabadol.registry.freshness import RegistryFreshness
from tabadol.registry.store import (
    Registry,
    RegistryUnavailable,
    RegistryVersion,
    StoredCrl,
    open_registry,
)
from tabadol.state_files import read_regular, replace_file

if TYPE_CHECKING:
    from tabadol.broker.server import Broker

log = logging.getLogger("tabadol.broker.registry")

_KEEP_TOUCH_S = 60.0  # how often the kept version's "last confirmed" time is refreshed
_LOG_EVERY_S = 60.0  # repeated warnings while the database stays unreachable


def kept_registry_path(cfg: BrokerConfig) -> Path:
    """Beside the ledger: the last version this node applied, for a start without database."""
    return cfg.ledger.path.with_name(cfg.ledger.path.name + ".registry.json")


class RegistryFollower:
    """Keeps one broker on the registry database's current version."""

    def __init__(self, cfg: BrokerConfig, url: str) -> None:
        self.settings = cfg.registry
        self.store: Registry = open_registry(url)
        self.kept = kept_registry_path(cfg)
        self.freshness = RegistryFreshness(
            self.settings.max_age_seconds, self.settings.stale, time.time()
        )
        self.version: RegistryVersion | None = None  # the version in force
        self._broker: Broker | None = None
        self._refused: int | None = None  # a version this node could not apply (logged once)
        self._refused_crl: int | None = None
        self._reachable = True
        self._last_warning = 0.0
        self._touched = 0.0
        self._refusing = False  # stale under "refuse": health says NOT_SERVING
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def for_config(cls, cfg: BrokerConfig) -> RegistryFollower | None:
        """A follower when ``[registry] url`` is set; None for a registry in the file."""
        return cls(cfg, cfg.registry.url) if cfg.registry.url is not None else None

    def _in_force(self) -> int | None:
        return self.version.number if self.version is not None else None

    def _label(self, number: int) -> str:
        return f"registry version {number} of {self.store.where}"

    def _entries(self, cfg: BrokerConfig, version: RegistryVersion) -> BrokerConfig:
        """``cfg`` (the local settings) with this version's entries, checked as a file's."""
        return with_version(cfg, version, self.store.where)

    def first(self, cfg: BrokerConfig) -> BrokerConfig:
        """At start: the database's current version, or when the database is unreachable
        the version this node kept; ConfigError when there is neither."""
        try:
            current = self.store.current()
        except RegistryUnavailable as e:
            kept = self._read_kept(cfg)
            if kept is None:
                raise ConfigError(
                    f"{cfg.path}: [registry] url: {e}; and this node has no registry version "
                    f"of its own to start from ({self.kept} does not exist): start it once the "
                    "database is reachable"
                ) from None
            version, confirmed_at = kept
            log.warning(
                "%s; starting from the registry version this node kept, %d (%s, last "
                "confirmed current %s UTC): it follows the database once reachable",
                e, version.number, self.kept,
                f"{dt.datetime.fromtimestamp(confirmed_at, dt.UTC):%Y-%m-%d %H:%M:%S}",
            )  # fmt: skip
            self._reachable = False
            self.freshness.confirmed_at = confirmed_at
            self.version = version
            return self._entries(cfg, version)
        if current is None:
            raise ConfigError(
                f"{cfg.path}: [registry] url: {self.store.where} holds no registry version "
                f"yet: import one with `tabadol registry import --config {cfg.path} FILE`"
            )
        try:
            applied = self._entries(cfg, current)
        except ConfigError as e:
            kept = self._read_kept(cfg)
            if kept is None or kept[0].number == current.number:
                raise ConfigError(
                    f"this node cannot apply the current registry version {current.number}:\n{e}"
                ) from None
            log.error(
                "this node cannot apply the current registry version %d; it starts from the "
                "version it kept, %d:\n%s", current.number, kept[0].number, e,
            )  # fmt: skip
            self._refused = current.number
            self.version = kept[0]
            return self._entries(cfg, kept[0])
        self.version = current
        self._keep(current)
        return applied

    def over(self, cfg: BrokerConfig) -> BrokerConfig:
        """SIGHUP: new local settings with the version in force (the database is asked again
        at once, and a newer version follows)."""
        self._wake.set()
        if self.version is None:
            return cfg
        return self._entries(cfg, self.version)

    async def start(self, broker: Broker) -> None:
        self._broker = broker
        self._publish()
        self._tasks = [
            asyncio.create_task(self._listen_forever()),
            asyncio.create_task(self._follow_forever()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await asyncio.to_thread(self.store.close)

    async def _listen_forever(self) -> None:
        """NOTIFY wakes the follower at once; when the connection is lost, polling goes on."""
        while True:
            try:
                async for _announcement in self.store.announcements():
                    self._wake.set()
            except RegistryUnavailable:
                pass  # the poll reports the database's state
            except Exception:
                log.exception("listening for registry changes failed; polling meanwhile")
            await asyncio.sleep(self.settings.poll_seconds)
            self._wake.set()  # a change may have come while nobody listened

    async def _follow_forever(self) -> None:
        check: asyncio.Task[None] | None = None
        while True:
            # One look at the database at a time: a hung one shows as a growing age.
            if check is None or check.done():
                self._wake.clear()
                check = asyncio.create_task(self.check())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(self.settings.poll_seconds, 1.0))
            try:
                self._publish()
                await self._health()
            except Exception:
                log.exception("publishing the registry's state failed; trying again")

    async def check(self) -> None:
        """Ask the database which version is current, and apply it if it is new."""
        try:
            head = await asyncio.to_thread(self.store.head)
            new = head is not None and head.number not in (self._in_force(), self._refused)
            if new and head is not None:
                version = await asyncio.to_thread(self.store.version, head.number)
                if version is not None:
                    self._apply(version)
            crl = await asyncio.to_thread(self.store.crl)
            if crl is not None:
                self._take_crl(crl)
        except RegistryUnavailable as e:
            self._lost(str(e))
            return
        except Exception as e:  # never let the follower die: the age tells the rest
            log.exception("following the registry failed; trying again")
            self._lost(f"registry database {self.store.where}: {type(e).__name__}")
            return
        self._confirmed()

    def _apply(self, version: RegistryVersion) -> None:
        broker = self._broker
        assert broker is not None
        try:
            if digest(version.entries) != version.digest:
                raise ConfigError(
                    f"{self._label(version.number)}: its entries do not match its digest"
                )
            new = self._entries(broker.config, version)
            broker.reload(new)
        except TabadolError as e:
            self._refused = version.number
            log.error(
                "%s refused by this node; version %s keeps serving:\n%s",
                self._label(version.number),
                self.version.number if self.version is not None else "(none)",
                e,
            )
            return
        before = self.version
        self.version, self._refused = version, None
        self._keep(version)
        log.info(
            "registry version %d applied (was %s), committed %s UTC by %s%s: %d agencies, "
            "%d services, %d grants",
            version.number,
            before.number if before is not None else "none",
            f"{version.created_at.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S}",
            version.created_by,
            f" ({version.reason})" if version.reason else "",
            len(new.agencies),
            len(new.services),
            len(new.grants),
        )

    def _take_crl(self, stored: StoredCrl) -> None:
        """A CRL newer than the one in force goes to crl.pem and is loaded as on SIGHUP, with
        the same checks (the CA's, fresh, never older than one held); refused, crl.pem is
        put back as it was."""
        broker = self._broker
        assert broker is not None
        held = broker.credentials.crl
        if (
            held is not None and stored.number <= held.number
        ) or stored.number == self._refused_crl:
            return
        path = broker.config.broker.pki_dir / "crl.pem"
        try:
            before = path.read_bytes()
        except OSError:
            before = None
        pem = x509.load_der_x509_crl(stored.der).public_bytes(serialization.Encoding.PEM)
        try:
            replace_file(path, pem, 0o644)
            broker.reload(broker.config)
        except (TabadolError, OSError, ValueError) as e:
            self._refused_crl = stored.number
            if before is not None:
                with contextlib.suppress(OSError):
                    replace_file(path, before, 0o644)
            log.error(
                "CRL number %d from %s refused by this node; the CRL in force stays:\n%s",
                stored.number, self.store.where, e,
            )  # fmt: skip
            return
        log.info(
            "CRL number %d from %s (published by %s) is in force: %d revoked certificates",
            stored.number, self.store.where, stored.published_by, len(broker.credentials.revoked),
        )  # fmt: skip

    def _confirmed(self) -> None:
        now = time.time()
        if not self._reachable:
            log.warning(
                "registry database %s is reachable again after %.0f s; version %s is current",
                self.store.where,
                self.freshness.age(now),
                self.version.number if self.version is not None else "(none)",
            )
        self._reachable = True
        self.freshness.confirm(now)
        if now - self._touched >= _KEEP_TOUCH_S:
            self._touched = now
            with contextlib.suppress(OSError):
                os.utime(self.kept)  # its time says when it was last confirmed current

    def _lost(self, why: str) -> None:
        now = time.monotonic()
        if self._reachable or now - self._last_warning >= _LOG_EVERY_S:
            self._last_warning = now
            log.warning(
                "%s; serving registry version %s, last confirmed current %.0f s ago "
                "(max_age_seconds %g, then %s)",
                why,
                self.version.number if self.version is not None else "(none)",
                self.freshness.age(time.time()),
                self.settings.max_age_seconds,
                "calls are refused" if self.settings.stale == "refuse" else "served on",
            )
        self._reachable = False

    def _publish(self) -> None:
        if self._broker is None:
            return
        metrics = self._broker.metrics
        metrics.registry_age.set(self.freshness.age(time.time()))
        metrics.registry_version.set(self.version.number if self.version is not None else 0)

    async def _health(self) -> None:
        """The broker's health ("") is NOT_SERVING while the stale policy refuses calls."""
        broker = self._broker
        if broker is None or broker.drain.active:
            return
        now = time.time()
        refusing = self.freshness.refusal(now) is not None
        if refusing != self._refusing:
            self._refusing = refusing
            if refusing:
                log.error("%s", self.freshness.refusal(now))
            else:
                log.warning("the registry is fresh again: calls are served")
            await broker.health.servicer.set(
                "",
                health_pb2.HealthCheckResponse.NOT_SERVING
                if refusing
                else health_pb2.HealthCheckResponse.SERVING,
            )
        elif (
            self.freshness.stale(now)
            and self.settings.stale == "serve"
            and time.monotonic() - self._last_warning >= _LOG_EVERY_S
        ):
            self._last_warning = time.monotonic()
            log.warning(
                "the registry version in force was last confirmed current %.0f s ago, more "
                'than max_age_seconds %g; serving on with it ([registry] stale = "serve")',
                self.freshness.age(now),
                self.settings.max_age_seconds,
            )

    def _keep(self, version: RegistryVersion) -> None:
        """Keep the version applied beside the ledger (0600), for a start without database."""
        data: dict[str, Any] = {
            "database": self.store.where,
            "version": version.number,
            "created_at": version.created_at.isoformat(),
            "created_by": version.created_by,
            "reason": version.reason,
            "digest": version.digest,
            "entries": version.entries,
        }
        try:
            self.kept.parent.mkdir(parents=True, exist_ok=True)
            replace_file(self.kept, json.dumps(data, indent=1).encode(), 0o600)
            self._touched = time.time()
        except OSError as e:
            log.error(
                "cannot keep registry version %d in %s (%s): a start while the database is "
                "unreachable would have to wait for it",
                version.number,
                self.kept,
                e.strerror or e,
            )

    def _read_kept(self, cfg: BrokerConfig) -> tuple[RegistryVersion, float] | None:
        """The version kept and when it was last confirmed current; None if there is none."""
        try:
            raw = read_regular(self.kept)
            confirmed_at = os.stat(self.kept).st_mtime
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ConfigError(
                f"{cfg.path}: cannot read the registry version this node kept, {self.kept}: "
                f"{e.strerror or e}"
            ) from e
        try:
            data = json.loads(raw)
            version = RegistryVersion(
                int(data["version"]),
                dt.datetime.fromisoformat(data["created_at"]),
                str(data["created_by"]),
                str(data["reason"]),
                data["entries"],
                str(data["digest"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{cfg.path}: {self.kept} is not a registry version this node kept ({e})"
            ) from e
        if digest(version.entries) != version.digest:
            raise ConfigError(f"{cfg.path}: {self.kept}: its entries do not match its digest")
        return version, confirmed_at
