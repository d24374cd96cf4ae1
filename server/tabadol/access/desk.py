"""Every rule of self-service access, apart from any wire: the broker's Access service and
the ops console's Access page both act through an ``AccessDesk``.

A change reads the registry's current version, applies one action to its entries, checks
the result exactly as a registry file is checked, and commits it as the next version, naming
the actor (its SPIFFE ID, from its verified certificate), the action and its reason. Another
change committed in between makes the commit's number taken: the action is applied again to
the newer version. The version history is the audit trail.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ValidationError

from tabadol.config import (
    ENTRY_SECTIONS,
    OPEN_STATES,
    AgencyEntry,
    BrokerConfig,
    GrantEntry,
    LimitEntry,
    RegistryFile,
    RequestEntry,
    RequestState,
    ServiceEntry,
    check_entries,
    grant_id,
    parse_entries,
)
from tabadol.errors import ConfigError, TabadolError
from tabadol.limits import TokenBucket
from tabadol.registry.entries import Change, diff, digest, entries_data
from tabadol.registry.store import (
    RegistryRefused,
    RegistryStore,
    RegistryUnavailable,
    RegistryVersion,
)
from tabadol.spiffe import agency_spiffe_id, operator_spiffe_id
from tabadol.status import Code

CHANGE_WAIT_S = 10.0  # how long a change waits for this node's others
ATTEMPTS = 8  # commits tried before a change gives up to others racing it (ABORTED)
# Each change is a registry version every node applies: an actor makes at most a burst of
# CHANGE_BURST of them, then one every 60 / CHANGES_PER_MINUTE seconds.
CHANGES_PER_MINUTE = 30
CHANGE_BURST = 30
MAX_OPEN_REQUESTS = 50  # per consumer: each one is a registry version every node applies
MAX_AUDIT_PAGE = 1000

_T = TypeVar("_T")


class AccessError(TabadolError):
    """An action refused: ``code`` says how (the gRPC status), the message says why."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Actor:
    """Who acts: an agency or an operator, as its verified certificate names it."""

    role: Literal["agency", "operator"]
    name: str
    identity: str  # the SPIFFE ID, as the audit trail records it

    @classmethod
    def agency(cls, trust_domain: str, agency_id: str) -> Actor:
        return cls("agency", agency_id, agency_spiffe_id(trust_domain, agency_id))

    @classmethod
    def operator(cls, trust_domain: str, name: str) -> Actor:
        return cls("operator", name, operator_spiffe_id(trust_domain, name))

    def __str__(self) -> str:
        return f"{self.role} {self.name!r}"


@dataclass(frozen=True)
class Snapshot:
    """The registry entries an answer was read from, and their version (0: the file's)."""

    version: int
    entries: RegistryFile

    def provider_of(self, service: str) -> str:
        return next((s.provider for s in self.entries.service if s.name == service), "")


@dataclass(frozen=True)
class Outcome:
    """What a change did, and the registry version that holds it."""

    version: int
    snapshot: Snapshot  # the entries committed as that version: what an answer is read from
    grant: GrantEntry | None = None
    request: RequestEntry | None = None
    revoked: tuple[str, ...] = ()
    findings: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditEntry:
    version: int
    at: dt.datetime
    actor: str
    reason: str
    changes: tuple[Change, ...]
    digest: str
    chain: str = ""


@dataclass
class _Edit:
    """One change's working copy of the entries, and what it says it did."""

    agency: list[AgencyEntry]
    service: list[ServiceEntry]
    grant: list[GrantEntry]
    limit: list[LimitEntry]
    request: list[RequestEntry]
    action: str = ""
    made_grant: GrantEntry | None = None
    made_request: RequestEntry | None = None
    revoked: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, entries: RegistryFile) -> _Edit:
        return cls(
            list(entries.agency),
            list(entries.service),
            list(entries.grant),
            list(entries.limit),
            list(entries.request),
        )

    def entries(self) -> RegistryFile:
        return RegistryFile(**{name: getattr(self, name) for name in ENTRY_SECTIONS})


