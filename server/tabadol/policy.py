"""Authorization: which agency may call which method. Deny by default. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tabadol.contracts import Contracts


@dataclass(frozen=True)
class GrantRule:
    consumer: str
    service: str
    methods: tuple[str, ...]  # method names, or ("*",) for every method of the service


class Policy:
    """The set of (consumer, method path) pairs that the grants allow; nothing else is allowed."""

    def __init__(self, allowed: Mapping[str, frozenset[str]]) -> None:
        self._allowed = allowed

    @classmethod
    def from_grants(cls, grants: Iterable[GrantRule], contracts: Contracts) -> Policy:
        allowed: dict[str, set[str]] = {}
        for grant in grants:
            service = contracts.services.get(grant.service)
            if service is None:
                continue
            names = service.methods if "*" in grant.methods else grant.methods
            paths = allowed.setdefault(grant.consumer, set())
            paths.update(service.methods[n].path for n in names if n in service.methods)
        return cls({consumer: frozenset(paths) for consumer, paths in allowed.items()})

    def allows(self, consumer: str, method_path: str) -> bool:
        paths = self._allowed.get(consumer)
        return paths is not None and method_path in paths

    def allowed_paths(self, consumer: str) -> frozenset[str]:
        return self._allowed.get(consumer, frozenset())
