"""Attacks on the several-node exchange: the registry, the CRL and the ledger on PostgreSQL,
and the span store there, as an outsider, a role of the database or a writer of a node's
directory would make them. Each test states what must hold."""

from __future__ import annotations

import json
import shutil
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from tabadol import config
from tabadol.broker import Broker
from tabadol.broker.registry_follower import kept_registry_path
from tabadol.cli import main
from tabadol.errors import ConfigError
from tabadol.ledger.store.postgres import PostgresLedgerStore
from tabadol.ops.store import open_span_store
from tabadol.pki import CertificateAuthority
from tabadol.registry.entries import digest, to_toml
from tabadol.registry.store.postgres import _LOCK as REGISTRY_LOCK
from tests.conftest import DEFAULT_GRANTS, TRUST_DOMAIN, RunningProvider
from tests.support.echo import own_pki, start_echo
from tests.support.exchange import eventually
from tests.support.postgres import PostgresCluster, create_database
from tests.support.registry import registry_config, tabadol
from tests.support.spans import make_span
from tests.test_ledger_postgres import call_each, two_nodes  # noqa: F401 (a fixture)
from tests.test_registry_follower import ONLY_POST, Node, call, call_code_is, gauge

# -- helpers ----------------------------------------------------------------------------


def role_url(url: str, role: str) -> str:
    """``url`` for a role of the same server (the test clusters trust every local login)."""
    return url.replace("postgres@", f"{role}@", 1)


def make_role(url: str, role: str, *grants: str) -> str:
    """A login role with only these grants (CONNECT comes from PUBLIC); its URL. Roles
    belong to the whole server, which other tests share: the name gets this database's."""
    name = f"{role}-{url.rsplit('_', 1)[1]}"
    with psycopg.connect(url, autocommit=True) as su:
        su.execute(f'CREATE ROLE "{name}" LOGIN')
        for grant in grants:
            su.execute(grant.format(role=f'"{name}"'))
    return role_url(url, name)


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A server of the test's own, to stop and start."""
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


def finishes_within(work: threading.Thread, seconds: float) -> bool:
    work.start()
    work.join(seconds)
    return not work.is_alive()


# -- the registry: rollback ---------------------------------------------------------------


async def test_a_forged_kept_registry_never_outlives_the_databases_return(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    own_cluster: PostgresCluster,
) -> None:
    url = create_database(own_cluster.url())
    n = Node(tmp_path, pki, echo_contracts, url, echo_provider.address)
    n.publish(DEFAULT_GRANTS, "v1")
    n.publish(ONLY_POST, "v2: nocr's grant ends")
    broker = await n.start()
    kept = kept_registry_path(broker.config)
    assert broker.config.registry_version == 2
    await broker.stop(0)
    # A writer of the node's directory: version 2's number over version 1's entries.
    data = json.loads(kept.read_text())
    service = data["entries"]["grant"][0]["service"]
    data["entries"]["grant"].append({"consumer": "nocr", "service": service, "methods": ["*"]})
    data["digest"] = digest(data["entries"])
    kept.write_text(json.dumps(data))
    own_cluster.stop()  # the node restarts while the database is away (or is cut off)
    broker = await n.start()
    try:
        own_cluster.start()
        # (The kept time may be under a second old: wait for the database's version itself.)
        assert await eventually(
            lambda: (
                gauge(broker, "tabadol_registry_age_seconds") < 1.0
                and json.loads(kept.read_text())["digest"] != data["digest"]
            )
        )
        # The database is back and says version 2 has no grant for nocr.
        assert await call(broker, pki, "nocr") == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await broker.stop(0)


async def test_a_registry_version_going_backwards_does_not_restore_a_revoked_grant(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    postgres_url: str,
) -> None:
    n = Node(tmp_path, pki, echo_contracts, postgres_url, echo_provider.address)
    n.publish(DEFAULT_GRANTS, "v1")
    broker = await n.start()
    try:
        n.publish(ONLY_POST, "v2: nocr's grant ends")
        assert await eventually(lambda: broker.config.registry_version == 2, seconds=5)
        # What a restore from last night's backup looks like to the nodes.
        with psycopg.connect(postgres_url, autocommit=True) as su:
            su.execute("ALTER TABLE registry_versions DISABLE TRIGGER USER")
            su.execute("DELETE FROM registry_versions WHERE version = 2")
        rolled_back = await eventually(lambda: broker.config.registry_version == 1, seconds=3)
        assert not rolled_back
        assert await call(broker, pki, "nocr") == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await broker.stop(0)