def _entry(model: type[BaseModel], values: dict[str, Any], what: str) -> Any:
    """An entry built from the action's values, the unset ones left out (as a file would);
    INVALID_ARGUMENT naming the field when a value is not one the registry takes."""
    try:
        return model.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or what}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise AccessError(Code.INVALID_ARGUMENT, f"{what}: {problems}") from None


MAX_TEXT = 2000  # characters of a reason or purpose


def _required(value: str, what: str) -> str:
    value = _bounded(value, what)
    if not value:
        raise AccessError(Code.INVALID_ARGUMENT, f"{what} is required")
    return value


# Line breaks, terminal escapes, NUL and bidirectional overrides would let a text entered
# here rewrite how the audit trail reads; the joiners Persian needs (U+200C, U+200D) stay.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _bounded(value: str, what: str, most: int = MAX_TEXT) -> str:
    value = value.strip()
    if len(value) > most:
        raise AccessError(
            Code.INVALID_ARGUMENT, f"{what} is {len(value)} characters long; at most {most}"
        )
    if found := _CONTROL.search(value):
        raise AccessError(
            Code.INVALID_ARGUMENT,
            f"{what} holds the control character U+{ord(found.group()):04X} at position "
            f"{found.start() + 1}: write it on one line, as plain text",
        )
    return value


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


