"""Whose spans go while a store is over its size cap: one rule for every store (the
``SpanStore.add`` docstring in base.py says it in words). Pure: stores ask it, then delete."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tabadol.ops.ingest import is_broker_sender
from tabadol.ops.store.base import StoreFull

# While over the size cap, each step evicts at least this much of one sender's spans.
EVICT_STEP_BYTES = 16 * 1024


def eviction_target(
    usage: Iterable[tuple[str, int]],
    evictable: Callable[[str], bool],
    *,
    for_broker: bool,
    at_retention: bool,
) -> str | None:
    """Whose spans go next, from each sender's bytes (``usage``) and whether it has any
    spans that may go (``evictable``: received before the batch being stored). The broker's
    spans index every agency's traces: they go only to make room for the broker's own
    (``for_broker``), and then only while no agency (any other sender) holds more than a
    fair share (the store split evenly among its senders); at retention, once no agency's
    are left. Otherwise the agency holding the most. None when no sender may lose any."""
    shares = sorted(((s, n) for s, n in usage if n > 0), key=lambda share: (-share[1], share[0]))
    if not shares:
        return None
    fair = sum(size for _, size in shares) / len(shares)
    others = [(s, size) for s, size in shares if not is_broker_sender(s) and evictable(s)]
    if others and (others[0][1] > fair or not for_broker):
        return others[0][0]
    if not for_broker and not at_retention:
        return None  # never the broker's evidence for an agency's batch
    brokers = [s for s, _ in shares if is_broker_sender(s) and evictable(s)]
    if brokers:
        return brokers[0]
    return others[0][0] if others else None


def eviction_need(used: int, cap: int, counted: int) -> int:
    """How many of a sender's counted bytes to evict in one step while ``used`` is over
    ``cap``: the same share of the ``counted`` bytes as the store is over its cap (a store
    whose ``used`` is more than what it counts frees in proportion), and at least a step."""
    over = (used - cap) / used
    return max(int(counted * over) + 1, EVICT_STEP_BYTES)


def store_full(where: str, cap: int, *, for_broker: bool) -> StoreFull:
    """The refusal of a batch that cannot fit under the cap."""
    whose = "a batch" if for_broker else "an agency's batch"
    return StoreFull(
        f"{where}: {whose} does not fit under the store's size cap of {cap} bytes"
        + ("" if for_broker else " without evicting the broker's spans")
    )
