"""Revocation holds on every leg: the CA's records, the CRL's freshness and order, the
provider leg, the broker's own certificate, providers built on tabadol.client, and seals."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509

from tabadol.broker import Broker
from tabadol.cli import main
from tabadol.client import ProviderServer, connect
from tabadol.client.broker_revocations import BrokerRevocations
from tabadol.client.credentials import AgencyCredentials
from tabadol.config import load as load_config
from tabadol.errors import ConfigError, PkiError
from tabadol.ledger.signers import seal_signer_problem
from tabadol.ops.model import TraceQuery
from tabadol.pki import CertificateAuthority, load_crl
from tabadol.protocol import CONSUMER_KEY
from tabadol.revocation import CrlRefused, RevocationList, check_replacement, crl_number
from tests.conftest import DEFAULT_GRANTS, TRUST_DOMAIN, broker_toml, start_broker
from tests.support.collector import running_collector
from tests.support.echo import UNARY, own_pki, start_echo
from tests.support.exchange import OwnExchange, crl_signed_by, eventually, own_exchange

NOW = dt.datetime.now(dt.UTC)


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


async def unary(channel: grpc.aio.Channel) -> bytes:
    result: bytes = await channel.unary_unary(UNARY)(b"ping", timeout=10)
    return result


async def refusal(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(channel)
    return err.value


@pytest.fixture
async def exchange(tmp_path: Path, echo_contracts: Path) -> AsyncIterator[OwnExchange]:
    async with own_exchange(tmp_path, echo_contracts) as running:
        yield running


# --- The CA's records: the CRL is rebuilt from them, and its number only goes up -------------


def test_deleted_crl_is_rebuilt_from_the_cas_records_with_every_revocation(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    nocr = serial(ca.issue_agency("nocr") / "agency.crt")
    ca.revoke_agency("nocr")
    before = crl_number(load_crl(ca.dir / "crl.pem", ca.cert))
    (ca.dir / "crl.pem").unlink()

    assert main(["pki", "crl", "--dir", str(ca.dir)]) == 0

    rebuilt = load_crl(ca.dir / "crl.pem", ca.cert)
    assert {r.serial_number for r in rebuilt} == {nocr}
    assert crl_number(rebuilt) > before


def test_every_published_crl_has_a_higher_number(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    ca.issue_agency("nocr")
    numbers = [crl_number(load_crl(ca.dir / "crl.pem", ca.cert))]
    ca.revoke_agency("nocr")
    numbers.append(crl_number(load_crl(ca.dir / "crl.pem", ca.cert)))
    ca.write_crl()
    numbers.append(crl_number(load_crl(ca.dir / "crl.pem", ca.cert)))

    assert numbers == sorted(set(numbers)) and numbers[0] >= 1


def test_a_ca_from_before_revoked_jsonl_keeps_its_revocations(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    nocr = serial(ca.issue_agency("nocr") / "agency.crt")
    post = serial(ca.issue_agency("post") / "agency.crt")
    ca.revoke_agency("nocr")
    (ca.dir / "revoked.jsonl").unlink()  # as an older CA kept them: only in crl.pem

    ca.revoke_agency("post")

    assert {r.serial_number for r in load_crl(ca.dir / "crl.pem", ca.cert)} == {nocr, post}


def test_revoke_by_serial_and_the_current_broker_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    tax = serial(ca.issue_agency("tax") / "agency.crt")
    broker = serial(ca.issue_broker())

    assert main(["pki", "revoke", "--dir", str(ca.dir), "--serial", f"{tax:x}"]) == 0
    assert (
        main(["pki", "revoke", "--dir", str(ca.dir), "--broker", "--reason", "key-compromise"]) == 0
    )

    crl = load_crl(ca.dir / "crl.pem", ca.cert)
    reasons = {
        r.serial_number: r.extensions.get_extension_for_class(x509.CRLReason).value.reason
        for r in crl
        if r.extensions
    }
    assert {r.serial_number for r in crl} == {tax, broker}
    assert reasons[broker] is x509.ReasonFlags.key_compromise


def test_a_serial_the_ca_never_issued_cannot_be_revoked(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    with pytest.raises(PkiError, match="never issued serial"):
        ca.revoke([0xDEADBEEF])


def test_reissuing_the_broker_revokes_the_superseded_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    old = serial(ca.issue_broker())
    new = serial(ca.issue_broker(force=True))

    revoked = {r.serial_number for r in load_crl(ca.dir / "crl.pem", ca.cert)}
    assert old in revoked and new not in revoked
    assert [r.reason for r in ca.revocations()] == ["superseded"]


def test_operators_and_auditors_get_client_only_certificates(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    bundle = ca.issue_person("auditor", "maryam")

    cert = x509.load_pem_x509_certificate((bundle / "auditor.crt").read_bytes())
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/auditor/maryam"
    ]
    assert (bundle / "auditor.key").stat().st_mode & 0o077 == 0


# --- Which CRL may replace which: pure --------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "revoked", "refused"),
    [
        (4, frozenset({7}), "older than number 5"),  # an older CRL put back: a rollback
        (5, frozenset(), "reuses number 5"),  # the same number, other contents
        (6, frozenset(), "no longer lists revoked serial"),  # a newer one that un-revokes
    ],
)
def test_a_crl_that_would_go_back_is_refused(
    tmp_path: Path, number: int, revoked: frozenset[int], refused: str
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    later = NOW + dt.timedelta(days=3)
    held = RevocationList.from_bytes(
        crl_signed_by(ca, number=5, revoked={7}, next_update=later), ca.cert
    )
    offered = RevocationList.from_bytes(
        crl_signed_by(ca, number=number, revoked=revoked, next_update=later), ca.cert
    )

    with pytest.raises(CrlRefused, match=refused):
        check_replacement(offered, held, NOW)


def test_a_stale_crl_is_refused_even_when_the_ca_signed_it(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    stale = RevocationList.from_bytes(
        crl_signed_by(ca, number=9, next_update=NOW - dt.timedelta(days=393)), ca.cert
    )
    with pytest.raises(CrlRefused, match="went stale"):
        check_replacement(stale, None, NOW)


def test_a_crl_from_another_ca_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    other = CertificateAuthority.init(tmp_path / "other", TRUST_DOMAIN)
    with pytest.raises(CrlRefused, match="not signed by the platform CA"):
        RevocationList.from_bytes((other.dir / "crl.pem").read_bytes(), ca.cert)


# --- The broker: stale, rolled back, its own certificate ----------------------------------


async def test_putting_back_an_older_crl_does_not_unrevoke_an_agency(
    exchange: OwnExchange,
) -> None:
    older_crl = (exchange.ca.dir / "crl.pem").read_bytes()
    exchange.ca.revoke_agency("post")
    exchange.broker.reload(exchange.broker.config)
    (exchange.ca.dir / "crl.pem").write_bytes(older_crl)  # the attacker's rollback

    with pytest.raises(ConfigError, match="rollback"):
        exchange.broker.reload(exchange.broker.config)

    async with exchange.consumer("post") as channel:
        error = await refusal(channel)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (error.details() or "")


async def test_a_stale_crl_is_refused_on_reload_and_the_old_one_keeps_serving(
    exchange: OwnExchange,
) -> None:
    stale = crl_signed_by(exchange.ca, number=1000, next_update=NOW - dt.timedelta(days=393))
    (exchange.ca.dir / "crl.pem").write_bytes(stale)

    with pytest.raises(ConfigError, match="went stale"):
        exchange.broker.reload(exchange.broker.config)

    async with exchange.consumer("post") as channel:
        assert await unary(channel) == b"ping"


async def test_calls_are_refused_once_the_crl_goes_stale_while_the_broker_runs(
    tmp_path: Path, echo_contracts: Path
) -> None:
    ca = own_pki(tmp_path, TRUST_DOMAIN, "post", "echo")
    provider, _ = await start_echo(ca.dir / "agencies" / "echo")
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    (ca.dir / "crl.pem").write_bytes(crl_signed_by(ca, number=50, next_update=soon))
    broker = await start_broker(tmp_path, ca.dir, echo_contracts, [provider.address])
    try:
        broker.refresh_metrics()
        left = broker.metrics.registry.get_sample_value("tabadol_crl_seconds_to_stale")
        assert left is not None and 0 < left <= 3
        async with connect(f"127.0.0.1:{broker.port}", ca.dir / "agencies" / "post") as channel:
            assert await unary(channel) == b"ping"

            async def refused_now() -> bool:
                try:
                    await unary(channel)
                except grpc.aio.AioRpcError as e:
                    return e.code() is grpc.StatusCode.UNAUTHENTICATED
                return False

            assert await eventually(refused_now)
            error = await refusal(channel)
        assert "revocation list is out of date" in (error.details() or "")
    finally:
        await broker.stop(0)
        await provider.stop(0)


async def test_stale_crl_serve_policy_keeps_serving_with_the_old_crl(
    tmp_path: Path, echo_contracts: Path
) -> None:
    ca = own_pki(tmp_path, TRUST_DOMAIN, "post", "echo")
    provider, _ = await start_echo(ca.dir / "agencies" / "echo")
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    (ca.dir / "crl.pem").write_bytes(crl_signed_by(ca, number=50, next_update=soon))
    config = tmp_path / "broker.toml"
    config.write_text(
        broker_toml(
            pki_dir=ca.dir,
            contracts=echo_contracts,
            endpoints=[provider.address],
            grants=DEFAULT_GRANTS,
            extra_broker='stale_crl = "serve"',
            tracing='exporter = "none"',
        )
    )
    broker = Broker(load_config(config))
    await broker.start()
    try:

        async def stale() -> bool:
            return dt.datetime.now(dt.UTC) > soon

        assert await eventually(stale)
        async with connect(f"127.0.0.1:{broker.port}", ca.dir / "agencies" / "post") as channel:
            assert await unary(channel) == b"ping"
    finally:
        await broker.stop(0)
        await provider.stop(0)


def test_the_broker_will_not_start_with_its_own_revoked_certificate(
    tmp_path: Path, echo_contracts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = CertificateAuthority.init(tmp_path / "pki", TRUST_DOMAIN)
    ca.issue_broker()
    ca.revoke_current("broker")
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\ntrust_domain = "{TRUST_DOMAIN}"\npki_dir = "{ca.dir}"\n'
        f'contracts = ["{echo_contracts}"]\n'
    )

    assert main(["config", "check", "--config", str(config)]) == 2
    assert "broker.crt: certificate" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"broker\.crt: certificate .* is revoked"):
        Broker(load_config(config))


# --- The provider leg -------------------------------------------------------------------


async def test_a_revoked_provider_gets_no_more_calls_after_reload(exchange: OwnExchange) -> None:
    async with exchange.consumer("post") as channel:
        assert await unary(channel) == b"ping"
        calls_before = len(exchange.echo.calls)
        exchange.ca.revoke_agency("echo")
        exchange.broker.reload(exchange.broker.config)

        error = await refusal(channel)

    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "provider 'echo' presents a revoked certificate" in (error.details() or "")
    assert len(exchange.echo.calls) == calls_before


async def test_an_impostor_endpoint_with_a_revoked_certificate_is_never_called(
    tmp_path: Path, echo_contracts: Path
) -> None:
    """The provider's key leaked and was revoked; the thief serves at the registered
    address with the old certificate. The broker must not send it a single call."""
    ca = own_pki(tmp_path, TRUST_DOMAIN, "post", "echo")
    stolen = tmp_path / "stolen"
    shutil.copytree(ca.dir / "agencies" / "echo", stolen)
    ca.revoke_agency("echo")
    thief, thief_echo = await start_echo(stolen)
    broker = await start_broker(tmp_path, ca.dir, echo_contracts, [thief.address])
    try:
        async with connect(f"127.0.0.1:{broker.port}", ca.dir / "agencies" / "post") as channel:
            error = await refusal(channel)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert "revoked" in (error.details() or "")
        assert thief_echo.calls == []
    finally:
        await broker.stop(0)
        await thief.stop(0)


# --- Providers built on tabadol.client refuse revoked and superseded broker certificates ----


async def call_provider_as(
    provider: ProviderServer, ca: CertificateAuthority, cert: bytes, key: bytes
) -> grpc.aio.AioRpcError | bytes:
    """Dial the provider directly, as whoever holds this broker key, forging the consumer."""
    creds = grpc.ssl_channel_credentials(ca.cert_pem(), key, cert)
    async with grpc.aio.secure_channel(
        provider.address,
        creds,
        options=[("grpc.ssl_target_name_override", f"echo.agency.{TRUST_DOMAIN}")],
    ) as channel:
        try:
            answer: bytes = await channel.unary_unary(UNARY)(
                b"ping", timeout=10, metadata=((CONSUMER_KEY, "tax"),)
            )
            return answer
        except grpc.aio.AioRpcError as e:
            return e


async def test_a_superseded_broker_certificate_is_refused_by_providers_without_restart(
    exchange: OwnExchange,
) -> None:
    old_cert = (exchange.ca.dir / "broker.crt").read_bytes()
    old_key = (exchange.ca.dir / "broker.key").read_bytes()
    assert await call_provider_as(exchange.provider, exchange.ca, old_cert, old_key) == b"ping"

    exchange.ca.issue_broker(force=True)  # the old one is revoked as superseded
    exchange.broker.reload(exchange.broker.config)

    async def old_key_refused() -> bool:
        answer = await call_provider_as(exchange.provider, exchange.ca, old_cert, old_key)
        return isinstance(answer, grpc.aio.AioRpcError)

    assert await eventually(old_key_refused)
    answer = await call_provider_as(exchange.provider, exchange.ca, old_cert, old_key)
    assert isinstance(answer, grpc.aio.AioRpcError)
    assert answer.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "is revoked" in (answer.details() or "")
    # The broker itself, with its new certificate, still gets through.
    async with exchange.consumer("post") as channel:
        assert await unary(channel) == b"ping"


def test_a_provider_never_goes_back_to_an_older_crl(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    revocations = BrokerRevocations(AgencyCredentials.load(ca.issue_agency("echo")))
    later = NOW + dt.timedelta(days=3)
    broker = serial(ca.issue_broker())

    assert revocations.offer(
        crl_signed_by(ca, number=3, revoked={broker}, next_update=later), "test"
    )
    assert not revocations.offer(crl_signed_by(ca, number=2, next_update=later), "replay")
    other = CertificateAuthority.init(tmp_path / "other", TRUST_DOMAIN)
    assert not revocations.offer(crl_signed_by(other, number=99, next_update=later), "forged")

    assert revocations.current is not None and revocations.current.number == 3
    assert "is revoked" in (revocations.refusal((ca.dir / "broker.crt").read_bytes()) or "")


def test_a_provider_with_a_crl_file_refuses_a_revoked_broker(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    bundle = ca.issue_agency("echo")
    ca.issue_broker()
    ca.revoke_current("broker")
    shutil.copyfile(ca.dir / "crl.pem", bundle / "crl.pem")

    revocations = BrokerRevocations(AgencyCredentials.load(bundle), crl_file=bundle / "crl.pem")

    why = revocations.refusal((ca.dir / "broker.crt").read_bytes())
    assert why is not None and "is revoked" in why


# --- Seals are judged by their signer at the seal's time -----------------------------------


def test_a_seal_made_before_its_signer_was_revoked_still_counts(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    cert = ca.issue_broker().read_bytes()
    number = serial(ca.dir / "broker.crt")
    now = dt.datetime.now(dt.UTC)  # not the module's NOW: the suite may reach here much later
    revoked_at = {number: now}

    def problem(at: dt.datetime) -> str | None:
        return seal_signer_problem(
            cert, at, ca_cert=ca.cert, trust_domain=TRUST_DOMAIN, revoked_at=revoked_at
        )

    assert problem(now - dt.timedelta(minutes=1)) is None
    assert "revoked" in (problem(now + dt.timedelta(minutes=1)) or "")
    assert "not valid at the seal's time" in (problem(now + dt.timedelta(days=400)) or "")


def test_a_seal_signed_by_an_agency_certificate_does_not_count(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    agency = (ca.issue_agency("nocr") / "agency.crt").read_bytes()
    assert "not a broker's" in (
        seal_signer_problem(agency, NOW, ca_cert=ca.cert, trust_domain=TRUST_DOMAIN, revoked_at={})
        or ""
    )


# --- The broker's own spans survive its certificate's renewal -----------------------------


async def test_a_renewed_broker_certificate_keeps_its_spans_reaching_the_collector(
    exchange: OwnExchange,
) -> None:
    """Renewing revokes the old certificate, which the collector then refuses: the broker
    must export with the new one from its reload on, not lose its spans until a restart."""
    async with running_collector(exchange.directory / "ops", exchange.ca) as ops:
        broker = await start_broker(
            exchange.directory,
            exchange.ca.dir,
            exchange.broker.config.broker.contracts[0],
            [exchange.provider.address],
            tracing=f'otlp_endpoint = "{ops.endpoint}"',
        )
        try:
            assert broker.tracing is not None

            async def broker_traces() -> int:
                await asyncio.to_thread(broker.tracing.force_flush)  # type: ignore[union-attr]
                _, total = ops.store.search(TraceQuery(service="tabadol-broker"))
                return total

            async with connect(
                f"127.0.0.1:{broker.port}", exchange.ca.dir / "agencies" / "post"
            ) as channel:
                assert await unary(channel) == b"ping"

                async def one() -> bool:
                    return await broker_traces() == 1

                assert await eventually(one)
                exchange.ca.issue_broker(force=True)  # the old certificate: revoked, superseded
                ops.trust.refresh_crl(force=True)  # the collector knows at once
                broker.reload(broker.config)
                assert await unary(channel) == b"ping"

                async def two() -> bool:
                    return await broker_traces() == 2

                assert await eventually(two)
        finally:
            await broker.stop(0)


async def test_an_older_crl_put_back_is_refused_after_a_restart_too(
    tmp_path: Path, echo_contracts: Path
) -> None:
    """The broker keeps the newest CRL it accepted beside its ledger: a restart is no way
    around the rollback check, even where the CA's own crlnumber is not at hand."""
    ca = own_pki(tmp_path, TRUST_DOMAIN, "post", "echo")
    provider, _ = await start_echo(ca.dir / "agencies" / "echo")
    older = (ca.dir / "crl.pem").read_bytes()
    try:
        broker = await start_broker(tmp_path, ca.dir, echo_contracts, [provider.address])
        ca.revoke_agency("post")
        broker.reload(broker.config)
        await broker.stop(0)
        (ca.dir / "crl.pem").write_bytes(older)
        (ca.dir / "crlnumber").unlink()  # the attacker has the PKI directory, not the ledger's

        with pytest.raises(ConfigError, match="older than number"):
            Broker(load_config(tmp_path / "broker.toml"))
    finally:
        await provider.stop(0)


