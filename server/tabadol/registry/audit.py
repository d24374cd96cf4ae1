"""The registry's audit trail checked: each version's entries against its digest, its number
against the one before, and the chain linking it to the version before (``version_chain``).

Pure: the caller hands the versions over oldest first, a page at a time, and prints what
comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tabadol.registry.entries import digest, shape_problem
from tabadol.registry.store.base import GENESIS_CHAIN, RegistryVersion, is_chain, version_chain


@dataclass
class TrailCheck:
    """What ``add``-ing every version, oldest first, has found: one problem a line, each
    naming its version. Versions without a chain at the start were committed before the
    registry kept one; the chain starts at the first version that has one."""

    problems: list[str] = field(default_factory=list)
    versions: int = 0
    before_chain: int = 0  # versions at the start committed before the audit chain
    first_chained: int | None = None
    last: int | None = None  # the newest version's number
    head_chain: str = ""  # the newest version's chain
    _linked: tuple[int, str] | None = None  # the last version with a chain, and its chain

    def add(self, version: RegistryVersion) -> list[str]:
        """Check one more version; the problems it adds."""
        found: list[str] = []
        n = version.number
        if self.last is not None and n <= self.last:
            found.append(f"version {n}: comes after version {self.last}: numbers must go up")
        problem = shape_problem(version.entries)
        if problem is not None:
            found.append(f"version {n}: {problem}")
        elif digest(version.entries) != version.digest:
            found.append(
                f"version {n}: its entries do not match its digest: they were changed after "
                "it was committed"
            )
        found += self._link(version)
        self.versions += 1
        self.last, self.head_chain = n, version.chain
        self.problems += found
        return found

    def _link(self, version: RegistryVersion) -> list[str]:
        n, chain = version.number, version.chain
        if not chain:
            if self._linked is None:
                self.before_chain += 1
                return []
            before, self._linked = self._linked[0], (n, "")  # the next cannot be linked
            return [
                f"version {n}: has no chain, but version {before} before it has: its chain "
                "was removed"
            ]
        if self.first_chained is None:
            self.first_chained = n
        previous = self._linked[1] if self._linked is not None else GENESIS_CHAIN
        after = self._linked
        self._linked = (n, chain)  # the next links to what is stored: one change, one line
        if not is_chain(chain):
            return [f"version {n}: its chain {chain[:80]!r} is not 64 hexadecimal digits"]
        if not is_chain(previous):
            return []  # said at the version before
        expected = version_chain(
            previous, n, version.created_at, version.created_by, version.reason, version.digest
        )
        if chain == expected:
            return []
        if after is None:
            return [
                f"version {n}: its chain does not start the audit chain: version {n} was "
                "changed after it was committed (its number, time, author, reason or digest), "
                "or versions before it were removed"
            ]
        return [
            f"version {n}: its chain does not follow version {after[0]}'s: version {n} was "
            "changed after it was committed (its number, time, author, reason or digest), "
            f"or a version between {after[0]} and {n} was removed"
        ]

    def summary(self, where: str) -> str:
        """The closing line: what was checked, and whether it holds."""
        versions = _count(self.versions, "version")
        if self.problems:
            return f"registry {where}: {versions}, {_count(len(self.problems), 'problem')}"
        if self.last is None:
            return f"registry {where}: no version yet"
        if self.first_chained is None:
            return (
                f"registry {where}: {versions}, all committed before the audit chain (their "
                "entries match their digests); the next version committed starts the chain"
            )
        line = (
            f"registry {where}: {versions}, chain intact to version {self.last} "
            f"(head chain {self.head_chain[:16]})"
        )
        if self.before_chain:
            line += (
                f"; the chain starts at version {self.first_chained}: the "
                f"{_count(self.before_chain, 'version')} before it were committed before the "
                "audit chain"
            )
        return line


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
