"""Checking a ledger: every record in place, every link intact, every seal genuine. The walk
(``verify``) is pure; ``verify_chain`` spreads it over every core."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tabadol.errors import TabadolError
from tabadol.ledger import rollup
from tabadol.ledger.record import GENESIS, LedgerRecord, Seal, StoredRecord, chain_digest
from tabadol.ledger.seal import signature_valid
from tabadol.ledger.sessions import Session
from tabadol.ledger.store.base import LedgerLog, LedgerStore
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


@dataclass(frozen=True)
class Start:
    """Where a walk of a chain begins: just after seal ``seal_count``, made at ``sealed_ns``,
    which closed record ``count`` with digest ``running``. The default is the beginning."""

    count: int = 0
    running: str = GENESIS
    seal_count: int = 0
    sealed_ns: int = 0

    @classmethod
    def after(cls, seal: Seal) -> Start:
        return cls(seal.count, seal.head_digest, seal.seq, seal.sealed_ns)


def verify(
    records: Iterable[StoredRecord],
    seals: Iterable[Seal],
    signers: dict[str, bytes],
    signer_problem: Callable[[bytes, int], str | None],
    anchor: Iterable[Seal] = (),
    start: Start = Start(),
) -> Verdict:
    """Walk records, seals and the anchor together, once, in order (a ledger of any size).

    Catches an edited record (its digest), a deleted or inserted one (positions and the
    chain), records swapped (the chain), records added at the end (no seal covers them) and
    a truncated tail (a seal, or the anchor file, covers more than remains).

    Seal times never go back along the chain: a seal's signer dates it itself, so a thief of
    a revoked key could back-date one to before the revocation; appended after later seals,
    it shows.

    From a ``start`` other than the beginning, ``records``, ``seals`` and ``anchor`` hold
    only what comes after it: what went before was checked already.
    """
    seal_iter, anchor_iter = iter(seals), iter(anchor)
    pending = next(seal_iter, None)
    witnessed = next(anchor_iter, None)
    running, count, sealed, seal_count = start.running, start.count, start.count, start.seal_count
    last_sealed_ns = start.sealed_ns

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
        try:
            intact = chain_digest(running, stored.record) == stored.digest
        except (TypeError, ValueError):  # a value no record can hold (a blob, say)
            intact = False
        if not intact:
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


# A range worth a worker process: fewer records than this, and one process checks faster.
CHUNK_RECORDS = 50_000


def verify_chain(
    store: LedgerLog,
    signer_problem: Callable[[bytes, int], str | None],
    anchor: Sequence[Seal] = (),
    *,
    chain: str = "",
    start: Start = Start(),
    reader: Callable[[], LedgerLog] | None = None,
    workers: int | None = None,
    chunk_records: int = CHUNK_RECORDS,
    sums: rollup.Rollup | None = None,
) -> Verdict:
    """``verify`` of one chain of a store, from ``start``, with the same verdict, on every core.

    Each sealed batch is checkable on its own given the head of the seal before it, so
    ``workers`` processes (each opening its own handle with ``reader``, a picklable
    callable) check ranges of whole batches while this one checks that they join and that
    each seal is genuine. From the first range or seal found wrong (or if the seals are not
    in order at all), the one-by-one walk takes over from the last good seal: it finds the
    same first break the walk from the beginning would, and words it the same way.

    With ``sums``, the rollup of every record checked is added to it on the way (the
    workers sum their ranges), so checking the rollup rows costs no second read.
    """
    signers = store.signers()
    seals = [seal for seal in store.seals(chain) if seal.seq > start.seal_count]
    witnessed = [seal for seal in anchor if seal.seq > start.seal_count]
    good = start
    if reader is not None and (workers or os.cpu_count() or 1) > 1:
        good = _checked_in_parallel(
            reader, chain, seals, start, signers, signer_problem, witnessed,
            workers or os.cpu_count() or 1, chunk_records, sums,
        )  # fmt: skip
    records = store.records(chain, good.count + 1)
    return verify(
        records if sums is None else _summing(records, sums),
        [seal for seal in seals if seal.seq > good.seal_count],
        signers,
        signer_problem,
        [seal for seal in witnessed if seal.seq > good.seal_count],
        good,
    )


def _checked_in_parallel(
    reader: Callable[[], LedgerLog],
    chain: str,
    seals: list[Seal],
    start: Start,
    signers: dict[str, bytes],
    signer_problem: Callable[[bytes, int], str | None],
    witnessed: list[Seal],
    workers: int,
    chunk_records: int,
    sums: rollup.Rollup | None,
) -> Start:
    """The last seal up to which every record, link and seal checked out, ranges of batches
    checked in worker processes. Stops at the first doubt: the walk then says what it is."""
    chunks: list[list[Seal]] = []
    count, seq = start.count, start.seal_count
    for seal in seals:  # batches in order, each at least one record: else, leave it to the walk
        if seal.seq != seq + 1 or seal.count <= count:
            break
        if not chunks or chunks[-1][-1].count - _first(chunks, start) >= chunk_records:
            chunks.append([])
        chunks[-1].append(seal)
        count, seq = seal.count, seal.seq
    if count - start.count < 2 * chunk_records:
        return start
    by_seq: dict[int, list[Seal]] = {}
    for seal in witnessed:
        by_seq.setdefault(seal.seq, []).append(seal)
    good = start
    context = multiprocessing.get_context("spawn")  # no forked copies of a caller's threads
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
        running = [start.running, *(chunk[-1].head_digest for chunk in chunks[:-1])]
        firsts = [start.count + 1, *(chunk[-1].count + 1 for chunk in chunks[:-1])]
        futures = [
            pool.submit(
                _range_digests,
                reader,
                chain,
                first,
                prev,
                [s.count for s in chunk],
                sums is not None,
            )
            for chunk, first, prev in zip(chunks, firsts, running, strict=True)
        ]
        try:
            for chunk, future in zip(chunks, futures, strict=True):
                checked = future.result()
                if checked is None:
                    return good
                digests, summed = checked
                for seal, digest in zip(chunk, digests, strict=True):
                    if not _seal_holds(seal, digest, good, signers, signer_problem, by_seq):
                        return good
                    good = Start.after(seal)
                if sums is not None and summed is not None:
                    sums.add(summed)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return good


def _first(chunks: list[list[Seal]], start: Start) -> int:
    """The count just before the last chunk's first record."""
    return chunks[-2][-1].count if len(chunks) > 1 else start.count


