"""Calls by protocol: the quarter's transactions by what they came in by (gRPC, Connect or
REST/JSON), so the report shows how much of the exchange the HTTP gateway carries.

Pure: the calls come in as the ledger's call groups, each naming its protocol.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from tabadol.ledger.record import PROTOCOLS
from tabadol.ledger.store.base import CallGroup
from tabadol.status import Code


@dataclass(frozen=True)
class ProtocolCalls:
    """The calls that came in by one protocol, and how many of them failed."""

    protocol: str  # grpc, connect or rest (ledger.record.PROTOCOLS)
    calls: int
    errors: int  # ended with a status other than 0 (OK)
    share: Decimal | None  # of every protocol's calls; None when there were none


def calls_by_protocol(groups: Iterable[CallGroup]) -> tuple[ProtocolCalls, ...]:
    """Per protocol: every one a call can come in by, in PROTOCOLS' order, even with no
    calls; then any other a ledger names, by name."""
    counts: dict[str, list[int]] = {protocol: [0, 0] for protocol in PROTOCOLS}
    for g in groups:
        calls_and_errors = counts.setdefault(g.protocol, [0, 0])
        calls_and_errors[0] += g.calls
        calls_and_errors[1] += g.calls if g.status_code != Code.OK else 0
    total = sum(calls for calls, _ in counts.values())
    order = [*PROTOCOLS, *sorted(counts.keys() - set(PROTOCOLS))]
    return tuple(
        ProtocolCalls(
            protocol,
            counts[protocol][0],
            counts[protocol][1],
            Decimal(counts[protocol][0]) / total if total else None,
        )
        for protocol in order
    )
