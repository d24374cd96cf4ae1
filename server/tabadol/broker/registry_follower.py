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
import math
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2

from tabadol.config import BrokerConfig
from tabadol.errors import ConfigError, TabadolError
from tabadol.registry.crl import counts
from tabadol.registry.current import with_version
from tabadol.registry.entries import digest, shape_problem
from tabadol.registry.freshness import RegistryFreshness
from tabadol.registry.store import (
    Registry,
    RegistryHead,
    RegistryUnavailable,
    RegistryVersion,
    StoredCrl,
    open_registry,
)
from tabadol.state_files import read_regular, replace_file

if TYPE_CHECKING:
    from tabadol.broker.server import Broker

_STOP_S = 10.0  # how long stop waits for the follower's tasks to end

log = logging.getLogger("tabadol.broker.registry")

_KEEP_TOUCH_S = 60.0  # how often the kept version's "confirmed_at" is rewritten
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
        # The highest version number this node has read in the database in this run (never
        # from the kept file): a head below it is a rollback, not applied.
        self._seen = 0
        self._going_back: tuple[int, str] | None = None  # the head below it, logged once
        self._refused: tuple[int, str] | None = None  # a version this node could not apply
        # Rows of registry_crls judged in this run, by id, never read again: those that do
        # not count under the CA in force (logged once), and those this node refused.
        self._ignored_crls: set[int] = set()
        self._refused_crls: set[int] = set()
        self._ca: tuple[bytes, x509.Certificate] | None = None
        self._reachable = True
        self._last_warning = 0.0
        self._touched = 0.0
        self._refusing = False  # stale under "refuse": health says NOT_SERVING
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._check: asyncio.Task[None] | None = None  # the look at the database under way

    @classmethod
    def for_config(cls, cfg: BrokerConfig) -> RegistryFollower | None:
        """A follower when ``[registry] url`` is set; None for a registry in the file."""
        return cls(cfg, cfg.registry.url) if cfg.registry.url is not None else None

    def _in_force(self) -> tuple[int, str] | None:
        return (self.version.number, self.version.digest) if self.version is not None else None

    def _number_in_force(self) -> str:
        return str(self.version.number) if self.version is not None else "(none)"

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
            version, kept_confirmed_at = kept
            confirmed_at = min(kept_confirmed_at, time.time())  # a future time is no proof
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
        self._seen = current.number  # at a start, the database's version whatever its number
        kept_number = self._kept_number(cfg)
        if kept_number is not None and kept_number > current.number:
            log.warning(
                "registry database %s holds version %d as its newest, below version %d this "
                "node applied before (%s): a restore or failover lost versions? Starting from "
                "the database's version %d. Import the registry you mean to be in force with "
                "`tabadol registry import --skip-to %d` (docs/registry.md)",
                self.store.where, current.number, kept_number, self.kept, current.number,
                kept_number + 1,
            )  # fmt: skip
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
            self._refused = (current.number, current.digest)
            self.version = kept[0]
            # Not current: its age runs from when it last was, so the stale policy bounds it.
            self.freshness.confirmed_at = min(kept[1], time.time())
            self.freshness.behind = self._behind(RegistryHead(current.number, current.digest))
            return self._entries(cfg, kept[0])
        self.version = current
        self._keep(current)
        return applied

    def over(self, cfg: BrokerConfig) -> BrokerConfig:
        """SIGHUP: new local settings with the version in force (the database is asked again
        at once, and a newer version follows; a version or CRL refused is tried again)."""
        self._refused = None
        self._refused_crls.clear()
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
        # The check too (shielded from the loop's timeouts): nothing is applied, nor the kept
        # file written, after stop.
        tasks = [*self._tasks, *([self._check] if self._check is not None else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=_STOP_S)
            for task in done:  # one that had failed already says so (asyncio.wait does not)
                if not task.cancelled() and task.exception() is not None:
                    log.error("registry follower task %s had failed: %r", task.get_name(),
                              task.exception())  # fmt: skip
            if pending:  # never expected: said, and the broker stops regardless
                log.error(
                    "the registry follower did not stop within %g s: %s",
                    _STOP_S,
                    ", ".join(t.get_name() for t in pending),
                )
        self._tasks, self._check = [], None
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
        poll = self.settings.poll_seconds
        last_check = -math.inf
        while True:
            # One look at the database at a time (a hung one shows as a growing age): when a
            # notification (or SIGHUP) wakes the follower, else every poll_seconds.
            idle = self._check is None or self._check.done()
            if idle and (self._wake.is_set() or time.monotonic() - last_check >= poll):
                self._wake.clear()
                last_check = time.monotonic()
                self._check = asyncio.create_task(self.check())
            waiting: Awaitable[Any]
            if self._check is not None and not self._check.done():
                waiting = asyncio.shield(self._check)  # a wake-up now: the next check follows
            else:
                waiting = self._wake.wait()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when a
            # cancellation arrives as the awaited future completes, and the follower, its
            # cancellation swallowed, would then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self.settings.poll_seconds, 1.0)):
                    await waiting
            try:
                self._publish()
                await self._health()
            except Exception:
                log.exception("publishing the registry's state failed; trying again")

    async def check(self) -> None:
        """Ask the database which version is current, and apply it if it differs from the
        one in force (number or digest), unless it goes back; then take a newer CRL."""
        try:
            head = await asyncio.to_thread(self.store.head)
            if head is None or head.number < self._seen:
                self._going_backwards(head)
            else:
                self._seen, self._going_back = head.number, None
                key = (head.number, head.digest)
                if key not in (self._in_force(), self._refused):
                    version = await asyncio.to_thread(self.store.version, head.number)
                    if version is not None:
                        self._apply(version)
            if self._broker is not None:
                held = self._broker.credentials.crl
                self._exchange_ca(self._broker)  # a new CA: rows are judged again
                rows = await asyncio.to_thread(
                    self.store.crls,
                    held.number if held is not None else None,
                    skip=self._ignored_crls | self._refused_crls,
                )
                self._take_newest_crl(rows)
        except RegistryUnavailable as e:
            self._lost(str(e))
            return
        except Exception as e:  # never let the follower die: the age tells the rest
            log.exception("following the registry failed; trying again")
            self._lost(f"registry database {self.store.where}: {type(e).__name__}")
            return
        self._confirmed(head)

    def _going_backwards(self, head: RegistryHead | None) -> None:
        """The database's head is below a version this node has read there: keep serving
        the version in force, and say once per such head what to do."""
        if head is None and self._seen == 0:
            return  # nothing read there yet, nothing there now: nothing to go back from
        key = (head.number, head.digest) if head is not None else (0, "")
        if key == self._going_back:
            return
        self._going_back = key
        log.error(
            "registry database %s says its newest version is %s, below version %d this node "
            "has read there (a restore or a failover that lost versions?): not applied; this "
            "node keeps serving version %s. To move every node on, import the registry you "
            "mean to be in force as a version above %d: `tabadol registry import --config "
            "CONFIG FILE --skip-to %d` (docs/registry.md)",
            self.store.where,
            head.number if head is not None else "none (it holds no version)",
            self._seen,
            self._number_in_force(),
            self._seen,
            self._seen + 1,
        )

    def _apply(self, version: RegistryVersion) -> None:
        broker = self._broker
        assert broker is not None
        try:
            new = self._entries(broker.config, version)  # its shape and digest checked first
            broker.reload(new)
        except TabadolError as e:
            self._refused = (version.number, version.digest)
            log.error(
                "%s refused by this node; version %s keeps serving:\n%s",
                self._label(version.number),
                self._number_in_force(),
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

    def _exchange_ca(self, broker: Broker) -> x509.Certificate:
        pem = broker.credentials.ca_pem
        if self._ca is None or self._ca[0] != pem:
            if self._ca is not None:  # what counted, or not, under the CA before is open again
                self._ignored_crls.clear()
                self._refused_crls.clear()
            self._ca = (pem, x509.load_pem_x509_certificate(pem))
        return self._ca[1]

    def _take_newest_crl(self, rows: list[StoredCrl]) -> None:
        """Of the stored rows not judged yet (newest first), take the first that counts and
        that this node accepts: a row is only what its writer said, so one that is not the
        CA's CRL of that number is passed over, and never read again in this run."""
        broker = self._broker
        assert broker is not None
        for row in rows:
            if counts(row, self._exchange_ca(broker)):
                if self._take_crl(row):
                    return
                continue
            self._ignored_crls.add(row.id)
            log.warning(
                "a row of registry_crls in %s, numbered %d and published by %r, is not the "
                "exchange's CRL of that number (not signed by its CA, or numbered otherwise "
                "in the CRL itself): ignored",
                self.store.where, row.number, row.published_by,
            )  # fmt: skip

    def _take_crl(self, stored: StoredCrl) -> bool:
        """A CRL newer than the one in force goes to crl.pem and is loaded as on SIGHUP, with
        the same checks (the CA's, fresh, never older than one held); refused, crl.pem is
        put back as it was, and False (an older row may still be newer than the one held)."""
        broker = self._broker
        assert broker is not None
        held = broker.credentials.crl
        if held is not None and stored.number <= held.number:
            return True  # nothing older than it is wanted either
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
            self._refused_crls.add(stored.id)
            if before is not None:
                with contextlib.suppress(OSError):
                    replace_file(path, before, 0o644)
            log.error(
                "CRL number %d from %s refused by this node; the CRL in force stays:\n%s",
                stored.number, self.store.where, e,
            )  # fmt: skip
            return False
        log.info(
            "CRL number %d from %s (published by %s) is in force: %d revoked certificates",
            stored.number, self.store.where, stored.published_by, len(broker.credentials.revoked),
        )  # fmt: skip
        return True

    def _confirmed(self, head: RegistryHead | None) -> None:
        """The database answered. The version in force is confirmed current only if it IS
        the database's head: a node that cannot apply the current version (refused, or a
        head gone below what it read) is, for max_age_seconds, not current."""
        now = time.time()
        if not self._reachable:
            log.warning(
                "registry database %s is reachable again after %.0f s; version %s is in force",
                self.store.where,
                self.freshness.age(now),
                self._number_in_force(),
            )
        self._reachable = True
        current = head is not None and (head.number, head.digest) == self._in_force()
        if not current:
            self.freshness.behind = self._behind(head)
            return
        self.freshness.behind = None
        self.freshness.confirm(now)
        if self.version is not None and now - self._touched >= _KEEP_TOUCH_S:
            self._keep(self.version)  # with the time it was confirmed current: now

    def _behind(self, head: RegistryHead | None) -> str:
        """Why the database answers but the version in force is not its current one."""
        if head is None:
            return f"the registry database {self.store.where} holds no version"
        if head.number < self._seen:
            return (
                f"the registry database's newest version, {head.number}, is below version "
                f"{self._seen} this node has read there"
            )
        if (head.number, head.digest) == self._refused:
            return (
                f"this node cannot apply the registry database's current version, "
                f"{head.number} (its log says why)"
            )
        return f"the registry database's current version, {head.number}, is not applied yet"

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
        self.freshness.behind = None  # the outage is the reason now

    def _publish(self) -> None:
        if self._broker is None:
            return
        metrics = self._broker.metrics
        metrics.registry_age.set(self.freshness.age(time.time()))
        metrics.registry_version.set(self.version.number if self.version is not None else 0)
        metrics.registry_refused.set(self._refused[0] if self._refused is not None else 0)

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
        """Keep the version applied beside the ledger (0600), for a start without database,
        with when it was last confirmed current (now: it comes from the database)."""
        now = time.time()
        data: dict[str, Any] = {
            "confirmed_at": now,
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
            self._touched = now
        except OSError as e:
            log.error(
                "cannot keep registry version %d in %s (%s): a start while the database is "
                "unreachable would have to wait for it",
                version.number,
                self.kept,
                e.strerror or e,
            )

    def _read_kept(self, cfg: BrokerConfig) -> tuple[RegistryVersion, float] | None:
        """The version kept and when it was last confirmed current (as the file says: 0, long
        ago, when it does not); None if there is none."""
        try:
            raw = read_regular(self.kept)
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
            confirmed_at = float(data.get("confirmed_at", 0.0))
            if not math.isfinite(confirmed_at):
                confirmed_at = 0.0
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(
                f"{cfg.path}: {self.kept} is not a registry version this node kept ({e})"
            ) from e
        problem = shape_problem(version.entries)
        if problem is not None:
            raise ConfigError(f"{cfg.path}: {self.kept}: {problem}")
        if digest(version.entries) != version.digest:
            raise ConfigError(f"{cfg.path}: {self.kept}: its entries do not match its digest")
        return version, confirmed_at

    def _kept_number(self, cfg: BrokerConfig) -> int | None:
        """The number of the version kept, if a good one is there (for a warning only)."""
        try:
            kept = self._read_kept(cfg)
        except ConfigError:
            return None
        return kept[0].number if kept is not None else None
