"""One contract for every ledger store: memory, SQLite and PostgreSQL answer alike."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tabadol.cli import _seal_signers
from tabadol.ledger import LedgerWriter, verify
from tabadol.ledger.record import GENESIS, Seal
from tabadol.ledger.rollup import WINDOW_NS, bin_of, bin_value
from tabadol.ledger.seal import Sealer, signature_valid
from tabadol.ledger.sessions import CLEAN, Session
from tabadol.ledger.store import LedgerStore, LedgerWriteError, MemoryLedgerStore, SqliteLedgerStore
from tabadol.ledger.store.base import CallGroup
from tabadol.ledger.store.postgres import PostgresLedgerStore
from tabadol.pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN
from tests.test_ledger import record

OpenStore = Callable[[], LedgerStore]  # another handle on the same ledger, as a second node


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    opened: list[LedgerStore] = []
    if request.param == "memory":
        shared = MemoryLedgerStore()

        def make() -> LedgerStore:
            return shared
    elif request.param == "sqlite":

        def make() -> LedgerStore:
            opened.append(SqliteLedgerStore(tmp_path / "ledger.db"))
            return opened[-1]
    else:
        url = request.getfixturevalue("postgres_url")

        def make() -> LedgerStore:
            opened.append(PostgresLedgerStore(url))
            return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def sealer(pki: CertificateAuthority) -> Sealer:
    return Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())


def verdicts(store: LedgerStore, pki: CertificateAuthority) -> dict[str, str]:
    signers = _seal_signers(pki.dir, TRUST_DOMAIN)
    return {
        chain: str(verify(store.records(chain), store.seals(chain), store.signers(), signers))
        for chain in store.chains()
    }


def seal_with(sealer: Sealer, chain: str) -> Callable[[int, int, str], Seal]:
    return lambda seq, count, head: sealer.seal(seq, count, head, time.time_ns(), chain)


def test_an_empty_ledger_has_no_chains_and_the_genesis_head(open_store: OpenStore) -> None:
    store = open_store()
    assert store.chains() == []
    assert store.head(store.chain_for("node-1")) == (0, GENESIS)
    assert store.last_seal(store.chain_for("node-1")) is None
    assert store.records_count() == 0
    assert list(store.records_between(0, 2**63 - 1)) == []


def test_a_sealed_batch_reads_back_in_order_and_verifies(
    open_store: OpenStore, sealer: Sealer, pki: CertificateAuthority
) -> None:
    store = open_store()
    chain = store.chain_for("node-1")
    seal = store.append_sealed(
        [record(i) for i in range(3)], seal_with(sealer, chain), sealer.cert_pem, chain
    )
    assert (seal.seq, seal.count, seal.chain) == (1, 3, chain)
    assert [r.seq for r in store.records(chain)] == [1, 2, 3]
    assert [r.record for r in store.records(chain)] == [record(i) for i in range(3)]
    assert [r.seq for r in store.records(chain, from_seq=3)] == [3]
    assert store.head(chain) == (3, seal.head_digest)
    assert list(store.seals(chain)) == [seal] and store.last_seal(chain) == seal
    assert store.signers() == {sealer.signer: sealer.cert_pem}
    assert store.records_count() == 3
    assert verdicts(store, pki) == {chain: "OK: 3 records, 1 seals, chain and seals intact"}


def test_a_batch_whose_seal_fails_leaves_nothing_behind(
    open_store: OpenStore, sealer: Sealer
) -> None:
    store = open_store()
    chain = store.chain_for("node-1")

    def refuse(seq: int, count: int, head: str) -> Seal:
        raise LedgerWriteError("the key is gone")

    with pytest.raises(LedgerWriteError):
        store.append_sealed([record(1)], refuse, b"x", chain)
    assert store.head(chain) == (0, GENESIS) and store.records_count() == 0
    assert list(store.seals(chain)) == []


def test_each_node_extends_its_own_chain_or_all_share_one_and_every_chain_verifies(
    open_store: OpenStore, sealer: Sealer, pki: CertificateAuthority
) -> None:
    """Three writers at once: memory and PostgreSQL keep a chain per node, SQLite one chain
    in the order of its write lock; either way every record is in a chain that verifies."""
    instances = ("node-1", "node-2", "node-3")
    writers = [
        LedgerWriter(open_store(), sealer, batch_interval_s=0.001, instance=name)
        for name in instances
    ]
    threads = [
        threading.Thread(
            target=lambda w=w, k=k: [w.submit(record(k * 1000 + i)) for i in range(300)]
        )
        for k, w in enumerate(writers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for writer in writers:
        writer.close()
    store = open_store()
    expected_chains = sorted({store.chain_for(name) for name in instances})
    assert store.chains() == expected_chains
    found = verdicts(store, pki)
    assert all(v.startswith("OK: ") for v in found.values()), found
    assert store.records_count() == 900
    assert sum(store.head(chain)[0] for chain in expected_chains) == 900
    assert len(list(store.records_between(0, 2**63 - 1))) == 900


def test_a_seal_cannot_be_moved_to_another_nodes_chain(
    sealer: Sealer, pki: CertificateAuthority
) -> None:
    seal = sealer.seal(1, 3, "ab" * 32, 5, "node-1")
    assert signature_valid(seal, (pki.dir / "broker.crt").read_bytes())
    moved = dataclasses.replace(seal, chain="node-2")
    assert not signature_valid(moved, (pki.dir / "broker.crt").read_bytes())
    assert not signature_valid(
        dataclasses.replace(seal, chain=""), (pki.dir / "broker.crt").read_bytes()
    )


def test_sessions_open_end_and_are_acknowledged(open_store: OpenStore) -> None:
    store = open_store()
    first = Session("s1", "node-1", "batched", "h", 10, "t", opened_ns=1)
    second = Session("s2", "node-2", "strict", "h", 11, "t", opened_ns=2, signer="f")
    store.open_session(second)
    store.open_session(first)
    store.end_session("s1", CLEAN, 5, 7, 7)
    store.acknowledge_session("s2", "ops at noon: restored")
    assert store.sessions() == [
        dataclasses.replace(first, ended=CLEAN, ended_ns=5, accepted=7, written=7),
        dataclasses.replace(second, acknowledged="ops at noon: restored"),
    ]


def _traffic(store: LedgerStore, sealer: Sealer) -> None:
    """Twelve calls on two nodes: durations 1..6 ms to nocr, two refusals, one unavailable,
    one unverified caller, and one call outside the range."""
    ms = 1_000_000
    node_1 = [
        record(i, start_ns=10 * ms + i, end_ns=10 * ms + i + (i + 1) * ms, request_id=f"a{i}")
        for i in range(6)
    ]
    unverified = record(
        13, start_ns=30 * ms, end_ns=31 * ms, endpoint="", status_code=16,
        consumer="mallory", consumer_verified=False, request_id="b3",
    )  # fmt: skip
    node_2 = [
        record(10, start_ns=20 * ms, end_ns=21 * ms, endpoint="", status_code=7, request_id="b0"),
        record(11, start_ns=20 * ms, end_ns=21 * ms, endpoint="", status_code=7, request_id="b1"),
        record(12, start_ns=400 * ms, end_ns=409 * ms, status_code=14, request_id="b2"),
        unverified,
        record(
            14, start_ns=40 * ms, end_ns=42 * ms, consumer="tax", service="t.T", request_id="b4"
        ),
        record(15, start_ns=10**12, end_ns=10**12 + ms, request_id="late"),
    ]
    for name, batch in (("node-1", node_1), ("node-2", node_2)):
        chain = store.chain_for(name)
        store.append_sealed(batch, seal_with(sealer, chain), sealer.cert_pem, chain)


def binned(ns: int) -> int:
    """What a percentile reads for a duration: the midpoint of its histogram bin."""
    return bin_value(bin_of(ns))


def test_the_report_queries_count_every_node_alike(open_store: OpenStore, sealer: Sealer) -> None:
    store = open_store()
    _traffic(store, sealer)
    ms = 1_000_000
    start, end = 0, 10**9
    assert store.count_between(start, end) == 11
    assert store.call_groups(start, end) == [
        CallGroup("mallory", "nocr", "s.S", "M", 16, False, 1, ms, verified=False),
        CallGroup("post", "nocr", "s.S", "M", 0, True, 6, 21 * ms),
        CallGroup("post", "nocr", "s.S", "M", 7, False, 2, 2 * ms),
        CallGroup("post", "nocr", "s.S", "M", 14, True, 1, 9 * ms),
        CallGroup("tax", "nocr", "t.T", "M", 0, True, 1, 2 * ms),
    ]
    # Answered by the provider: not refused, not unavailable.
    answered = [ms, 2 * ms, 2 * ms, 3 * ms, 4 * ms, 5 * ms, 6 * ms]
    assert store.answered_histograms(start, end) == {"nocr": Counter(map(bin_of, answered))}
    # Nearest rank over identified callers, per service: the midpoint of the rank's bin.
    latencies = store.latency_percentiles(start, end, (50, 99))
    assert latencies == {
        "s.S": (9, {50: binned(3 * ms), 99: binned(9 * ms)}),
        "t.T": (1, {50: binned(2 * ms), 99: binned(2 * ms)}),
    }
    assert store.latency_percentiles(start, end, (50,), consumers=["tax"]) == {
        "t.T": (1, {50: binned(2 * ms)})
    }
    # One five-minute window, in which the calls were answered (all but the unavailable one).
    assert store.provider_windows(start, end, WINDOW_NS) == {"nocr": (1, 1)}
    with pytest.raises(ValueError, match="300 s"):
        store.provider_windows(start, end, 100 * ms)
    assert store.records_count() == 12


def test_a_running_writers_session_counts_what_it_wrote_with_each_batch(
    open_store: OpenStore, sealer: Sealer
) -> None:
    """In the batch's own transaction: verify can tell what a node that still runs wrote."""
    store = open_store()
    store.open_session(Session("s1", "node-1", "batched", "h", 10, "t", opened_ns=1))
    chain = store.chain_for("node-1")
    for n in (3, 2):
        batch = [record(i) for i in range(n)]
        store.append_sealed(batch, seal_with(sealer, chain), sealer.cert_pem, chain, "s1")
    assert [s.written for s in store.sessions()] == [5]