# -- the CRL through the database ---------------------------------------------------------


async def test_a_crl_row_with_a_made_up_number_cannot_block_later_crls(
    tmp_path: Path, echo_contracts: Path, postgres_url: str
) -> None:
    ca = own_pki(tmp_path, TRUST_DOMAIN, "echo", "post", "nocr")
    ca.write_crl()
    node_pki = tmp_path / "node-pki"
    node_pki.mkdir()
    for name in ("ca.crt", "broker.crt", "broker.key", "crl.pem"):
        shutil.copy(ca.dir / name, node_pki / name)
    provider, _ = await start_echo(ca.dir / "agencies" / "echo")
    n = Node(tmp_path, ca, echo_contracts, postgres_url, provider.address)
    n.config.write_text(n.config.read_text().replace(str(ca.dir), str(node_pki)))
    n.publish(DEFAULT_GRANTS)
    code, _, err = tabadol("registry", "publish-crl", "--config", str(n.config))
    assert code == 0, err
    broker = await n.start()
    try:
        # Someone with the node's database role re-inserts the CA's genuine CRL, numbered high.
        with psycopg.connect(postgres_url, autocommit=True) as db:
            der = db.execute("SELECT der FROM registry_crls").fetchone()
            assert der is not None
            db.execute(
                "INSERT INTO registry_crls (number, der, published_by) VALUES (%s, %s, 'x')",
                (10**12, der[0]),
            )
        ca.revoke_agency("nocr")
        code, _, err = tabadol(
            "registry", "publish-crl", "--config", str(n.config), str(ca.dir / "crl.pem")
        )
        assert code == 0, err
        assert await eventually(
            lambda: call_code_is(broker, ca, "nocr", grpc.StatusCode.UNAUTHENTICATED), seconds=5
        )
    finally:
        await broker.stop(0)
        await provider.stop(0)


# -- denial of service by any role that can log in ----------------------------------------


def test_a_role_without_grants_cannot_stall_registry_changes(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, postgres_url: str
) -> None:
    n = Node(tmp_path, pki, echo_contracts, postgres_url, "127.0.0.1:1")
    n.publish(DEFAULT_GRANTS, "v1")
    nobody = make_role(postgres_url, "nobody")
    outcome: list[BaseException | str] = []

    def revoke() -> None:
        try:
            n.publish(ONLY_POST, "nocr's grant ends")
            outcome.append("committed")
        except BaseException as e:
            outcome.append(e)

    with psycopg.connect(nobody, autocommit=True) as attacker:
        attacker.execute("SELECT pg_advisory_lock(%s)", (REGISTRY_LOCK,))
        finished = finishes_within(threading.Thread(target=revoke, daemon=True), 20)
        attacker.execute("SELECT pg_advisory_unlock_all()")
    assert finished, "registry import still waiting on a lock held by a role with no grants"
    # Changes lock a row only writers may lock (FOR UPDATE), no longer a public advisory key.
    assert outcome == ["committed"]


def test_a_role_without_grants_cannot_stall_a_nodes_start(postgres_url: str) -> None:
    PostgresLedgerStore(postgres_url).close()  # the ledger exists
    nobody = make_role(postgres_url, "nobody")
    outcome: list[BaseException | str] = []

    def open_ledger() -> None:
        try:
            PostgresLedgerStore(postgres_url, connect_timeout_s=2).close()
            outcome.append("opened")
        except BaseException as e:
            outcome.append(e)

    with psycopg.connect(nobody, autocommit=True) as attacker:
        attacker.execute("SELECT pg_advisory_lock(hashtext('tabadol-ledger'))")
        finished = finishes_within(threading.Thread(target=open_ledger, daemon=True), 20)
        attacker.execute("SELECT pg_advisory_unlock_all()")
    assert finished, "the ledger's open still waiting on a lock held by a role with no grants"


# -- least privilege ----------------------------------------------------------------------


