"""The ledger on PostgreSQL: a chain per broker node, verified per node, read together,
and failing closed while the database is away."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
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
from tabadol.ledger import LedgerWriter
from tabadol.ledger.record import FIELD_NAMES
from tabadol.ledger.seal import Sealer
from tabadol.ledger.store import LedgerWriteError
from tabadol.ledger.store.postgres import PostgresLedgerStore
from tabadol.ops.store import open_span_store
from tabadol.pki import CertificateAuthority
from tests.conftest import DEFAULT_GRANTS, RunningProvider, broker_toml
from tests.support.echo import UNARY
from tests.support.exchange import eventually
from tests.support.postgres import PostgresCluster
from tests.test_ledger import record


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
            "GRANT SELECT, INSERT, UPDATE ON ledger_chains, ledger_sessions TO node_writer"
        )
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
        conn.execute(f"GRANT SELECT, INSERT, UPDATE ON ledger_chains, ledger_sessions TO {group}")
        for node in (node_1, node_2):
            conn.execute(f'CREATE ROLE "{node}" LOGIN IN ROLE {group}')
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    as_node_1 = postgres_url.replace("postgres@", f"{node_1}@", 1)
    writer = LedgerWriter(PostgresLedgerStore(as_node_1), sealer, instance=node_1)
    writer.submit(record(1))
    writer.close()
    with pytest.raises(LedgerWriteError, match="row-level security"):
        LedgerWriter(PostgresLedgerStore(as_node_1), sealer, instance=node_2)
    with psycopg.connect(as_node_1, autocommit=True) as conn:
        # Records are added by COPY, which row-level security does not allow: a trigger.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="its own chain"):
            conn.execute(
                f"INSERT INTO ledger_records SELECT '{node_2}', seq + 100, "
                f"{', '.join(FIELD_NAMES)}, prev_digest, digest FROM ledger_records"
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO ledger_chains (chain) VALUES (%s)", (node_2,))
    reader = PostgresLedgerStore(postgres_url, readonly=True)
    try:
        assert reader.chains() == [node_1] and reader.head(node_1)[0] == 1
    finally:
        reader.close()
