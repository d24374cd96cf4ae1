"""The ledger on PostgreSQL: a chain per broker node, verified per node, read together,
and failing closed while the database is away."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
import psycopg
import pytest

from tabadol import config
from tabadol.broker import Broker
from tabadol.cli import main
from tabadol.client import connect
from tabadol.database import describe, transport_problem
from tabadol.errors import ConfigError, TabadolError
from tabadol.ledger import LedgerWriter, rollup
from tabadol.ledger.record import FIELD_NAMES, LedgerRecord, Seal
from tabadol.ledger.seal import Sealer, signed_by
from tabadol.ledger.store import CallGroup, LedgerWriteError
from tabadol.ledger.store.postgres import PostgresLedgerStore
from tabadol.ops.store import open_span_store
from tabadol.pki import CertificateAuthority
from tests.conftest import DEFAULT_GRANTS, RunningProvider, broker_toml
from tests.support.echo import UNARY
from tests.support.exchange import eventually
from tests.support.postgres import PostgresCluster
from tests.test_ledger import record

# What a node's role needs beyond docs/deployment.md's first grants: it adds each batch's
# rollup to its chain's rows.
NODE_ROLLUP_TABLES = "ledger_rollup_groups, ledger_rollup_provider_days"


def node_config(
    directory: Path, pki: CertificateAuthority, contracts: Path, endpoint: str, url: str,
    instance: str, ledger: str = "",
) -> Path:  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "broker.toml"
    path.write_text(
        broker_toml(
            pki_dir=pki.dir, contracts=contracts, endpoints=[endpoint],
            grants=DEFAULT_GRANTS,
            extra_broker=f'instance = "{instance}"',
        )
        + f'\n[ledger]\npath = "ledger.db"\nurl = "{url}"\nbatch_interval_ms = 10\n{ledger}\n'
    )  # fmt: skip
    return path


@pytest.fixture
async def two_nodes(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    postgres_url: str,
) -> AsyncIterator[list[Broker]]:
    brokers = []
    for name in ("node-1", "node-2"):
        path = node_config(
            tmp_path / name, pki, echo_contracts, echo_provider.address, postgres_url, name
        )
        broker = Broker(config.load(path))
        await broker.start()
        brokers.append(broker)
    try:
        yield brokers
    finally:
        for broker in brokers:
            await broker.stop(0)


async def call_each(brokers: list[Broker], pki: CertificateAuthority, calls: int) -> None:
    for broker in brokers:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            for _ in range(calls):
                assert await channel.unary_unary(UNARY)(b"hi", timeout=10) == b"hi"


async def test_each_node_keeps_its_own_chain_and_verify_reports_every_node(
    two_nodes: list[Broker], pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    await call_each(two_nodes, pki, 3)
    for broker in two_nodes:
        await broker.stop(0)
    config_path = str(two_nodes[0].config.path)
    assert main(["ledger", "verify", "--config", config_path]) == 0
    out = capsys.readouterr().out
    assert "node node-1: OK: 3 records" in out and "node node-2: OK: 3 records" in out
    assert "password" not in out
    # Export and reports read every node's records together.
    assert main(["ledger", "export", "--config", config_path, "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["broker_instance"] for r in rows) == ["node-1"] * 3 + ["node-2"] * 3


async def verify_tampered(
    nodes: list[Broker], pki: CertificateAuthority, url: str,
    capsys: pytest.CaptureFixture[str], *statements: str,
) -> str:  # fmt: skip
    """Two calls through each node, the nodes stopped, the database tampered with by
    ``statements``: what `ledger verify` prints (it must fail)."""
    await call_each(nodes, pki, 2)
    for broker in nodes:
        await broker.stop(0)
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)
    assert main(["ledger", "verify", "--config", str(nodes[0].config.path)]) == 1
    return capsys.readouterr().out


async def test_an_edited_record_breaks_only_its_nodes_chain(
    two_nodes: list[Broker], pki: CertificateAuthority, postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = await verify_tampered(
        two_nodes, pki, postgres_url, capsys,
        "UPDATE ledger_records SET status_code = 5 WHERE chain = 'node-2' AND seq = 2",
    )  # fmt: skip
    assert "node node-1: OK: 2 records" in out
    assert "node node-2: BROKEN at position 2" in out


async def test_a_nodes_chain_deleted_whole_is_caught_by_its_writer_sessions(
    two_nodes: list[Broker], pki: CertificateAuthority, postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = await verify_tampered(
        two_nodes, pki, postgres_url, capsys,
        *(f"DELETE FROM {t} WHERE chain = 'node-2'" for t in ("ledger_records", "ledger_seals", "ledger_chains")),
    )  # fmt: skip
    assert "node node-1: OK: 2 records" in out
    assert "node node-2 wrote 2 records" in out and "it was deleted" in out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://tabadol:s3cret@db1:5432,db2:5433/t",
            "postgresql://tabadol@db1:5432,db2:5433/t",
        ),
        ("postgresql://tabadol@db1,db2/t", "postgresql://tabadol@db1:5432,db2:5432/t"),
        ("postgresql://tabadol:s3cret@[::1/t", "postgresql://(an invalid URL)"),
    ],
)
def test_a_database_is_named_host_by_host_and_never_with_its_password(url: str, shown: str) -> None:
    assert describe(url) == shown
    assert "s3cret" not in (transport_problem(url) or "")


def test_an_unreachable_database_is_named_without_its_password() -> None:
    url = "postgresql://tabadol:s3cret@127.0.0.1:1/ledger"
    assert describe(url) == "postgresql://tabadol@127.0.0.1:1/ledger"
    with pytest.raises(Exception) as err:
        PostgresLedgerStore(url, connect_timeout_s=1)
    assert "postgresql://tabadol@127.0.0.1:1/ledger" in str(err.value)
    assert "s3cret" not in str(err.value)


def test_a_broker_does_not_start_on_a_ledger_database_it_cannot_reach(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    path = node_config(
        tmp_path, pki, echo_contracts, "127.0.0.1:1", "postgresql://u:pw@127.0.0.1:1/x", "n"
    )
    with pytest.raises(Exception) as err:
        Broker(config.load(path))
    assert "[ledger] url" in str(err.value) and "127.0.0.1:1" in str(err.value)
    assert "pw" not in str(err.value).replace("postgresql", "")


async def test_a_stopped_database_fails_calls_closed_and_everything_catches_up_after(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    own_postgres: PostgresCluster,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Batched mode: calls go on while records wait (up to max_unwritten_seconds), then the
    node refuses new calls with a status that names the ledger; when the database is back
    the backlog is written and the chain verifies."""
    url = own_postgres.create_database()
    path = node_config(
        tmp_path, pki, echo_contracts, echo_provider.address, url, "node-1",
        ledger="max_unwritten_seconds = 1",
    )  # fmt: skip
    broker = Broker(config.load(path))
    await broker.start()
    answered = 0
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            echo = channel.unary_unary(UNARY)
            assert await echo(b"before", timeout=10) == b"before"
            answered += 1
            own_postgres.stop("immediate")
            assert await echo(b"during", timeout=10) == b"during"  # within the bound
            answered += 1
            assert await eventually(lambda: not broker.ledger.accepting, 30)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await echo(b"refused", timeout=10)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "ledger cannot be written" in (err.value.details() or "")
            # The waiting records are safe in the node's journal meanwhile.
            journal = tmp_path / "ledger.db.journal"
            assert await eventually(lambda: journal.exists() and journal.stat().st_size > 0, 30)
            own_postgres.start()
            assert await eventually(
                lambda: broker.ledger.problem is None and broker.ledger.accepting, 30
            )
            assert await echo(b"after", timeout=10) == b"after"
            answered += 1
    finally:
        await broker.stop()
    assert main(["ledger", "verify", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"node node-1: OK: {answered} records" in out


async def test_strict_mode_fails_each_call_closed_while_the_database_is_away(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    own_postgres: PostgresCluster,
) -> None:
    url = own_postgres.create_database()
    path = node_config(
        tmp_path, pki, echo_contracts, echo_provider.address, url, "node-1",
        ledger='mode = "strict"\nmax_unwritten_seconds = 1',
    )  # fmt: skip
    broker = Broker(config.load(path))
    await broker.start()
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            echo = channel.unary_unary(UNARY)
            assert await echo(b"before", timeout=10) == b"before"
            own_postgres.stop("immediate")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await echo(b"during", timeout=20)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "ledger" in (err.value.details() or "")
            own_postgres.start()
            assert await eventually(
                lambda: broker.ledger.problem is None and broker.ledger.accepting, 30
            )
            assert await echo(b"after", timeout=10) == b"after"
    finally:
        await broker.stop()
    store = PostgresLedgerStore(url, readonly=True)
    try:
        assert store.chains() == ["node-1"]
    finally:
        store.close()


def test_writers_of_one_node_take_turns_on_its_chain(
    postgres_url: str, pki: CertificateAuthority
) -> None:
    """Workers of one node share its name: the chain's row lock orders their batches."""
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    writers = [
        LedgerWriter(
            PostgresLedgerStore(postgres_url), sealer, batch_interval_s=0.001, instance="n"
        )
        for _ in range(2)
    ]
    for i in range(400):
        writers[i % 2].submit(record(i))
    for writer in writers:
        writer.close()
    store = PostgresLedgerStore(postgres_url, readonly=True)
    try:
        assert store.chains() == ["n"] and store.head("n")[0] == 400
        assert [r.seq for r in store.records("n")] == list(range(1, 401))
    finally:
        store.close()


def test_readers_work_through_a_url_that_asks_for_the_primary(
    postgres_url: str, pki: CertificateAuthority
) -> None:
    """Readers (verify, export, reports) open read-only sessions; libpq's
    target_session_attrs must still take the server for a writable primary."""
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    writer = LedgerWriter(PostgresLedgerStore(postgres_url), sealer, instance="n")
    writer.submit(record(1))
    writer.close()
    for attrs in ("read-write", "primary"):
        reader = PostgresLedgerStore(f"{postgres_url}?target_session_attrs={attrs}", readonly=True)
        try:
            assert reader.head("n")[0] == 1
            with pytest.raises(LedgerWriteError, match="read-only"):
                reader.open_session(writer.session)
        finally:
            reader.close()


def test_a_node_role_that_does_not_own_the_tables_writes_once_they_exist(
    tmp_path: Path, postgres_url: str, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    """The DBA (or a first start as the owner) makes the tables; a node's own role needs
    only to read and write rows, not to own them."""
    owner = node_config(tmp_path, pki, echo_contracts, "127.0.0.1:1", postgres_url, "owner")
    assert main(["ledger", "init", "--config", str(owner)]) == 0  # the owner makes the schema
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE ROLE node_writer LOGIN")
        # As docs/deployment.md grants it: records and seals are only ever added.
        conn.execute(
            "GRANT SELECT, INSERT ON ledger_records, ledger_seals, ledger_signers TO node_writer"
        )
        conn.execute(
            "GRANT SELECT, INSERT, UPDATE ON ledger_chains, ledger_sessions, "
            f"{NODE_ROLLUP_TABLES} TO node_writer"
        )
        conn.execute("GRANT SELECT ON ledger_archived TO node_writer")
    node_url = postgres_url.replace("postgres@", "node_writer@", 1)
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    writer = LedgerWriter(PostgresLedgerStore(node_url), sealer, instance="n")
    writer.submit(record(1))
    writer.close()
    with psycopg.connect(node_url, autocommit=True) as conn:
        for statement in ("DELETE FROM ledger_records", "UPDATE ledger_records SET seq = 9"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # it can change no record


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("postgresql://tabadol@127.0.0.1:5432/t", True),
        ("postgresql://tabadol@[::1]:5432/t", True),
        ("postgresql://tabadol@localhost/t", True),
        ("postgresql:///t?host=/var/run/postgresql", True),
        ("postgresql://tabadol@db.exchange.example/t", False),
        ("postgresql://tabadol@db.exchange.example/t?sslmode=require", False),
        ("postgresql://tabadol@db.exchange.example/t?sslmode=verify-full", True),
        ("postgresql://tabadol@127.0.0.1,10.0.0.5/t", False),
        (
            "postgresql://tabadol@10.0.0.4,10.0.0.5/t?sslmode=verify-full&target_session_attrs=primary",
            True,
        ),
    ],
)
def test_a_database_on_another_host_must_be_reached_over_verified_tls(
    url: str, allowed: bool, tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    """The ledger's records, the registry's grants and the spans cross to the database: on
    another host, only over TLS that verifies its name; the refusal says what to set."""
    path = node_config(tmp_path, pki, echo_contracts, "127.0.0.1:1", url, "node-1")
    if allowed:
        assert config.load(path).ledger.url == url
        return
    with pytest.raises(ConfigError, match="sslmode=verify-full") as err:
        config.load(path)
    assert "[ledger] url" in str(err.value)
    with pytest.raises(TabadolError, match="sslmode=verify-full"):
        open_span_store(url)


def test_with_one_role_per_node_each_node_writes_its_own_chain_only(
    tmp_path: Path, postgres_url: str, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    """docs/deployment.md's per-node roles: a node whose role is named as its instance
    writes its chain; a node configured under another's name is refused by the database."""
    owner = node_config(tmp_path, pki, echo_contracts, "127.0.0.1:1", postgres_url, "owner")
    assert main(["ledger", "init", "--config", str(owner), "--one-role-per-node"]) == 0
    # Roles belong to the whole server, which other tests share: names of this test's own.
    suffix = postgres_url.rsplit("_", 1)[1]
    group, node_1, node_2 = f"ledger_{suffix}", f"node-1-{suffix}", f"node-2-{suffix}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {group} NOLOGIN")
        conn.execute(
            f"GRANT SELECT, INSERT ON ledger_records, ledger_seals, ledger_signers TO {group}"
        )
        conn.execute(
            "GRANT SELECT, INSERT, UPDATE ON ledger_chains, ledger_sessions, "
            f"{NODE_ROLLUP_TABLES} TO {group}"
        )
        conn.execute(f"GRANT SELECT ON ledger_archived TO {group}")
        for node in (node_1, node_2):
            conn.execute(f'CREATE ROLE "{node}" LOGIN IN ROLE {group}')
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    as_node_1 = postgres_url.replace("postgres@", f"{node_1}@", 1)
    writer = LedgerWriter(PostgresLedgerStore(as_node_1), sealer, instance=node_1)
    writer.submit(record(1))
    writer.close()
    with pytest.raises(LedgerWriteError, match="row-level security"):
        LedgerWriter(PostgresLedgerStore(as_node_1), sealer, instance=node_2)
    fields = ", ".join(f'"{name}"' for name in FIELD_NAMES)  # "grant" is a reserved word
    with psycopg.connect(as_node_1, autocommit=True) as conn:
        # Records are added by COPY, which row-level security does not allow: a trigger.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="its own chain"):
            conn.execute(
                f"INSERT INTO ledger_records SELECT '{node_2}', seq + 100, "
                f"{fields}, prev_digest, digest FROM ledger_records"
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO ledger_chains (chain) VALUES (%s)", (node_2,))
    reader = PostgresLedgerStore(postgres_url, readonly=True)
    try:
        assert reader.chains() == [node_1] and reader.head(node_1)[0] == 1
    finally:
        reader.close()


# -- rollups and archives on PostgreSQL ---------------------------------------------------


def make_role(url: str, role: str, *grants: str) -> str:
    """A login role with these grants, named after the test's database (roles are the
    whole server's); its URL."""
    name = f"{role}-{url.rsplit('_', 1)[1]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{name}" LOGIN')
        for grant in grants:
            conn.execute(grant.format(role=f'"{name}"'))
    return url.replace("postgres@", f"{name}@", 1)


DAY_NS = 86_400 * 10**9
# A Tehran midnight in 2025 (no daylight saving since 2022: every day is 24 h long).
FIRST_DAY = rollup.day_of(rollup.to_ns(dt.datetime(2025, 3, 10, 12, tzinfo=dt.UTC)))[0]


def traffic(seed: int, n: int) -> list[LedgerRecord]:
    """``n`` calls over three days, of several consumers, providers, statuses and lengths."""
    rng = random.Random(seed)
    calls = []
    for i in range(n):
        start = FIRST_DAY + rng.randrange(3 * DAY_NS)
        status = rng.choice((0, 0, 0, 5, 7, 14))
        calls.append(
            record(
                i, start_ns=start, end_ns=start + rng.randrange(10**5, 10**9),
                consumer=rng.choice(("post", "tax", "")), provider=rng.choice(("nocr", "sabt")),
                status_code=status, endpoint="" if status == 7 else "10.0.0.1:1",
                consumer_verified=rng.random() > 0.1, request_id=f"{seed}-{i}",
            )
        )  # fmt: skip
    return calls


def seal_with(sealer: Sealer, chain: str) -> Callable[[int, int, str], Seal]:
    return lambda seq, count, head: sealer.seal(seq, count, head, time.time_ns(), chain)


def chain_sealer(pki: CertificateAuthority) -> Sealer:
    return Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())


def append(
    store: PostgresLedgerStore, sealer: Sealer, chain: str, batch: list[LedgerRecord]
) -> Seal:
    return store.append_sealed(batch, seal_with(sealer, chain), sealer.cert_pem, chain)


def assert_queries_match_records(
    store: PostgresLedgerStore, records: list[LedgerRecord], start: int, end: int
) -> None:
    """The store's report queries over [start, end) answer as the records themselves do."""
    expected = rollup.rollup(r for r in records if start <= r.start_ns < end)
    assert store.count_between(start, end) == sum(t.calls for t in expected.groups.values())
    groups: dict[tuple[str, str, str, str, int, bool, bool], list[int]] = {}
    for k, t in expected.groups.items():
        key = (k.consumer, k.provider, k.service, k.method, k.status_code, k.forwarded, k.verified)
        totals = groups.setdefault(key, [0, 0])
        totals[0] += t.calls
        totals[1] += t.duration_ns
    assert store.call_groups(start, end) == [
        CallGroup(c, p, s, m, code, fwd, n, d, v)
        for (c, p, s, m, code, fwd, v), (n, d) in sorted(groups.items())
    ]
    answered: dict[str, rollup.Histogram] = {}
    for k, t in expected.groups.items():
        if k.forwarded and k.status_code != 14:
            rollup.add_histogram(answered.setdefault(k.provider, {}), t.histogram)
    assert store.answered_histograms(start, end) == answered
    per_service: dict[str, rollup.Histogram] = {}
    for k, t in expected.groups.items():
        if k.verified and k.consumer in ("", "tax"):
            rollup.add_histogram(per_service.setdefault(k.service, {}), t.histogram)
    assert store.latency_percentiles(start, end, (50, 99), consumers=["tax"]) == {
        s: (sum(h.values()), rollup.percentiles(h, (50, 99))) for s, h in per_service.items()
    }
    windows: dict[str, tuple[int, int]] = {}
    for day_key, day in expected.provider_days.items():
        seen, answering = windows.get(day_key.provider, (0, 0))
        windows[day_key.provider] = (
            seen + sum(calls > 0 for calls, _ in day.windows.values()),
            answering + sum(ok > 0 for _, ok in day.windows.values()),
        )
    assert store.provider_windows(start, end, rollup.WINDOW_NS) == windows


def test_two_nodes_writing_at_once_keep_exact_rollups(
    postgres_url: str, pki: CertificateAuthority
) -> None:
    """Each node adds its batches' rollups to its own chain's rows in the batch's
    transaction; read together, they answer every query as the records do, whole days from
    rollups and the edges of a range from records."""
    sealer = chain_sealer(pki)
    written = {"node-1": traffic(1, 600), "node-2": traffic(2, 600)}
    failures: list[BaseException] = []

    def write(chain: str) -> None:
        store = PostgresLedgerStore(postgres_url)
        try:
            for i in range(0, 600, 40):
                append(store, sealer, chain, written[chain][i : i + 40])
        except BaseException as e:  # reported below, in the test's own thread
            failures.append(e)
        finally:
            store.close()

    threads = [threading.Thread(target=write, args=(chain,)) for chain in written]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == [] and not any(t.is_alive() for t in threads)
    reader = PostgresLedgerStore(postgres_url, readonly=True)
    try:
        for chain in written:
            assert reader.rollup_rows(chain) == rollup.rollup(written[chain])
            assert reader.rollup_rows(chain, archived=True) == rollup.Rollup()
        second_day = (FIRST_DAY + DAY_NS, FIRST_DAY + 2 * DAY_NS)
        assert reader.rollup_rows("node-1", days=second_day) == rollup.rollup(
            r for r in written["node-1"] if second_day[0] <= r.start_ns < second_day[1]
        )
        everything = [*written["node-1"], *written["node-2"]]
        for start, end in (
            (FIRST_DAY, FIRST_DAY + 3 * DAY_NS),  # whole days only
            (FIRST_DAY + 7 * 3600 * 10**9, FIRST_DAY + 2 * DAY_NS + 5 * 10**9),  # edges too
            (FIRST_DAY + DAY_NS + 1, FIRST_DAY + DAY_NS + 3600 * 10**9),  # inside one day
        ):
            assert_queries_match_records(reader, everything, start, end)
    finally:
        reader.close()


def test_a_batch_and_its_rollup_commit_together_or_not_at_all(
    postgres_url: str, pki: CertificateAuthority
) -> None:
    sealer = chain_sealer(pki)
    store = PostgresLedgerStore(postgres_url)
    try:
        first = append(store, sealer, "n", [record(1)])
        before = store.rollup_rows("n")
        assert before == rollup.rollup([record(1)])
        # The COPY fails (PostgreSQL's text holds no NUL): no rollup change either.
        with pytest.raises(LedgerWriteError):
            append(store, sealer, "n", [record(2), record(3, consumer="po\x00st")])
        # The seal cannot be inserted (its number is taken): the same.
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO ledger_seals SELECT chain, 2, count, head_digest, sealed_ns, signer, "
                "signature FROM ledger_seals WHERE chain = 'n'"
            )
        with pytest.raises(LedgerWriteError, match="ledger_seals"):
            append(store, sealer, "n", [record(4)])
        assert store.rollup_rows("n") == before
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("DELETE FROM ledger_seals WHERE chain = 'n' AND seq = 2")
            # And the other way: the rollup cannot be written, so neither are the records.
            conn.execute(  # record(5)'s duration is record(1)'s: their bin would hold 2
                "ALTER TABLE ledger_rollup_provider_days "
                "ADD CONSTRAINT one_call CHECK (histogram NOT LIKE '%,2]]')"
            )
        with pytest.raises(LedgerWriteError, match="one_call"):
            append(store, sealer, "n", [record(5)])
        assert store.head("n") == (1, first.head_digest) and store.last_seal("n") == first
        assert [r.seq for r in store.records("n")] == [1]
        assert store.rollup_rows("n") == before
    finally:
        store.close()


FORGED_ROWS = {
    "ledger_rollup_groups": (
        "%s, false, 0, 'x', 'x', 'x', 'x', 0, true, true, '', 'grpc', 1, 1, 1, 1, '[]'"
    ),
    "ledger_rollup_provider_days": (
        "%s, false, 0, 'x', '[[0,1,1]]', B'1'::bit(300), B'1'::bit(300), '[]'"
    ),
}
ZEROED = {"ledger_rollup_groups": "calls = 0", "ledger_rollup_provider_days": "windows = '[]'"}


def test_one_role_per_node_keeps_each_node_to_its_own_rollup_rows_and_records(
    tmp_path: Path, postgres_url: str, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    """A node's role adds to its own chain's live rollup rows only: it cannot change another
    node's, nor archived ones, nor note an archive; even granted DELETE on records (which
    docs/deployment.md does not grant), it removes none: archiving is the owner's."""
    owner = node_config(tmp_path, pki, echo_contracts, "127.0.0.1:1", postgres_url, "owner")
    assert main(["ledger", "init", "--config", str(owner), "--one-role-per-node"]) == 0
    group = make_role(
        postgres_url, "ledger",
        "GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}",
        f"GRANT UPDATE ON ledger_chains, ledger_sessions, {NODE_ROLLUP_TABLES} TO {{role}}",
        f"GRANT DELETE ON ledger_records, ledger_seals, {NODE_ROLLUP_TABLES} TO {{role}}",
    )  # fmt: skip
    group_name = group.split("://", 1)[1].split("@", 1)[0]
    suffix = postgres_url.rsplit("_", 1)[1]
    node_a, node_b = f"node-a-{suffix}", f"node-b-{suffix}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for node in (node_a, node_b):
            conn.execute(f'CREATE ROLE "{node}" LOGIN IN ROLE "{group_name}"')
    sealer = chain_sealer(pki)
    calls = {node_a: traffic(1, 50), node_b: traffic(2, 50)}
    for node, batch in calls.items():
        store = PostgresLedgerStore(postgres_url.replace("postgres@", f"{node}@", 1))
        try:
            sealed = append(store, sealer, node, batch)
        finally:
            store.close()
    as_b = postgres_url.replace("postgres@", f"{node_b}@", 1)
    with psycopg.connect(as_b, autocommit=True) as conn:
        for table in ("ledger_rollup_groups", "ledger_rollup_provider_days"):
            changed = conn.execute(
                f"UPDATE {table} SET {ZEROED[table]} WHERE chain = %s", (node_a,)
            )
            assert changed.rowcount == 0  # not its chain: no row to change
            removed = conn.execute(f"DELETE FROM {table} WHERE chain = %s", (node_a,))
            assert removed.rowcount == 0
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # another's chain
                conn.execute(f"INSERT INTO {table} VALUES ({FORGED_ROWS[table]})", (node_a,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # archived rows
                conn.execute(f"UPDATE {table} SET archived = true WHERE chain = %s", (node_b,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # even its own chain's
                conn.execute(
                    f"INSERT INTO {table} VALUES ({FORGED_ROWS[table].replace('false', 'true', 1)})",
                    (node_b,),
                )
        for chain in (node_a, node_b):  # granted DELETE or not: archiving is the owner's
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="owner's"):
                conn.execute("DELETE FROM ledger_records WHERE chain = %s", (chain,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "INSERT INTO ledger_archived VALUES (%s, 1, 1, '', 0, '', '', 0, '', '', '', '')",
                (node_b,),
            )
    # Archiving is the tables' owner's: a node's role cannot remove even its own records.
    store = PostgresLedgerStore(as_b)
    try:
        with pytest.raises(LedgerWriteError, match="owner's"):
            store.remove_archived(node_b, sealed, 1, "archive", sealer.sign, sealer.cert_pem)
    finally:
        store.close()
    reader = PostgresLedgerStore(postgres_url, readonly=True)
    try:
        for node, batch in calls.items():
            assert reader.rollup_rows(node) == rollup.rollup(batch)
            assert reader.head(node)[0] == 50
    finally:
        reader.close()
    store = PostgresLedgerStore(postgres_url)  # the owner, whom the rules do not bind
    try:
        store.remove_archived(node_b, sealed, 1, "archive", sealer.sign, sealer.cert_pem)
        assert store.rollup_rows(node_b, archived=True) == rollup.rollup(calls[node_b])
        assert store.rollup_rows(node_a) == rollup.rollup(calls[node_a])
    finally:
        store.close()


def test_removing_an_archived_prefix_keeps_the_chain_going(
    postgres_url: str, pki: CertificateAuthority
) -> None:
    sealer = chain_sealer(pki)
    calls = traffic(3, 300)
    store = PostgresLedgerStore(postgres_url)
    try:
        seals = [append(store, sealer, "n", calls[i : i + 100]) for i in (0, 100, 200)]
        store.add_timestamp("n", 1, b"token", 1)
        whole_days = (FIRST_DAY, FIRST_DAY + 3 * DAY_NS)
        noted = store.remove_archived(
            "n", seals[1], 123, "n-1.tar sha256:ab", sealer.sign, sealer.cert_pem
        )
        assert store.archived("n") == noted
        assert (noted.seal, noted.archived_ns, noted.archive, noted.certificate) == (
            seals[1], 123, "n-1.tar sha256:ab", sealer.cert_pem,
        )  # fmt: skip
        assert noted.rollup_sha256 == store.rollup_rows("n", archived=True).digest()
        assert signed_by(noted.statement(), noted.signature, sealer.cert_pem)
        assert [r.seq for r in store.records("n")] == list(range(201, 301))
        assert list(store.seals("n")) == [seals[2]] and list(store.timestamps("n")) == []
        assert store.untimestamped_count("n") == 1 and store.records_count() == 100
        # The removed records' rollup moved to the archived rows: reports still count them.
        assert store.rollup_rows("n") == rollup.rollup(calls[200:])
        assert store.rollup_rows("n", archived=True) == rollup.rollup(calls[:200])
        assert_queries_match_records(store, calls, *whole_days)
        # Refused: a prefix already archived, a seal the chain does not hold as given.
        with pytest.raises(LedgerWriteError, match="already"):
            store.remove_archived("n", seals[0], 124, "again", sealer.sign, sealer.cert_pem)
        forged = dataclasses.replace(seals[2], signature="00")
        with pytest.raises(LedgerWriteError, match="holds no seal 3"):
            store.remove_archived("n", forged, 124, "forged", sealer.sign, sealer.cert_pem)
        assert store.head("n")[0] == 300 and store.rollup_rows("n") == rollup.rollup(calls[200:])
        # The chain goes on from its head, across the archive.
        more = traffic(4, 10)
        fourth = append(store, sealer, "n", more)
        assert (fourth.seq, fourth.count) == (4, 310)
        assert [r.seq for r in store.records("n", from_seq=300)] == list(range(300, 311))
        assert list(store.records("n"))[100].prev_digest == seals[2].head_digest
        # Everything archived: the chain is still listed, and still goes on.
        store.remove_archived("n", fourth, 125, "n-2.tar sha256:cd", sealer.sign, sealer.cert_pem)
        assert list(store.records("n")) == [] and store.chains() == ["n"]
        assert store.last_seal("n") == fourth and store.untimestamped_count("n") == 0
        assert store.head("n") == (310, fourth.head_digest)
        assert store.rollup_rows("n") == rollup.Rollup()
        assert store.rollup_rows("n", archived=True) == rollup.rollup([*calls, *more])
        assert_queries_match_records(store, [*calls, *more], *whole_days)
        assert (append(store, sealer, "n", [record(1)]).seq, store.head("n")[0]) == (5, 311)
    finally:
        store.close()


def test_a_ledger_written_before_rollups_gets_them_from_ledger_init(
    tmp_path: Path, postgres_url: str, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    """`ledger init` (the tables' owner) builds the rollups from the records in the
    transaction that makes their tables; a node's role, which may not, refuses to start."""
    calls = traffic(5, 200)
    write_two_chains(postgres_url, pki, calls, 120)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE ledger_rollup_groups, ledger_rollup_provider_days")
    node = make_role(
        postgres_url, "node-1", "GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}"
    )
    with pytest.raises(LedgerWriteError, match="ledger init"):
        PostgresLedgerStore(node)
    with pytest.raises(LedgerWriteError, match="written before rollups"):
        PostgresLedgerStore(postgres_url, readonly=True)
    owner = node_config(tmp_path, pki, echo_contracts, "127.0.0.1:1", postgres_url, "owner")
    assert main(["ledger", "init", "--config", str(owner)]) == 0
    reader = PostgresLedgerStore(postgres_url, readonly=True)
    try:
        assert reader.rollup_rows("node-1") == rollup.rollup(calls[:120])
        assert reader.rollup_rows("node-2") == rollup.rollup(calls[120:])
        assert_queries_match_records(reader, calls, FIRST_DAY, FIRST_DAY + 3 * DAY_NS)
    finally:
        reader.close()


def test_ledger_init_builds_a_missing_provider_days_table_from_the_records(
    tmp_path: Path, postgres_url: str, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    """A ledger whose provider-day rollups are missing (dropped, or from before them):
    `ledger init` builds them from the records, in one transaction, confined to each node's
    chain as the group rows already were; the group rows it finds stay as they are."""
    owner = node_config(tmp_path, pki, echo_contracts, "127.0.0.1:1", postgres_url, "owner")
    assert main(["ledger", "init", "--config", str(owner), "--one-role-per-node"]) == 0
    calls = traffic(6, 200)
    write_two_chains(postgres_url, pki, calls, 90)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE ledger_rollup_provider_days")
        conn.execute("UPDATE ledger_rollup_groups SET calls = calls + 1 WHERE chain = 'node-2'")
    assert main(["ledger", "init", "--config", str(owner)]) == 0
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT relrowsecurity, "
            "(SELECT count(*) FROM pg_policies WHERE tablename = relname) "
            "FROM pg_class WHERE relname = 'ledger_rollup_provider_days'"
        ).fetchone()
    assert tables == (True, 4)  # read, add own, move own, remove own
    reader = PostgresLedgerStore(postgres_url, readonly=True)
    try:
        for chain, written in (("node-1", calls[:90]), ("node-2", calls[90:])):
            found, expected = reader.rollup_rows(chain), rollup.rollup(written)
            assert found.provider_days == expected.provider_days
            assert (found == expected) is (chain == "node-1")  # groups were not rebuilt
        assert reader.provider_windows(FIRST_DAY, FIRST_DAY + 3 * DAY_NS, rollup.WINDOW_NS) == (
            reader_windows(calls)
        )
    finally:
        reader.close()


def reader_windows(records: list[LedgerRecord]) -> dict[str, tuple[int, int]]:
    """Availability windows counted from records: per provider, windows with forwarded
    calls and windows with an answer."""
    answered: dict[str, dict[int, bool]] = {}
    for r in records:
        if r.endpoint:
            windows = answered.setdefault(r.provider, {})
            w = r.start_ns // rollup.WINDOW_NS
            windows[w] = windows.get(w, False) or r.status_code != 14
    return {p: (len(w), sum(w.values())) for p, w in answered.items()}


def test_a_tampered_mask_survives_later_batches_for_verify_to_find(
    postgres_url: str, pki: CertificateAuthority
) -> None:
    """A batch changes a provider day's masks only at the windows it touches (as on SQLite):
    a mask changed by hand elsewhere in the day is not silently repaired by the next batch,
    and the rows read back say so."""
    sealer = chain_sealer(pki)
    morning = FIRST_DAY + 3600 * 10**9
    first = [record(1, start_ns=morning, end_ns=morning + 10**6, provider="nocr")]
    later = [record(2, start_ns=morning + 6 * 3600 * 10**9, end_ns=morning + 6 * 3600 * 10**9 + 1)]
    store = PostgresLedgerStore(postgres_url)
    try:
        append(store, sealer, "n", first)
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("UPDATE ledger_rollup_provider_days SET answered_mask = B'0'::bit(300)")
        append(store, sealer, "n", later)
        rows = store.rollup_rows("n")
        assert rows != rollup.rollup(first + later)
        found = list(rows.differences(rollup.rollup(first + later)))
        assert len(found) == 1 and "masks" in found[0] and " of nocr: " in found[0]
        # The availability the report reads is the tampered one: verify is what catches it.
        day = (FIRST_DAY, FIRST_DAY + DAY_NS)
        assert store.provider_windows(*day, rollup.WINDOW_NS) == {"nocr": (2, 1)}
        store.rebuild_rollup("n")
        assert store.rollup_rows("n") == rollup.rollup(first + later)
        assert store.provider_windows(*day, rollup.WINDOW_NS) == {"nocr": (2, 2)}
    finally:
        store.close()


def write_two_chains(
    url: str, pki: CertificateAuthority, calls: list[LedgerRecord], split: int
) -> None:
    """``calls[:split]`` sealed on node-1's chain and the rest on node-2's."""
    sealer = chain_sealer(pki)
    store = PostgresLedgerStore(url)
    try:
        append(store, sealer, "node-1", calls[:split])
        append(store, sealer, "node-2", calls[split:])
    finally:
        store.close()