def _seal_holds(
    seal: Seal,
    digest: str,
    before: Start,
    signers: dict[str, bytes],
    signer_problem: Callable[[bytes, int], str | None],
    witnessed: dict[int, list[Seal]],
) -> bool:
    """Whether ``verify`` would pass ``seal``, closing records whose last digest is ``digest``."""
    cert = signers.get(seal.signer)
    return (
        seal.head_digest == digest
        and cert is not None
        and seal.sealed_ns >= before.sealed_ns
        and signature_valid(seal, cert)
        and signer_problem(cert, seal.sealed_ns) is None
        and all(w == seal for w in witnessed.get(seal.seq, ()))
    )


def _summing(records: Iterable[StoredRecord], sums: rollup.Rollup) -> Iterator[StoredRecord]:
    """``records`` as they are, their rollup added to ``sums`` as they pass, a page at a time."""
    page: list[LedgerRecord] = []
    for stored in records:
        page.append(stored.record)
        if len(page) == 10_000:
            sums.add(rollup.rollup(page))
            page.clear()
        yield stored
    sums.add(rollup.rollup(page))


def _keeping_fields(
    rows: Iterable[tuple[int, str, str, bytes, rollup.RollupFields]],
    fields: list[rollup.RollupFields],
) -> Iterator[tuple[int, str, str, bytes]]:
    for seq, prev, digest, canonical, row_fields in rows:
        fields.append(row_fields)
        yield seq, prev, digest, canonical


