"""Registry entries as data: their digest, what changes between two versions, and TOML.

Pure: no database, no files. Entries are kept as JSON-shaped dicts, the five lists of a
registry file (``agency``, ``service``, ``grant``, ``limit``, ``request``) as the operator wrote them.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import tomli_w

from tabadol.config import ENTRY_SECTIONS, RegistryFile

Entries = dict[str, list[dict[str, Any]]]
_KEYS = {"agency": ("id",), "service": ("name",), "grant": ("consumer", "service")}
_KEYS["limit"] = ("consumer", "service")
_KEYS["request"] = ("id",)


def entries_data(entries: RegistryFile) -> Entries:
    """What a version stores: each entry's keys as written (defaults left out)."""
    return {
        name: [e.model_dump(mode="json", exclude_unset=True) for e in getattr(entries, name)]
        for name in ENTRY_SECTIONS
    }


def shape_problem(data: object) -> str | None:
    """What keeps ``data`` (JSON as stored) from being entries, a table of the sections to
    lists of tables; None when nothing does. Checked before ``digest``, which needs that."""
    if not isinstance(data, Mapping):
        return f"its entries are {_kind(data)}, not a table of {', '.join(ENTRY_SECTIONS)}"
    for section in ENTRY_SECTIONS:
        entries = data.get(section, [])
        if not isinstance(entries, list):
            return f"its {section!r} is {_kind(entries)}, not a list of [[{section}]] entries"
        for n, entry in enumerate(entries, 1):
            if not isinstance(entry, Mapping):
                return f"its [[{section}]] #{n} is {_kind(entry)}, not a table"
    return None


def _kind(value: object) -> str:
    names = {dict: "a table", list: "a list", str: "a string", bool: "a boolean"}
    names |= {int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def digest(data: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """SHA-256 of the entries in a canonical JSON form: equal entries, equal digest."""
    canonical = json.dumps(
        {name: list(data.get(name, [])) for name in ENTRY_SECTIONS},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Change:
    """One entry added, removed or changed (then ``fields`` names what changed)."""

    kind: Literal["added", "removed", "changed"]
    section: str
    key: str
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        sign = {"added": "+", "removed": "-", "changed": "~"}[self.kind]
        text = f"{sign} [[{self.section}]] {self.key}"
        return text + (f": {', '.join(self.fields)}" if self.fields else "")


def _keyed(section: str, entries: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    keyed: dict[str, Mapping[str, Any]] = {}
    seen: Counter[str] = Counter()
    for entry in entries:
        # A grant made through the Access service is known by its id, as the ledger knows it.
        keys = ("id",) if section == "grant" and entry.get("id") else _KEYS[section]
        parts = [entry.get(k) for k in keys]
        key = " ".join(repr(p) if p is not None else "(all services)" for p in parts)
        seen[key] += 1
        keyed[key if seen[key] == 1 else f"{key} #{seen[key]}"] = entry
    return keyed


def _describe(section: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[str, ...]:
    fields = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if isinstance(old, list) and isinstance(new, list):
            gone = [str(v) for v in old if v not in new]
            came = [str(v) for v in new if v not in old]
            fields.append(
                f"{name} " + " ".join([*(f"-{v}" for v in gone), *(f"+{v}" for v in came)])
            )
        else:
            fields.append(f"{name} {_short(old)} -> {_short(new)}")
    return tuple(fields)


def _short(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value, ensure_ascii=False)


def diff(
    before: Mapping[str, Sequence[Mapping[str, Any]]],
    after: Mapping[str, Sequence[Mapping[str, Any]]],
) -> list[Change]:
    """Per entry, what turns ``before`` into ``after``, in section order."""
    changes: list[Change] = []
    for section in ENTRY_SECTIONS:
        old = _keyed(section, before.get(section, []))
        new = _keyed(section, after.get(section, []))
        for key in old.keys() - new.keys():
            changes.append(Change("removed", section, key))
        for key in new.keys() - old.keys():
            changes.append(Change("added", section, key))
        for key in old.keys() & new.keys():
            if old[key] != new[key]:
                changes.append(
                    Change("changed", section, key, _describe(section, old[key], new[key]))
                )
    order = {"removed": 0, "changed": 1, "added": 2}
    return sorted(changes, key=lambda c: (ENTRY_SECTIONS.index(c.section), order[c.kind], c.key))


def summary(changes: Sequence[Change]) -> str:
    """One line: how many entries of each section were added, removed or changed."""
    if not changes:
        return "no change"
    counts = Counter((c.section, c.kind) for c in changes)
    parts = []
    for section in ENTRY_SECTIONS:
        kinds = [
            f"{counts[section, kind]} {kind}"
            for kind in ("added", "removed", "changed")
            if counts[section, kind]
        ]
        if kinds:
            parts.append(f"{section}: {', '.join(kinds)}")
    return "; ".join(parts)


def to_toml(data: Mapping[str, Sequence[Mapping[str, Any]]], header: str = "") -> str:
    """The entries as a registry TOML file that `tabadol registry import` takes back."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    tables = {section: list(data[section]) for section in ENTRY_SECTIONS if data.get(section)}
    return comments + ("\n" if comments and tables else "") + tomli_w.dumps(tables)
