"""Calls by purpose: each call a grant admitted, counted under the purpose that grant gave.

Pure: the grants come in as data (``build_quarterly`` reads them from the registry), and the
calls as the ledger's call groups, each naming the grant that admitted it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from tabadol.config import GrantEntry, grant_id
from tabadol.ledger.store.base import CallGroup
from tabadol.status import Code

NO_PURPOSE = "(no purpose recorded)"

Recorded = Literal["purpose", "no purpose", "unknown grant"]


@dataclass(frozen=True)
class GrantPurpose:
    """What a grant says it is for: the legal basis, and its reference if it gave one."""

    purpose: str | None = None
    reference: str | None = None


@dataclass(frozen=True)
class PurposeCalls:
    """The calls to one service that grants with one purpose admitted, and how many succeeded."""

    service: str
    # The grants' purpose; NO_PURPOSE when they gave none; for a grant the registry does not
    # know, its id (``recorded`` says which).
    purpose: str
    reference: str | None
    recorded: Recorded
    grants: tuple[str, ...]  # the ids of the grants whose calls are counted here
    calls: int
    successful: int  # ended with status 0 (OK)


def purposes_of(grants: Iterable[GrantEntry]) -> dict[str, GrantPurpose]:
    """Grant id -> purpose, of grants as the configuration holds them."""
    return {grant_id(g): GrantPurpose(g.purpose, g.purpose_reference) for g in grants}


def purposes_of_entries(
    grants: Iterable[Any], into: dict[str, GrantPurpose] | None = None
) -> dict[str, GrantPurpose]:
    """Grant id -> purpose, of the ``grant`` entries of a registry version as stored, added to
    ``into`` (a later version's purpose replaces an earlier one's). An entry that is no valid
    grant is left out: a version holding it was never in force, so it admitted nothing."""
    found = {} if into is None else into
    for entry in grants:
        if not isinstance(entry, Mapping):
            continue
        given = entry.get("id")
        if isinstance(given, str) and given:  # the usual case: read without validating
            purpose, reference = entry.get("purpose"), entry.get("purpose_reference")
            found[given] = GrantPurpose(
                purpose if isinstance(purpose, str) else None,
                reference if isinstance(reference, str) else None,
            )
            continue
        try:  # a file's grant: its id is derived from the rest, as the broker derives it
            grant = GrantEntry.model_validate(entry)
        except pydantic.ValidationError:
            continue
        found[grant_id(grant)] = GrantPurpose(grant.purpose, grant.purpose_reference)
    return found


def calls_by_purpose(
    groups: Sequence[CallGroup], purposes: Mapping[str, GrantPurpose]
) -> dict[str, tuple[PurposeCalls, ...]]:
    """Per provider: its services' admitted calls (those that name a grant) by purpose, in
    service order, the most called purpose first."""
    rows: dict[tuple[str, str, str, str | None, Recorded], tuple[set[str], list[int]]] = {}
    for g in groups:
        if not g.grant:
            continue
        known = purposes.get(g.grant)
        recorded: Recorded
        if known is None:
            label, reference, recorded = g.grant, None, "unknown grant"
        elif known.purpose is None:
            label, reference, recorded = NO_PURPOSE, known.reference, "no purpose"
        else:
            label, reference, recorded = known.purpose, known.reference, "purpose"
        grants, counts = rows.setdefault(
            (g.provider, g.service, label, reference, recorded), (set(), [0, 0])
        )
        grants.add(g.grant)
        counts[0] += g.calls
        counts[1] += g.calls if g.status_code == Code.OK else 0
    by_provider: dict[str, list[PurposeCalls]] = {}
    for (provider, service, label, reference, recorded), (grants, counts) in rows.items():
        by_provider.setdefault(provider, []).append(
            PurposeCalls(
                service, label, reference, recorded, tuple(sorted(grants)), counts[0], counts[1]
            )
        )
    return {
        provider: tuple(
            sorted(found, key=lambda r: (r.service, -r.calls, r.purpose, r.reference or ""))
        )
        for provider, found in by_provider.items()
    }