class AccessDesk:
    """Reads and changes the registry on behalf of an actor, by the rules of docs/access.md.

    ``store`` is the registry database; None when the registry is the configuration file,
    whose entries ``config`` gives: then reads answer from it and changes are refused.
    Synchronous (the stores are): call it from a worker thread in an event loop.
    """

    def __init__(
        self,
        store: RegistryStore | None,
        config: Callable[[], BrokerConfig],
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._budgets: dict[str, TokenBucket] = {}
        self._budgets_lock = threading.Lock()
        self._changing = threading.Lock()

    @property
    def changeable(self) -> bool:
        return self._store is not None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # -- reading ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The registry's current entries: the database's newest version, else the file's."""
        if self._store is None:
            cfg = self._config()
            return Snapshot(
                0,
                RegistryFile(
                    agency=list(cfg.agencies.values()),
                    service=list(cfg.services.values()),
                    grant=list(cfg.grants),
                    limit=list(cfg.limits),
                    request=list(cfg.requests),
                ),
            )
        version = self._read(self._store.current)
        if version is None:
            return Snapshot(0, RegistryFile())
        return Snapshot(version.number, self._parsed(version))

    def grants(
        self, actor: Actor, service: str = "", consumer: str = ""
    ) -> tuple[Snapshot, list[GrantEntry]]:
        """The grants ``actor`` may see: on the services it provides and those it holds; an
        operator, every grant."""
        snap = self._known(actor, self.snapshot())
        shown = [
            g
            for g in snap.entries.grant
            if (not service or g.service == service)
            and (not consumer or g.consumer == consumer)
            and self._party(actor, g.consumer, snap.provider_of(g.service))
        ]
        return snap, sorted(shown, key=lambda g: (g.service, g.consumer, grant_id(g)))

    def requests(
        self, actor: Actor, state: RequestState | None = None, service: str = ""
    ) -> tuple[Snapshot, list[RequestEntry]]:
        """The requests ``actor`` made and those for the services it provides; an operator,
        every request. Oldest first."""
        snap = self._known(actor, self.snapshot())
        shown = [
            r
            for r in snap.entries.request
            if (state is None or r.state == state)
            and (not service or r.service == service)
            and self._party(actor, r.consumer, snap.provider_of(r.service))
        ]
        return snap, sorted(shown, key=lambda r: (r.requested_at, r.id))

    def audit(
        self, actor: Actor, after: int = 0, limit: int = 100
    ) -> tuple[list[AuditEntry], bool]:
        """Operators: the registry versions above ``after``, each with what it changed."""
        self._operator(actor, "read the audit trail")
        return self.trail(after, limit)

    def trail(self, after: int = 0, limit: int = 100) -> tuple[list[AuditEntry], bool]:
        """The audit trail for a reader its caller has judged: the ops console lets
        auditors read it (they act on nothing, so they are no ``Actor``)."""
        store = self._changes_possible("no audit trail to read")
        limit = max(1, min(limit or 100, MAX_AUDIT_PAGE))
        versions = self._read(lambda: store.history(after, limit + 1))
        before = self._read(lambda: store.version(after)) if after > 0 else None
        previous: Any = before.entries if before is not None else {}
        entries = []
        for v in versions[:limit]:
            changes = tuple(diff(previous, v.entries))
            entries.append(
                AuditEntry(
                    v.number,
                    v.created_at,
                    v.created_by,
                    v.reason,
                    changes,
                    v.digest,
                    v.chain,
                )
            )
            previous = v.entries
        return entries, len(versions) > limit

    # -- a provider's and a consumer's changes ---------------------------------------------

    def grant(
        self,
        actor: Actor,
        consumer: str,
        service: str,
        methods: Sequence[str],
        purpose: str,
        reference: str = "",
        expires_at: dt.datetime | None = None,
    ) -> Outcome:
        """Grant ``consumer`` access. On a sensitive service an agency's grant becomes a
        request awaiting an operator."""
        purpose = _required(purpose, "a purpose (the legal basis of the access)")
        reference = _bounded(reference, "the purpose reference", 200)
        self._future(expires_at)

        def edit(e: _Edit, snap: Snapshot) -> None:
            svc = self._service(snap, service)
            self._provider_or_operator(actor, svc, "grant access to")
            self._declared(snap, consumer, "consumer")
            now = self._clock()
            if svc.sensitive and actor.role == "agency":
                request = self._new_request(
                    actor,
                    consumer,
                    service,
                    methods,
                    purpose,
                    reference,
                    expires_at,
                    now,
                    state="awaiting_operator",
                    provider_approved_by=actor.identity,
                )
                e.request.append(request)
                e.made_request = request
                e.action = f"grant {consumer!r} {_methods(methods)} of {service}, awaiting an operator (request {request.id})"
                return
            grant = self._new_grant(
                actor, consumer, service, methods, purpose, reference, expires_at, now
            )
            e.grant.append(grant)
            e.made_grant = grant
            e.action = f"grant {grant.id}: {consumer!r} {_methods(methods)} of {service}"

        return self._change(actor, edit, f"purpose: {purpose}")

    def revoke(self, actor: Actor, grant: str, reason: str) -> Outcome:
        reason = _required(reason, "a reason for the revocation")

        def edit(e: _Edit, snap: Snapshot) -> None:
            found = next((g for g in snap.entries.grant if grant_id(g) == grant), None)
            provider = snap.provider_of(found.service) if found is not None else ""
            if found is None or not self._party(actor, found.consumer, provider):
                raise AccessError(Code.NOT_FOUND, f"no grant {grant!r} {_yours(actor)}")
            if actor.role == "agency" and actor.name != provider:
                raise AccessError(
                    Code.PERMISSION_DENIED,
                    f"only {provider!r}, the provider of {found.service}, or an operator may "
                    f"revoke grant {grant}",
                )
            e.grant = [g for g in e.grant if grant_id(g) != grant]
            e.made_grant = found
            e.revoked.append(grant)
            e.action = f"revoke grant {grant}: {found.consumer!r} on {found.service}"

        return self._change(actor, edit, reason)

    def request(
        self,
        actor: Actor,
        service: str,
        methods: Sequence[str],
        purpose: str,
        reference: str = "",
        expires_at: dt.datetime | None = None,
    ) -> Outcome:
        """``actor`` (an agency) asks the service's provider for access."""
        if actor.role != "agency":
            raise AccessError(
                Code.PERMISSION_DENIED,
                "only an agency requests access, for itself; an operator grants it directly",
            )
        purpose = _required(purpose, "a purpose (the legal basis of the access)")
        reference = _bounded(reference, "the purpose reference", 200)
        self._future(expires_at)

        def edit(e: _Edit, snap: Snapshot) -> None:
            svc = self._service(snap, service)
            if svc.provider == actor.name:
                raise AccessError(
                    Code.INVALID_ARGUMENT,
                    f"agency {actor.name!r} provides {service} itself: it grants access, it "
                    "does not request it",
                )
            open_ = [  # those it asked for itself: a provider's grants awaiting an operator
                r  # are not counted against it
                for r in snap.entries.request
                if r.requested_by == actor.identity and r.state in OPEN_STATES
            ]
            if len(open_) >= MAX_OPEN_REQUESTS:
                raise AccessError(
                    Code.RESOURCE_EXHAUSTED,
                    f"agency {actor.name!r} has {len(open_)} open requests, the most allowed; "
                    "withdraw some, or wait for their answers",
                )
            request = self._new_request(
                actor,
                actor.name,
                service,
                methods,
                purpose,
                reference,
                expires_at,
                self._clock(),
            )
            e.request.append(request)
            e.made_request = request
            e.action = f"request {request.id}: {actor.name!r} asks {svc.provider!r} for {_methods(methods)} of {service}"

        return self._change(actor, edit, f"purpose: {purpose}")

    def approve(self, actor: Actor, request: str, expires_at: dt.datetime | None = None) -> Outcome:
        """The provider approves (or, on a sensitive service, an operator after it): the
        request becomes a grant."""
        self._future(expires_at)

        def edit(e: _Edit, snap: Snapshot) -> None:
            found, svc = self._open_request(actor, snap, request)
            if actor.role == "agency" and actor.name != svc.provider:
                raise AccessError(
                    Code.PERMISSION_DENIED,
                    f"request {request} is for {svc.name}, which {svc.provider!r} provides: only "
                    f"{svc.provider!r} (or an operator) may approve it, not the agency that asked",
                )
            now = self._clock()
            if found.state == "awaiting_operator" and actor.role != "operator":
                raise AccessError(
                    Code.FAILED_PRECONDITION,
                    f"request {request} is approved by its provider and awaits an operator: "
                    f"{svc.name} is a sensitive service",
                )
            if svc.sensitive and found.state == "pending":
                if actor.role == "operator":
                    raise AccessError(
                        Code.FAILED_PRECONDITION,
                        f"request {request} awaits its provider {svc.provider!r} first: on the "
                        "sensitive service both the provider and an operator approve",
                    )
                # The operator approves what the provider did: no longer than it allowed.
                updated = found.model_copy(
                    update={
                        "state": "awaiting_operator",
                        "provider_approved_by": actor.identity,
                        "decided_by": actor.identity,
                        "decided_at": now,
                        "expires_at": expires_at if expires_at is not None else found.expires_at,
                    }
                )
                self._future(updated.expires_at, "the expiry asked for")
                self._replace_request(e, updated)
                e.action = f"approve request {request} as provider; it awaits an operator"
                return
            expiry = expires_at if expires_at is not None else found.expires_at
            if found.state == "awaiting_operator" and found.expires_at is not None:
                expiry = min(expiry or found.expires_at, found.expires_at)
            self._future(expiry, "the expiry asked for")
            grant = self._new_grant(
                actor,
                found.consumer,
                found.service,
                found.methods,
                found.purpose,
                found.purpose_reference or "",
                expiry,
                now,
                request=found.id,
            )
            updated = found.model_copy(
                update={
                    "state": "approved",
                    "decided_by": actor.identity,
                    "decided_at": now,
                    "grant": grant.id,
                }
            )
            self._replace_request(e, updated)
            e.grant.append(grant)
            e.made_grant = grant
            e.action = f"approve request {request}: grant {grant.id} to {found.consumer!r}"

        return self._change(actor, edit, "")

    def reject(self, actor: Actor, request: str, reason: str) -> Outcome:
        reason = _required(reason, "a reason for the rejection")

        def edit(e: _Edit, snap: Snapshot) -> None:
            found, svc = self._open_request(actor, snap, request)
            if actor.role == "agency" and actor.name != svc.provider:
                raise AccessError(
                    Code.PERMISSION_DENIED,
                    f"only {svc.provider!r}, the provider of {svc.name}, or an operator may "
                    f"reject request {request}; the agency that asked may withdraw it",
                )
            self._close(e, found, "rejected", actor, reason)
            e.action = f"reject request {request} of {found.consumer!r}"

        return self._change(actor, edit, reason)

    def withdraw(self, actor: Actor, request: str, reason: str = "") -> Outcome:
        def edit(e: _Edit, snap: Snapshot) -> None:
            found, _ = self._open_request(actor, snap, request)
            if actor.role != "agency" or actor.name != found.consumer:
                raise AccessError(
                    Code.PERMISSION_DENIED,
                    f"only {found.consumer!r}, the agency that asked, may withdraw request "
                    f"{request}",
                )
            self._close(e, found, "withdrawn", actor, _bounded(reason, "the reason") or None)
            e.action = f"withdraw request {request}"

        return self._change(actor, edit, _bounded(reason, "the reason"))

    # -- operators' changes -----------------------------------------------------------------

    def onboard(self, actor: Actor, agency: str, name: str, reason: str = "") -> Outcome:
        self._operator(actor, "onboard an agency")
        entry: AgencyEntry = _entry(AgencyEntry, {"id": agency, "name": name}, "the agency")

        def edit(e: _Edit, snap: Snapshot) -> None:
            if any(a.id == agency for a in snap.entries.agency):
                raise AccessError(Code.ALREADY_EXISTS, f"agency {agency!r} is already declared")
            e.agency.append(entry)
            e.action = f"onboard agency {agency!r} ({name})"

        return self._change(actor, edit, _bounded(reason, "the reason"))

    def publish(
        self,
        actor: Actor,
        name: str,
        provider: str,
        endpoints: Sequence[str],
        *,
        sensitive: bool = False,
        contract_public: bool = False,
        contract: bytes = b"",
        reason: str = "",
    ) -> Outcome:
        """Route a service of the loaded contracts to its provider. With ``contract`` (the
        provider's FileDescriptorSet as built), its changes from the published contract must
        break no consumer."""
        self._operator(actor, "publish a service")
        findings = self._contract_check(name, contract)
        values: dict[str, Any] = {"name": name, "provider": provider, "endpoints": list(endpoints)}
        values |= {"sensitive": sensitive or None, "contract_public": contract_public or None}
        entry: ServiceEntry = _entry(ServiceEntry, values, "the service")

        def edit(e: _Edit, snap: Snapshot) -> None:
            self._declared(snap, provider, "provider")
            known = any(s.name == name for s in snap.entries.service)
            e.service = [s for s in e.service if s.name != name] + [entry]
            e.findings.extend(findings)
            e.action = f"{'republish' if known else 'publish'} service {name} by {provider!r} at {', '.join(endpoints)}"

        return self._change(actor, edit, _bounded(reason, "the reason"))

    def retire(self, actor: Actor, name: str, reason: str) -> Outcome:
        self._operator(actor, "retire a service")
        reason = _required(reason, "a reason for retiring the service")

        def edit(e: _Edit, snap: Snapshot) -> None:
            self._service(snap, name)
            e.service = [s for s in e.service if s.name != name]
            e.revoked.extend(grant_id(g) for g in e.grant if g.service == name)
            e.grant = [g for g in e.grant if g.service != name]
            e.limit = [lim for lim in e.limit if lim.service != name]
            for r in list(e.request):
                if r.service == name and r.state in OPEN_STATES:
                    self._close(e, r, "rejected", actor, f"service retired: {reason}")
            e.action = f"retire service {name}"

        return self._change(actor, edit, reason)

    def set_limit(
        self,
        actor: Actor,
        consumer: str,
        service: str = "",
        *,
        rate: float = 0,
        burst: float = 0,
        concurrency: int = 0,
        clear: bool = False,
        reason: str = "",
    ) -> Outcome:
        self._operator(actor, "set limits")
        scope = service or None
        entry: LimitEntry | None = None
        if not clear:
            values: dict[str, Any] = {"consumer": consumer, "service": scope, "rate": rate or None}
            values |= {"burst": burst or None, "concurrency": concurrency or None}
            entry = _entry(LimitEntry, values, "the limit")

        def edit(e: _Edit, snap: Snapshot) -> None:
            self._declared(snap, consumer, "consumer")
            if scope is not None:
                self._service(snap, scope)
            same = [lim for lim in e.limit if (lim.consumer, lim.service) == (consumer, scope)]
            if clear and not same:
                raise AccessError(
                    Code.NOT_FOUND, f"no limit for {consumer!r} on {scope or 'all services'}"
                )
            e.limit = [lim for lim in e.limit if lim not in same]
            if entry is not None:
                e.limit.append(entry)
            e.action = f"{'clear' if clear else 'set'} the limit of {consumer!r} on {scope or 'all services'}"

        return self._change(actor, edit, _bounded(reason, "the reason"))

    # -- the machinery ----------------------------------------------------------------------

    def _change(self, actor: Actor, action: Callable[[_Edit, Snapshot], None], why: str) -> Outcome:
        store = self._changes_possible("changes are refused")
        self._spend(actor)
        # This process's changes one at a time (they race only other nodes'); a change that
        # cannot get its turn soon gives up rather than hold a worker thread.
        if not self._changing.acquire(timeout=CHANGE_WAIT_S):
            raise AccessError(
                Code.UNAVAILABLE,
                "other changes on this node are still committing; nothing was changed: try again",
            )
        try:
            return self._commit(store, actor, action, why)
        finally:
            self._changing.release()

    def _commit(
        self,
        store: RegistryStore,
        actor: Actor,
        action: Callable[[_Edit, Snapshot], None],
        why: str,
    ) -> Outcome:
        cfg = self._config()
        for attempt in range(ATTEMPTS):
            if attempt:  # another node's change took the number: wait a little, jittered
                time.sleep(random.uniform(0.01, 0.05) * attempt)
            snap = self._known(actor, self.snapshot())
            edit = _Edit.of(snap.entries)
            action(edit, snap)
            edit.request = _pruned(edit.request)
            entries = edit.entries()
            problems = check_entries(
                entries, "the change", cfg.contracts, cfg.broker.max_message_bytes
            )
            if problems:
                raise AccessError(Code.INVALID_ARGUMENT, "\n".join(problems))
            data = entries_data(entries)
            reason = f"{edit.action}: {why}" if why else edit.action
            try:
                committed = store.commit(
                    data, actor.identity, reason, digest(data), number=snap.version + 1
                )
            except RegistryRefused:
                continue  # apply this change to the newer version
            except RegistryUnavailable as e:
                raise AccessError(Code.UNAVAILABLE, str(e)) from None
            return Outcome(
                committed.number,
                Snapshot(committed.number, entries),
                edit.made_grant,
                edit.made_request,
                tuple(edit.revoked),
                tuple(edit.findings),
            )
        raise AccessError(
            Code.ABORTED,
            f"other changes to the registry kept committing first ({ATTEMPTS} tries); "
            "nothing was changed: try again",
        )

    def _spend(self, actor: Actor) -> None:
        now = time.monotonic()
        with self._budgets_lock:
            budget = self._budgets.get(actor.identity)
            if budget is None:
                if len(self._budgets) >= 10_000:
                    self._budgets.clear()
                budget = TokenBucket(CHANGES_PER_MINUTE / 60, CHANGE_BURST, CHANGE_BURST, now)
                self._budgets[actor.identity] = budget
            wait = budget.take(now)
        if wait > 0:
            raise AccessError(
                Code.RESOURCE_EXHAUSTED,
                f"{actor} has made too many changes in a short time (each is a registry "
                f"version every node applies); try again in {wait:.0f} s",
            )

    def _changes_possible(self, what: str) -> RegistryStore:
        if self._store is None:
            path = self._config().path
            raise AccessError(
                Code.FAILED_PRECONDITION,
                f"this exchange's registry is its configuration file {path}, so {what}: edit "
                "the file and reload the broker, or move the registry into a database to "
                "manage access through this service ([registry] url = "
                '"sqlite:///registry.db" for one node, then `tabadol registry import`; '
                "docs/access.md)",
            )
        return self._store

    def _read(self, read: Callable[[], _T]) -> _T:
        try:
            return read()
        except RegistryUnavailable as e:
            raise AccessError(Code.UNAVAILABLE, str(e)) from None

    def _parsed(self, version: RegistryVersion) -> RegistryFile:
        try:
            return parse_entries(version.entries, f"registry version {version.number}")
        except ConfigError as e:
            raise AccessError(Code.INTERNAL, str(e)) from None

    @staticmethod
    def _known(actor: Actor, snap: Snapshot) -> Snapshot:
        if actor.role == "agency" and not any(a.id == actor.name for a in snap.entries.agency):
            raise AccessError(
                Code.PERMISSION_DENIED,
                f"agency {actor.name!r} is not a registered agency of this exchange",
            )
        return snap

    @staticmethod
    def _party(actor: Actor, consumer: str, provider: str) -> bool:
        return actor.role == "operator" or actor.name in (consumer, provider)

    @staticmethod
    def _operator(actor: Actor, what: str) -> None:
        if actor.role != "operator":
            raise AccessError(Code.PERMISSION_DENIED, f"only an operator may {what}, not {actor}")

    @staticmethod
    def _service(snap: Snapshot, name: str) -> ServiceEntry:
        found = next((s for s in snap.entries.service if s.name == name), None)
        if found is None:
            raise AccessError(Code.NOT_FOUND, f"the exchange routes no service {name!r}")
        return found

    @staticmethod
    def _declared(snap: Snapshot, agency: str, what: str) -> None:
        if not any(a.id == agency for a in snap.entries.agency):
            raise AccessError(Code.NOT_FOUND, f"{what} {agency!r} is not a registered agency")

    @staticmethod
    def _provider_or_operator(actor: Actor, svc: ServiceEntry, what: str) -> None:
        if actor.role == "agency" and actor.name != svc.provider:
            raise AccessError(
                Code.PERMISSION_DENIED,
                f"agency {actor.name!r} may not {what} {svc.name}: {svc.provider!r} provides "
                "it, and only a service's provider (or an operator) grants access to it",
            )

    def _future(self, expires_at: dt.datetime | None, what: str = "expires_at") -> None:
        if expires_at is not None and expires_at <= self._clock():
            raise AccessError(
                Code.INVALID_ARGUMENT,
                f"{what} {expires_at.isoformat()} is not in the future"
                + ("; approve with a new expiry (--expires)" if what != "expires_at" else ""),
            )

    def _open_request(
        self, actor: Actor, snap: Snapshot, request: str
    ) -> tuple[RequestEntry, ServiceEntry]:
        found = next((r for r in snap.entries.request if r.id == request), None)
        provider = snap.provider_of(found.service) if found is not None else ""
        if found is None or not self._party(actor, found.consumer, provider):
            raise AccessError(Code.NOT_FOUND, f"no request {request!r} {_yours(actor)}")
        if found.state not in OPEN_STATES:
            raise AccessError(
                Code.FAILED_PRECONDITION, f"request {request} is {found.state}, no longer open"
            )
        return found, self._service(snap, found.service)

    def _close(
        self, e: _Edit, request: RequestEntry, state: RequestState, actor: Actor, reason: str | None
    ) -> None:
        update: dict[str, Any] = {"state": state, "decided_by": actor.identity}
        update |= {"decided_at": self._clock()} | ({"reason": reason} if reason else {})
        self._replace_request(e, request.model_copy(update=update))

    @staticmethod
    def _replace_request(e: _Edit, updated: RequestEntry) -> None:
        e.request = [updated if r.id == updated.id else r for r in e.request]
        e.made_request = updated

    @staticmethod
    def _new_grant(
        actor: Actor,
        consumer: str,
        service: str,
        methods: Sequence[str],
        purpose: str,
        reference: str,
        expires_at: dt.datetime | None,
        now: dt.datetime,
        request: str | None = None,
    ) -> GrantEntry:
        values: dict[str, Any] = {"id": new_id("g"), "consumer": consumer, "service": service}
        values |= {
            "methods": list(methods),
            "purpose": purpose,
            "purpose_reference": reference or None,
        }
        values |= {"expires_at": expires_at, "granted_by": actor.identity, "granted_at": now}
        grant: GrantEntry = _entry(GrantEntry, values | {"request": request}, "the grant")
        return grant

    @staticmethod
    def _new_request(
        actor: Actor,
        consumer: str,
        service: str,
        methods: Sequence[str],
        purpose: str,
        reference: str,
        expires_at: dt.datetime | None,
        now: dt.datetime,
        state: RequestState = "pending",
        provider_approved_by: str | None = None,
    ) -> RequestEntry:
        values: dict[str, Any] = {"id": new_id("r"), "consumer": consumer, "service": service}
        values |= {
            "methods": list(methods),
            "purpose": purpose,
            "purpose_reference": reference or None,
        }
        values |= {"expires_at": expires_at, "state": state, "requested_by": actor.identity}
        values |= {"requested_at": now, "provider_approved_by": provider_approved_by}
        if provider_approved_by is not None:
            values |= {"decided_by": provider_approved_by, "decided_at": now}
        request: RequestEntry = _entry(RequestEntry, values, "the request")
        return request

    def _contract_check(self, name: str, contract: bytes) -> list[str]:
        """The loaded contract's lint findings. With the provider's own contract as built,
        FAILED_PRECONDITION listing each change that would break the published one."""
        from tabadol.governance import breaking_changes
        from tabadol.governance.lint import lint

        contracts = self._config().contracts
        service = contracts.services.get(name)
        if service is None:
            raise AccessError(
                Code.NOT_FOUND,
                f"service {name!r} is not in the broker's loaded contracts: add its .proto to "
                "[broker] contracts and reload every node first",
            )
        published = list(contracts.files.values())
        if contract:
            try:
                proposed = descriptor_pb2.FileDescriptorSet.FromString(contract)
            except DecodeError:
                raise AccessError(
                    Code.INVALID_ARGUMENT, "contract: not a serialized FileDescriptorSet"
                ) from None
            breaking = breaking_changes(published, proposed.file)
            if breaking:
                raise AccessError(
                    Code.FAILED_PRECONDITION,
                    f"the provider's contract breaks the published {name} "
                    f"(`tabadol contracts check`): " + "; ".join(map(str, breaking)),
                )
        return [str(f) for f in lint(published, targets=[service.file])]


KEPT_CLOSED = 20  # answered requests per consumer kept in the entries (all stay in history)


def _pruned(requests: list[RequestEntry]) -> list[RequestEntry]:
    """The requests with, per consumer, only its newest KEPT_CLOSED answered ones: asking and
    withdrawing must not grow every later version for ever; the history keeps them all."""
    closed: dict[str, list[RequestEntry]] = {}
    for r in requests:
        if r.state not in OPEN_STATES:
            closed.setdefault(r.consumer, []).append(r)
    dropped = {
        r.id
        for rs in closed.values()
        for r in sorted(rs, key=lambda r: r.decided_at or r.requested_at)[:-KEPT_CLOSED]
    }
    return [r for r in requests if r.id not in dropped] if dropped else requests


def _methods(methods: Sequence[str]) -> str:
    return "every method" if "*" in methods else ", ".join(methods)


def _yours(actor: Actor) -> str:
    return "in the registry" if actor.role == "operator" else f"that concerns agency {actor.name!r}"