def test_a_crl_older_than_the_cas_own_count_is_refused_at_start(
    tmp_path: Path, echo_contracts: Path
) -> None:
    ca = own_pki(tmp_path, TRUST_DOMAIN, "post")
    older = (ca.dir / "crl.pem").read_bytes()
    ca.revoke_agency("post")
    (ca.dir / "crl.pem").write_bytes(older)
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\ntrust_domain = "{TRUST_DOMAIN}"\npki_dir = "{ca.dir}"\n'
        f'contracts = ["{echo_contracts}"]\n'
    )
    with pytest.raises(ConfigError, match=r"has published number 2 \(crlnumber\)"):
        Broker(load_config(config))


def test_a_superseded_broker_certificate_still_vouches_for_seals_until_the_reload_window_ends(
    tmp_path: Path,
) -> None:
    """Renewal revokes the old certificate as superseded, but the running broker seals with
    it until it is reloaded: those seals count for a day; a key compromise ends that at once."""
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    old = ca.issue_broker().read_bytes()
    ca.issue_broker(force=True)

    def problem(at: dt.datetime) -> str | None:
        crl = RevocationList.from_crl(load_crl(ca.dir / "crl.pem", ca.cert), ca.cert)
        return seal_signer_problem(
            old,
            at,
            ca_cert=ca.cert,
            trust_domain=TRUST_DOMAIN,
            revoked_at=crl.signatures_count_until(),
        )

    an_hour_later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert problem(an_hour_later) is None
    assert problem(an_hour_later + dt.timedelta(days=1)) is not None

    ca.revoke([x509.load_pem_x509_certificate(old).serial_number], reason="key-compromise")
    assert problem(an_hour_later) is not None


async def test_a_provider_keeps_the_newest_crl_so_a_restart_cannot_roll_it_back(
    exchange: OwnExchange,
) -> None:
    older = (exchange.ca.dir / "crl.pem").read_bytes()
    old_broker = (exchange.ca.dir / "broker.crt").read_bytes()
    exchange.ca.issue_broker(force=True)  # the old broker certificate: revoked
    exchange.broker.reload(exchange.broker.config)
    bundle = exchange.ca.dir / "agencies" / "echo"

    async def kept() -> bool:
        return (bundle / "crl.pem").exists() and (
            crl_number(load_crl(bundle / "crl.pem", exchange.ca.cert)) > 1
        )

    assert await eventually(kept)

    restarted = BrokerRevocations(AgencyCredentials.load(bundle), crl_file=bundle / "crl.pem")
    assert not restarted.offer(older, "a rolled-back broker")
    assert "is revoked" in (restarted.refusal(old_broker) or "")