def test_a_ledger_role_with_only_table_grants_can_write(postgres_url: str) -> None:
    PostgresLedgerStore(postgres_url).close()  # created by the owner
    writer = make_role(
        postgres_url,
        "ledger_writer",
        "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}",
    )
    PostgresLedgerStore(writer).close()


def test_a_node_follows_the_registry_with_a_read_only_role(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, postgres_url: str
) -> None:
    """Held: with the tables there, a node needs only SELECT (and LISTEN) on the registry."""
    n = Node(tmp_path, pki, echo_contracts, postgres_url, "127.0.0.1:1")
    n.publish(DEFAULT_GRANTS, "v1")
    reader = make_role(
        postgres_url, "registry_reader", "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"
    )
    (tmp_path / "ro").mkdir()
    cfg = registry_config(tmp_path / "ro", pki.dir, echo_contracts, reader)
    assert Broker(config.load(cfg)).config.registry_version == 1
    # And it cannot write: a read-only node cannot commit a version for the others.
    from tabadol.registry import open_registry

    store = open_registry(reader)
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            store.commit({}, "node", "x", digest({}))
    finally:
        store.close()


# -- the network between nodes and database -----------------------------------------------


def test_a_remote_registry_database_without_verified_tls_is_refused(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    path = registry_config(
        tmp_path, pki.dir, echo_contracts, "postgresql://tabadol@db.exchange.example:5432/tabadol"
    )
    with pytest.raises(ConfigError, match="sslmode"):
        config.load(path)


# -- the ledger: chains that vanish -------------------------------------------------------


async def test_a_running_nodes_chain_deleted_and_restarted_is_caught(
    two_nodes: list[Broker],  # noqa: F811
    pki: CertificateAuthority,
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await call_each(two_nodes, pki, 3)
    assert await eventually(lambda: _chain_count(postgres_url, "node-2") == 3, seconds=5)  # sealed
    with psycopg.connect(postgres_url, autocommit=True) as db:  # ledger role, node-2 running
        for table in ("ledger_records", "ledger_seals", "ledger_chains"):
            db.execute(f"DELETE FROM {table} WHERE chain = 'node-2'")
    await call_each(two_nodes[1:], pki, 1)  # node-2 writes on: a new chain from genesis
    for broker in two_nodes:
        await broker.stop(0)
    capsys.readouterr()
    assert main(["ledger", "verify", "--config", str(two_nodes[0].config.path)]) == 1
    out = capsys.readouterr().out
    assert "node-2" in out and "BROKEN" in out


def _chain_count(url: str, chain: str) -> int:
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute("SELECT count FROM ledger_chains WHERE chain = %s", (chain,)).fetchone()
    return int(row[0]) if row else 0


async def test_a_chain_deleted_with_its_sessions_is_caught_by_its_own_anchor(
    two_nodes: list[Broker],  # noqa: F811
    pki: CertificateAuthority,
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await call_each(two_nodes, pki, 2)
    for broker in two_nodes:
        await broker.stop(0)
    with psycopg.connect(postgres_url, autocommit=True) as db:
        for table in ("ledger_records", "ledger_seals", "ledger_chains"):
            db.execute(f"DELETE FROM {table} WHERE chain = 'node-2'")
        db.execute("DELETE FROM ledger_sessions WHERE instance = 'node-2'")
    node2 = two_nodes[1].config
    anchor = node2.ledger.path.with_name(node2.ledger.path.name + ".seals")
    assert '"chain": "node-2"' in anchor.read_text()  # the witness is there
    capsys.readouterr()
    assert main(["ledger", "verify", "--config", str(node2.path)]) == 1
    assert "node-2" in capsys.readouterr().out


# -- registry export --------------------------------------------------------------------


def test_an_exported_registry_reads_back_whatever_its_strings_hold() -> None:
    """Held (fixed during the review): a DEL in a name no longer breaks the round trip."""
    entries = {"agency": [{"id": "post", "name": "Post\u007f office"}]}
    assert tomllib.loads(to_toml(entries))["agency"] == entries["agency"]


def test_an_exported_registry_cannot_be_steered_by_a_reason_or_author(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, postgres_url: str
) -> None:
    """Held: --reason and --by with newlines stay comments in the exported TOML."""
    n = Node(tmp_path, pki, echo_contracts, postgres_url, "127.0.0.1:1")
    n.file.write_text(
        "[[agency]]\nid = \"post\"\nname = \"Post\"\n"
    )  # fmt: skip
    injected = 'x\n[[agency]]\nid = "evil"\nname = "Evil"\r\n[[agency]]\u2028id="e2"'
    code, _, err = tabadol(
        "registry", "import", "--config", str(n.config), str(n.file),
        "--reason", injected, "--by", injected,
    )  # fmt: skip
    assert code == 0, err
    code, out, err = tabadol("registry", "export", "--config", str(n.config))
    assert code == 0, err
    assert [a["id"] for a in tomllib.loads(out)["agency"]] == ["post"]


# -- the span store on PostgreSQL ---------------------------------------------------------


def test_a_span_with_a_nul_character_is_stored_like_any_other(postgres_url: str) -> None:
    store = open_span_store(postgres_url)
    try:
        store.add([make_span(1, 1, name="a\x00b", attributes={"national_id": "12\x0034"})])
    finally:
        store.close()


def test_span_searches_bind_every_value(postgres_url: str) -> None:
    """Held: tags, service and operation are bound parameters, never spliced."""
    from tabadol.ops.model import TraceQuery

    store = open_span_store(postgres_url)
    try:
        store.add([make_span(1, 1, attributes={"k": "v"})])
        hostile = "x' OR '1'='1"
        for query in (
            TraceQuery(service=hostile),
            TraceQuery(operation=hostile),
            TraceQuery(tags=((hostile, hostile),)),
            TraceQuery(tags=(("k", "%"),)),
            TraceQuery(party=hostile),
        ):
            assert store.search(query) == ([], 0)
    finally:
        store.close()


def test_database_passwords_never_reach_messages(tmp_path: Path) -> None:
    """Held: the three stores name a database without its password, whatever is wrong."""
    from tabadol.registry import open_registry

    for url in (
        "postgresql://tabadol:s3cret@127.0.0.1:1/db",
        "postgresql://tabadol:s3cret@127.0.0.1:notaport/db",
        "postgresql://tabadol:s3cret@127.0.0.1:1/db?sslmode=bogus",
        "postgresql://127.0.0.1:1/db?password=s3cret",
    ):
        for attempt in (
            lambda u: PostgresLedgerStore(u, connect_timeout_s=1),
            lambda u: open_span_store(u),
            lambda u: open_registry(u).head(),
        ):
            with pytest.raises(Exception) as err:
                attempt(url)
            assert "s3cret" not in str(err.value)


# == second review round ================================================================
# Attacks on the round-1 fixes and what they missed.


# -- the transport rule ------------------------------------------------------------------


def test_the_transport_rule_checks_a_host_named_beside_an_empty_hostaddr() -> None:
    from tabadol.database import transport_problem

    # Two hosts: the first by address (loopback), the second by its name alone.
    url = "postgresql://tabadol@localhost:5432,db.exchange.example:5432/t?hostaddr=127.0.0.1,"
    assert transport_problem(url) is not None


def test_the_transport_rule_checks_the_host_libpq_takes_from_its_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tabadol.database import transport_problem

    services = tmp_path / "pg_service.conf"
    services.write_text("[ledger]\nhost=db.exchange.example\nsslmode=prefer\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    assert transport_problem("postgresql:///t?service=ledger") is not None
    monkeypatch.setenv("PGHOST", "db.exchange.example")
    assert transport_problem("postgresql://tabadol@/t") is not None


def test_the_transport_rule_holds_against_spellings_of_a_remote_host() -> None:
    """Held: uppercase, percent-encoding, query-string hosts, mapped and numeric addresses,
    a later sslmode overriding an earlier one: each remote host is still refused."""
    from tabadol.database import transport_problem

    for url in (
        "postgresql:///t?host=db.exchange.example",
        "postgresql://tabadol@localhost/t?host=db.exchange.example",
        "postgresql://tabadol@localhost/t?hostaddr=10.0.0.5",
        "postgresql://tabadol@%31%30.0.0.5/t",
        "postgresql://tabadol@LOCALHOST./t",
        "postgresql://tabadol@[::ffff:10.0.0.1]/t",
        "postgresql://tabadol@2130706433/t",
        "postgresql://tabadol@0.0.0.0/t",
        "postgresql://tabadol@10.0.0.5/t?sslmode=verify-full&sslmode=prefer",
        "postgresql://tabadol@10.0.0.5/t?sslmode=VERIFY-FULL",
        "host=db.exchange.example dbname=t",
    ):
        assert transport_problem(url) is not None, url


# -- the ledger: records no chain check covers --------------------------------------------


async def test_records_in_a_chain_no_seal_covers_fail_verify(
    two_nodes: list[Broker],  # noqa: F811
    pki: CertificateAuthority,
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await call_each(two_nodes, pki, 2)
    for broker in two_nodes:
        await broker.stop(0)
    config_path = str(two_nodes[0].config.path)
    capsys.readouterr()
    assert main(["ledger", "export", "--config", config_path, "--format", "jsonl"]) == 0
    genuine = len(capsys.readouterr().out.splitlines())
    with psycopg.connect(postgres_url, autocommit=True) as db:  # the nodes' ledger role
        columns = [
            row[0]
            for row in db.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'ledger_records' ORDER BY ordinal_position"
            )
        ]
        rest = ", ".join(f'"{c}"' for c in columns if c != "chain")  # "grant" is reserved
        db.execute(
            f"INSERT INTO ledger_records (chain, {rest}) "
            f"SELECT 'node-9', {rest} FROM ledger_records WHERE chain = 'node-1'"
        )
    assert main(["ledger", "export", "--config", config_path, "--format", "jsonl"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == genuine + 2  # the forged ones count
    assert main(["ledger", "verify", "--config", config_path]) == 1
    assert "node-9" in capsys.readouterr().out


async def test_one_nodes_ledger_role_cannot_stop_another_nodes_chain(
    two_nodes: list[Broker],  # noqa: F811
    pki: CertificateAuthority,
    postgres_url: str,
) -> None:
    """With one role per node (`ledger init --one-role-per-node`), node-1's role cannot
    rewind node-2's chain (which would make node-2 fail closed for good)."""
    await call_each(two_nodes, pki, 1)
    assert await eventually(lambda: _chain_count(postgres_url, "node-2") == 1, seconds=5)
    assert main(["ledger", "init", "--config", str(two_nodes[0].config.path),
                 "--one-role-per-node"]) == 0  # fmt: skip
    node1 = make_role(
        postgres_url,
        "node-1",
        "GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}",
        "GRANT UPDATE ON ledger_chains, ledger_sessions TO {role}",
    )
    with psycopg.connect(node1, autocommit=True) as db:
        moved = db.execute(
            "UPDATE ledger_chains SET seals = 0, count = 0 WHERE chain = 'node-2'"
        ).rowcount
        assert moved == 0  # not its chain: no row to move
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # row-level security
            db.execute("INSERT INTO ledger_chains (chain) VALUES ('node-3')")
    await call_each(two_nodes[1:], pki, 1)
    assert await eventually(lambda: _chain_count(postgres_url, "node-2") >= 2, seconds=5)


# -- the registry: numbers, shapes and refused versions -----------------------------------


def test_a_skip_to_typo_cannot_freeze_the_registry(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, postgres_url: str
) -> None:
    n = Node(tmp_path, pki, echo_contracts, postgres_url, "127.0.0.1:1")
    n.publish(DEFAULT_GRANTS, "v1")
    tabadol(
        "registry", "import", "--config", str(n.config), str(n.file),
        "--reason", "typo", "--skip-to", str(2**63 - 1),
    )  # fmt: skip
    n.file.write_text(n.file.read_text().replace("Agency post", "Agency post office"))
    try:
        code, _, err = tabadol(
            "registry", "import", "--config", str(n.config), str(n.file), "--reason", "next"
        )
    except psycopg.Error as e:  # (a traceback today)
        code, err = 1, str(e)
    assert code == 0, err


async def test_a_version_of_the_wrong_shape_is_refused_not_taken_for_an_outage(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    postgres_url: str,
) -> None:
    n = Node(
        tmp_path, pki, echo_contracts, postgres_url, echo_provider.address,
        registry="max_age_seconds = 60",
    )  # fmt: skip
    n.publish(DEFAULT_GRANTS, "v1")
    broker = await n.start()
    try:
        with psycopg.connect(postgres_url, autocommit=True) as registrar:
            registrar.execute(
                "INSERT INTO registry_versions (version, created_by, reason, entries, digest) "
                "VALUES (2, 'x', 'x', '[]'::jsonb, 'x')"
            )
        # Refused as a version (an outage sets no refused version), and version 1 serves. Its
        # age grows as for any version a node cannot apply (the max_age test below).
        assert await eventually(lambda: gauge(broker, "tabadol_registry_refused_version") == 2)
        assert broker.registry is not None and broker.registry.version is not None
        assert broker.registry.version.number == 1
        assert "cannot apply" in (broker.registry.freshness.behind or "")
        assert await call(broker, pki, "post") == grpc.StatusCode.OK
    finally:
        await broker.stop(0)


async def test_a_revocation_a_node_cannot_apply_is_still_bounded_by_max_age(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    postgres_url: str,
) -> None:
    n = Node(
        tmp_path, pki, echo_contracts, postgres_url, echo_provider.address,
        registry="max_age_seconds = 1.5",
    )  # fmt: skip
    n.publish(DEFAULT_GRANTS, "v1")
    broker = await n.start()
    try:
        assert await call(broker, pki, "nocr") == grpc.StatusCode.OK
        # Version 2 ends nocr's grant, and names a service this node has no contract for.
        entries = json.loads(json.dumps(broker.registry.version.entries))  # type: ignore[union-attr]
        entries["grant"] = [g for g in entries["grant"] if g["consumer"] != "nocr"]
        entries["grant"].append({"consumer": "post", "service": "missing", "methods": ["*"]})
        from tabadol.registry import open_registry

        store = open_registry(postgres_url)
        try:
            store.commit(entries, "registrar", "nocr's grant ends", digest(entries))
        finally:
            store.close()

        async def nocr_refused() -> bool:  # by the grant's end, or by the stale bound
            return await call(broker, pki, "nocr") != grpc.StatusCode.OK

        assert await eventually(nocr_refused, seconds=5)
    finally:
        await broker.stop(0)


async def test_a_crl_row_that_never_counts_is_not_read_again_on_every_poll(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    postgres_url: str,
) -> None:
    n = Node(tmp_path, pki, echo_contracts, postgres_url, echo_provider.address)
    n.publish(DEFAULT_GRANTS, "v1")
    broker = await n.start()
    try:
        follower = broker.registry
        assert follower is not None
        read: list[int] = []
        crls = follower.store.crls

        def counted(above: int | None = None, **more: Any) -> list[Any]:
            rows = crls(above, **more)
            read.append(sum(len(row.der) for row in rows))
            return rows

        follower.store.crls = counted  # type: ignore[method-assign]
        with psycopg.connect(postgres_url, autocommit=True) as registrar:
            registrar.execute(
                "INSERT INTO registry_crls (number, der, published_by) VALUES (%s, %s, 'x')",
                (10**12, b"\x30" * (1024 * 1024)),
            )
        assert await eventually(lambda: len([r for r in read if r]) >= 1, seconds=5)
        assert await eventually(lambda: len(read) >= 8, seconds=10)  # polls go on
        assert len([r for r in read if r]) <= 1  # the junk crossed the wire once
    finally:
        await broker.stop(0)


# -- the span store: values JSON refuses --------------------------------------------------


def test_a_span_with_a_non_finite_number_still_renders_as_json() -> None:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    from tabadol.ops import jaeger
    from tabadol.ops.otlp import any_value

    store = open_span_store("memory:")
    try:
        sent = {"ratio": any_value(AnyValue(double_value=float("nan")))}
        span = make_span(1, 1, attributes={**sent, "peak": float("inf")})
        store.add([span])
        spans = store.trace(span.trace_id)
        json.dumps(jaeger.envelope([jaeger.trace_json(spans)], total=1), allow_nan=False)
    finally:
        store.close()


def test_a_spans_counted_size_covers_its_utf8_bytes() -> None:
    from tabadol.ops.store.encoding import encode_span

    wide = "\U0001f600" * 200
    encoded = encode_span(
        make_span(1, 1, name=wide, message=wide, attributes={wide[:50]: wide})
    )  # fmt: skip
    stored = sum(
        len(text.encode())
        for text in (encoded.span.name, encoded.span.status_message, encoded.attributes)
    ) + sum(len(k.encode()) + len(v.encode()) for k, v in encoded.tags)
    assert encoded.size >= stored