def _range_digests(
    reader: Callable[[], LedgerLog],
    chain: str,
    first: int,
    running: str,
    marks: list[int],
    summing: bool = False,
) -> tuple[list[str], rollup.Rollup | None] | None:
    """In a worker: check records ``first`` to ``marks[-1]`` (positions, links, digests)
    from ``running``, the digest before them; the digests at each mark (and, ``summing``,
    the records' rollup), or None at the first doubt. SQLite renders most records'
    canonical bytes itself (canonical_rows)."""
    last = marks[-1]
    try:
        store = reader()
    except Exception:  # the walk opens the ledger too, and says what is wrong with it
        return None
    try:
        digests: list[str] = []
        wanted = iter(marks)
        mark = next(wanted)
        expected = first
        fromhex, sha256 = bytes.fromhex, hashlib.sha256
        rows = getattr(store, "canonical_rows", None)
        both = getattr(store, "canonical_and_rollup_rows", None)
        stream: Iterable[tuple[int, str, str, bytes]]
        fields: list[rollup.RollupFields] | None = None
        if summing and both is not None and not chain:  # the rollup's fields in the same read
            fields = []
            stream = _keeping_fields(both(first, last), fields)
        elif rows is not None and not chain:
            stream = rows(first, last)
        else:
            stream = (
                (r.seq, r.prev_digest, r.digest, r.record.canonical())
                for r in itertools.takewhile(lambda r: r.seq <= last, store.records(chain, first))
            )
        for seq, prev, digest, canonical in stream:
            if seq != expected or prev != running:
                return None
            if sha256(fromhex(running) + canonical).hexdigest() != digest:
                return None
            running = digest
            if seq == mark:
                digests.append(digest)
                mark = next(wanted, 0)
            expected += 1
        if expected != last + 1:
            return None
        if not summing:
            return digests, None
        if fields is not None:
            return digests, rollup.rollup_of_fields(fields)
        upto = itertools.takewhile(lambda r: r.seq <= last, store.records(chain, first))
        return digests, rollup.rollup(stored.record for stored in upto)
    except Exception:  # an odd value, a read error: the walk meets it and says what it is
        return None
    finally:
        store.close()


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


# -- rollups ------------------------------------------------------------------------------

SHOWN_DIFFERENCES = 5  # rollup rows reported as different, at most (then "and more")


def rollup_findings(store: LedgerStore, chain: str, expected: rollup.Rollup) -> list[str]:
    """How a chain's live rollup rows differ from the rollup of its live records
    (``expected``, as verify_chain summed them), first rows first; empty when they match."""
    return _first_differences(store.rollup_rows(chain), expected)


def day_rollup_findings(store: LedgerStore, days: Iterable[int]) -> list[str]:
    """How the rollup rows of some days (every chain's, summed) differ from the rollup of
    those days' live records: a check that costs the records of those days only."""
    chains = store.chains()
    for day in sorted(days):
        bounds = rollup.day_of(day)
        rows = rollup.Rollup()
        for chain in chains:
            rows.add(store.rollup_rows(chain, days=bounds))
        expected = rollup.rollup(stored.record for stored in store.records_between(*bounds))
        if found := _first_differences(rows, expected):
            return found
    return []


def _first_differences(rows: rollup.Rollup, expected: rollup.Rollup) -> list[str]:
    if rows == expected:  # the usual answer, without sorting every row to compare them
        return []
    found = list(itertools.islice(rows.differences(expected), SHOWN_DIFFERENCES + 1))
    shown = [f"the rollup row of {d} (rows != records)" for d in found[:SHOWN_DIFFERENCES]]
    if len(found) > SHOWN_DIFFERENCES:
        shown.append(
            "and more rollup rows differ (`tabadol ledger rollup --rebuild` rebuilds them "
            "from the records, and counts them)"
        )
    return shown
