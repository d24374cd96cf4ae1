"""Authorization: which agency may call which method, under which grant. Deny by default.
Pure."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tabadol.contracts import Contracts


@dataclass(frozen=True, slots=True)
class GrantRule:
    consumer: str
    service: str
    methods: tuple[str, ...]  # method names, or ("*",) for every method of the service
    id: str = ""  # what the ledger records for each call the grant admits
    purpose: str = ""  # the grant's purpose reference (else its text), as the provider reads it
    expires_at: float | None = None  # POSIX seconds: from then on it admits nothing

    def live(self, wall: float) -> bool:
        return self.expires_at is None or wall < self.expires_at


MAX_PURPOSE_HEADER = 1024  # bytes: a provider's gRPC server reads 8 KiB of metadata in all
_SAFE = " !#$&'()*+,/:;=?@[]~"


def purpose_header(reference: str | None, text: str | None) -> str:
    """``x-tabadol-purpose``'s value: the reference, else the text, percent-encoded UTF-8
    (metadata values are ASCII; a purpose is often written in Persian). A longer one is cut
    at a whole character and ends in "...": the grant ``x-tabadol-grant`` names has it all."""
    source = reference or text or ""
    value = urllib.parse.quote(source, safe=_SAFE)
    if len(value) <= MAX_PURPOSE_HEADER:
        return value
    kept: list[str] = []
    size = len("...")
    for char in source:
        part = urllib.parse.quote(char, safe=_SAFE)
        if size + len(part) > MAX_PURPOSE_HEADER:
            break
        kept.append(part)
        size += len(part)
    return "".join(kept) + "..."


class Policy:
    """For each consumer and method path, the grants that allow it; nothing else is allowed.
    A grant past its expiry allows nothing, with no one acting: each call asks at its time."""

    def __init__(self, allowed: Mapping[str, Mapping[str, tuple[GrantRule, ...]]]) -> None:
        self._allowed = allowed

    @classmethod
    def from_grants(cls, grants: Iterable[GrantRule], contracts: Contracts) -> Policy:
        allowed: dict[str, dict[str, list[GrantRule]]] = {}
        for grant in grants:
            service = contracts.services.get(grant.service)
            if service is None:
                continue
            names = service.methods if "*" in grant.methods else grant.methods
            paths = allowed.setdefault(grant.consumer, {})
            for name in names:
                if name in service.methods:
                    paths.setdefault(service.methods[name].path, []).append(grant)
        return cls(
            {
                consumer: {path: tuple(rules) for path, rules in paths.items()}
                for consumer, paths in allowed.items()
            }
        )

    def grant_for(self, consumer: str, method_path: str, wall: float) -> GrantRule | None:
        """The grant that admits this call at ``wall`` (POSIX seconds); None: denied."""
        paths = self._allowed.get(consumer)
        rules = paths.get(method_path) if paths is not None else None
        if rules is None:
            return None
        for rule in rules:
            if rule.expires_at is None or wall < rule.expires_at:
                return rule
        return None

    def allows(self, consumer: str, method_path: str, wall: float) -> bool:
        return self.grant_for(consumer, method_path, wall) is not None

    def allowed_paths(self, consumer: str, wall: float) -> frozenset[str]:
        paths = self._allowed.get(consumer, {})
        return frozenset(p for p, rules in paths.items() if any(r.live(wall) for r in rules))

    def next_expiry(self, consumer: str, wall: float) -> float:
        """When the next of the consumer's grants expires after ``wall``; infinity: none."""
        ends = [
            r.expires_at
            for rules in self._allowed.get(consumer, {}).values()
            for r in rules
            if r.expires_at is not None and r.expires_at > wall
        ]
        return min(ends, default=float("inf"))