def test_seals_wait_for_a_timestamp_in_order_and_each_keeps_its_first_token(
    open_store: OpenStore, sealer: Sealer
) -> None:
    store = open_store()
    chain = store.chain_for("node-1")
    assert store.untimestamped(chain) == [] and store.untimestamped_count(chain) == 0
    seals = [
        store.append_sealed([record(i)], seal_with(sealer, chain), sealer.cert_pem, chain)
        for i in range(1, 5)
    ]
    assert store.untimestamped(chain, limit=2) == seals[:2]
    assert store.untimestamped_count(chain) == 4

    store.add_timestamp(chain, 1, b"token-1", 111)
    store.add_timestamp(chain, 2, b"token-2", 222)
    store.add_timestamp(chain, 2, b"a second token", 333)  # another worker's, later: ignored

    assert store.untimestamped(chain) == seals[2:]
    assert store.untimestamped_count(chain) == 2
    stamps = list(open_store().timestamps(chain))  # another handle sees them
    assert [(s.seal_seq, s.token, s.gen_time_ns) for s in stamps] == [
        (1, b"token-1", 111),
        (2, b"token-2", 222),
    ]
    assert all(s.chain == chain for s in stamps)


def test_timestamps_belong_to_their_nodes_chain(open_store: OpenStore, sealer: Sealer) -> None:
    store = open_store()
    one, two = store.chain_for("node-1"), store.chain_for("node-2")
    for chain in (one, two):
        store.append_sealed([record(1)], seal_with(sealer, chain), sealer.cert_pem, chain)
    store.add_timestamp(one, 1, b"token", 1)
    if one == two:  # SQLite: one chain, whose second seal is the second node's
        assert [s.seq for s in store.untimestamped(two)] == [2]
        return
    assert store.untimestamped_count(one) == 0
    assert [s.seq for s in store.untimestamped(two)] == [1]
    assert list(store.timestamps(two)) == []


def test_a_seal_timestamped_while_the_ledger_cannot_be_written_is_refused(
    sealer: Sealer,
) -> None:
    store = MemoryLedgerStore()  # the store that can be made to fail on demand
    store.append_sealed([record(1)], seal_with(sealer, ""), sealer.cert_pem)
    store.fail = "disk full"
    with pytest.raises(LedgerWriteError, match="disk full"):
        store.add_timestamp("", 1, b"token", 1)
    assert store.untimestamped_count("") == 1
