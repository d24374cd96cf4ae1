"""Checking a ledger: every record in place, every link intact, every seal genuine. Pure."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tabadol.errors import TabadolError
from tabadol.ledger.record import GENESIS, Seal, StoredRecord, chain_digest
from tabadol.ledger.seal import signature_valid
from tabadol.ledger.sessions import Session
from tabadol.state_files import read_regular


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    seals: int
    position: int | None = None  # the first record (or seal) found wrong
    problem: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"OK: {self.records} records, {self.seals} seals, chain and seals intact"
        where = f" at position {self.position}" if self.position is not None else ""
        return f"BROKEN{where}: {self.problem}"


def verify(
    records: Iterable[StoredRecord],
    seals: Iterable[Seal],
    signers: dict[str, bytes],
    signer_problem: Callable[[bytes, int], str | None],
    anchor: Iterable[Seal] = (),
) -> Verdict:
    """Walk records, seals and the anchor together, once, in order (a ledger of any size).

    Catches an edited record (its digest), a deleted or inserted one (positions and the
    chain), records swapped (the chain), records added at the end (no seal covers them) and
    a truncated tail (a seal, or the anchor file, covers more than remains).

    Seal times never go back along the chain: a seal's signer dates it itself, so a thief of
    a revoked key could back-date one to before the revocation; appended after later seals,
    it shows.
    """
    seal_iter, anchor_iter = iter(seals), iter(anchor)
    pending = next(seal_iter, None)
    witnessed = next(anchor_iter, None)
    running, count, sealed, seal_count = GENESIS, 0, 0, 0
    last_sealed_ns = 0

    def broken(position: int | None, problem: str) -> Verdict:
        return Verdict(False, count, seal_count, position, problem)

    def check_seal(seal: Seal) -> Verdict | None:
        nonlocal witnessed, last_sealed_ns
        if seal.seq != seal_count + 1:
            return broken(None, f"seal {seal_count + 1} is missing (found seal {seal.seq} next)")
        if seal.head_digest != running:
            return broken(
                seal.count, f"seal {seal.seq} does not match the chain at record {seal.count}"
            )
        cert = signers.get(seal.signer)
        if cert is None or not signature_valid(seal, cert):
            return broken(seal.count, f"seal {seal.seq} is not signed by a broker of this exchange")
        # Judged at the seal's own time: a certificate revoked later vouches for what it
        # sealed before; one expired or revoked by then vouches for nothing.
        if why := signer_problem(cert, seal.sealed_ns):
            return broken(
                seal.count, f"seal {seal.seq} is not signed by a broker of this exchange: {why}"
            )
        if seal.sealed_ns < last_sealed_ns:
            return broken(
                seal.count,
                f"seal {seal.seq} is dated {_utc(seal.sealed_ns)}, before seal {seal.seq - 1} "
                f"({_utc(last_sealed_ns)}): seals are made in order, so it was back-dated",
            )
        last_sealed_ns = seal.sealed_ns
        while witnessed is not None and witnessed.seq <= seal.seq:
            if witnessed.seq == seal.seq and witnessed != seal:
                return broken(None, f"seal {seal.seq} differs from what the anchor file witnessed")
            witnessed = next(anchor_iter, None)
        return None

    for stored in records:
        count += 1
        if stored.seq != count:
            what = "missing" if stored.seq > count else "duplicated or out of order"
            return broken(count, f"record {count} is {what} (found position {stored.seq} next)")
        if stored.prev_digest != running:
            return broken(
                count,
                "its link to the previous record is broken (a record before it was changed, removed or inserted)",
            )
        if chain_digest(running, stored.record) != stored.digest:
            return broken(count, "its contents do not match its digest (the record was edited)")
        running = stored.digest
        while pending is not None and pending.count <= count:
            if pending.count < count:
                return broken(pending.count, f"seal {pending.seq} is out of order with the records")
            if problem := check_seal(pending):
                return problem
            seal_count += 1
            sealed = pending.count
            pending = next(seal_iter, None)
    if pending is not None:
        return broken(
            count + 1,
            f"seal {pending.seq} covers {pending.count} records but the ledger holds {count}: records were removed from the end",
        )
    if sealed != count:
        return broken(
            sealed + 1,
            f"records {sealed + 1} to {count} are not covered by any seal (added after the fact)",
        )
    if witnessed is not None:
        return broken(
            count + 1,
            f"the anchor file witnessed seal {witnessed.seq} over {witnessed.count} records, which the ledger no longer has: it was truncated",
        )
    return Verdict(True, count, seal_count)


def chains_missing(
    sessions: Iterable[Session], chains: Iterable[str], chain_for: Callable[[str], str]
) -> list[str]:
    """Nodes that wrote records (their sessions say so) but whose chain is gone whole: a
    deleted chain leaves no broken link behind, so the sessions are its witness."""
    have = set(chains)
    wrote: dict[str, int] = {}
    for s in sessions:
        if s.written:
            chain = chain_for(s.instance)
            wrote[chain] = wrote.get(chain, 0) + s.written
    return [
        f"node {chain or '(the one chain)'} wrote {n} records (its writer sessions say so), "
        "but the ledger holds no chain for it: it was deleted"
        for chain, n in sorted(wrote.items())
        if chain not in have
    ]


def _utc(ns: int) -> str:
    return f"{dt.datetime.fromtimestamp(ns / 1e9, dt.UTC):%Y-%m-%d %H:%M:%S} UTC"


def anchor_path(ledger_path: Path) -> Path:
    """Where the writer appends every seal, outside the database: a witness to ship off-box."""
    return ledger_path.with_name(ledger_path.name + ".seals")


_SEAL_TYPES = {
    "seq": int,
    "count": int,
    "head_digest": str,
    "sealed_ns": int,
    "signer": str,
    "signature": str,
}


def read_anchor(path: Path) -> list[Seal]:
    """The seals the anchor file witnessed. A line that is not a well-formed seal (a write cut
    short by a crash) witnesses nothing; it cannot make the check fail or crash."""
    try:
        data = read_regular(path)
    except FileNotFoundError:
        return []
    except OSError as e:  # a link or a special file where the witness should be
        raise TabadolError(f"{path}: cannot read the anchor file: {e}") from e
    seals = []
    for raw in data.splitlines():
        try:
            fields = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            continue
        if (
            isinstance(fields, dict)
            and fields.keys() - {"chain"} == _SEAL_TYPES.keys()
            and all(type(fields[k]) is t for k, t in _SEAL_TYPES.items())
            and type(fields.get("chain", "")) is str
        ):
            seals.append(Seal(**fields))
    # Several broker processes append to one anchor file: order by chain and position.
    return sorted(seals, key=lambda seal: (seal.chain, seal.seq))
