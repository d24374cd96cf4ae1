"""Every way to pass as another agency, in one table: none of them acts as the victim.

The victim is ``nocr``. Each row builds what an attacker could present (metadata, a TLS
name, a certificate) and makes one Unary call. The call is either refused with the status
the row expects, or served, and then the provider saw the caller's TRUE agency in
``x-tabadol-consumer`` (the header the broker sets from the verified certificate).
"""

from __future__ import annotations

import base64
import datetime as dt
import shutil
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from tabadol.broker import Broker
from tabadol.client import ProviderServer
from tabadol.pki import CertificateAuthority
from tabadol.protocol import CONSUMER_KEY, GRANT_KEY, PLATFORM_PREFIX, REQUEST_ID_KEY
from tabadol.spiffe import agency_dns_name, agency_spiffe_id, broker_dns_name
from tests.conftest import TRUST_DOMAIN, RunningProvider, start_broker
from tests.support.echo import UNARY, EchoProvider, Seen
from tests.support.h2raw import RawH2, grpc_message

VICTIM, ATTACKER, GRANTED = "nocr", "cra", "post"  # post holds a grant for every method
VICTIM_DNS = agency_dns_name(TRUST_DOMAIN, VICTIM)
BROKER_DNS = broker_dns_name(TRUST_DOMAIN)
MARKER = "x-test-marker"  # finds this row's call among everything the provider saw
RST_STREAM = "RST_STREAM"  # the broker reset the HTTP/2 stream instead of answering


@dataclass(frozen=True)
class Outcome:
    """What became of one call: its status, and whom the provider believed was calling."""

    code: grpc.StatusCode | str
    consumer: str | None = None  # x-tabadol-consumer as the provider saw it; None if not reached
    details: str = ""
    platform_keys: frozenset[str] = frozenset()  # the x-tabadol-* keys the provider received


@dataclass(frozen=True)
class Expect:
    code: grpc.StatusCode | str
    consumer: str | None = None
    says: str = ""  # a phrase the refusal's details must contain


SERVED_AS_GRANTED = Expect(grpc.StatusCode.OK, consumer=GRANTED)


@dataclass
class Lab:
    """The session's PKI, broker and echo provider, plus a scratch directory for forgeries."""

    pki: CertificateAuthority
    broker: Broker
    provider: RunningProvider
    contracts: Path
    tmp: Path

    def bundle(self, agency: str) -> Path:
        return self.pki.dir / "agencies" / agency

    def key_and_cert(self, bundle: Path) -> tuple[bytes, bytes]:
        return (bundle / "agency.key").read_bytes(), (bundle / "agency.crt").read_bytes()

    def channel(
        self,
        key: bytes | None,
        cert: bytes | None,
        *,
        options: Sequence[tuple[str, str]] = (("grpc.ssl_target_name_override", BROKER_DNS),),
        broker: Broker | None = None,
        ca_pem: bytes | None = None,
    ) -> grpc.aio.Channel:
        """A channel as a hostile client opens it: raw credentials, no Tabadol helpers."""
        creds = grpc.ssl_channel_credentials(ca_pem or self.pki.cert_pem(), key, cert)
        port = (broker or self.broker).port
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=list(options))

    async def call(
        self,
        channel: grpc.aio.Channel,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        echo: EchoProvider | None = None,
    ) -> Outcome:
        marker = uuid.uuid4().hex
        call = channel.unary_unary(UNARY)(
            b"who am i", metadata=(*metadata, (MARKER, marker)), timeout=10
        )
        try:
            await call
        except grpc.aio.AioRpcError as e:
            return self._outcome(e.code(), e.details() or "", marker, echo)
        return self._outcome(grpc.StatusCode.OK, "", marker, echo)

    async def raw_call(
        self,
        extra_headers: Sequence[tuple[str, str]] = (),
        trailers: Sequence[tuple[str, str]] | None = None,
    ) -> Outcome:
        """A call from the granted agency's certificate over hand-built HTTP/2 frames."""
        marker = uuid.uuid4().hex
        raw = await RawH2.open(self.broker.port, self.bundle(GRANTED), BROKER_DNS)
        try:
            end = await raw.call(
                UNARY,
                BROKER_DNS,
                grpc_message(b"who am i"),
                extra_headers=[*extra_headers, (MARKER, marker)],
                trailers=trailers,
            )
        finally:
            raw.close()
        status = end.grpc_status
        if status is None:
            assert end.reset is not None, f"the stream ended with neither status nor reset: {end}"
            return self._outcome(RST_STREAM, f"error code {end.reset}", marker, None)
        return self._outcome(status, end.trailer("grpc-message") or "", marker, None)

    def _outcome(
        self, code: grpc.StatusCode | str, details: str, marker: str, echo: EchoProvider | None
    ) -> Outcome:
        seen = self.seen(marker, echo or self.provider.echo)
        if seen is None:
            return Outcome(code, None, details)
        keys = frozenset(k for k in seen.metadata if k.startswith(PLATFORM_PREFIX))
        return Outcome(code, seen.consumer, details, keys)

    @staticmethod
    def seen(marker: str, echo: EchoProvider) -> Seen | None:
        matches = [s for s in echo.calls if s.metadata.get(MARKER) == marker]
        assert len(matches) <= 1, "one call reached the provider more than once"
        return matches[0] if matches else None


def forge_certificate(
    lab: Lab,
    name: str,
    *,
    uris: Sequence[str],
    common_name: str,
    dns_names: Sequence[str] = (),
    signer_key: ec.EllipticCurvePrivateKey | None = None,
    issuer: x509.Name | None = None,
    chain: Sequence[bytes] = (),
    extra_general_names: bytes = b"",
) -> tuple[bytes, bytes]:
    """A client key and certificate (PEM, with ``chain`` appended) built by hand.

    Signed by the platform CA's key unless ``signer_key`` says otherwise: these are the
    certificates a careless or compromised issuing step could produce.
    ``extra_general_names`` (DER) go into the SAN after the others, even kinds of name that
    X.509 libraries build only from raw bytes.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    signer = signer_key or lab.pki.key
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tabadol"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(issuer or lab.pki.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    )
    sans: list[x509.GeneralName] = [
        *(x509.UniformResourceIdentifier(u) for u in uris),
        *(x509.DNSName(d) for d in dns_names),
    ]
    if extra_general_names:
        san = x509.SubjectAlternativeName(sans).public_bytes()
        listed = _der_children(san)[0][1] + extra_general_names
        raw = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, _der(0x30, listed))
        builder = builder.add_extension(raw, critical=False)
    elif sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(signer, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM) + b"".join(chain)
    (lab.tmp / f"{name}.crt").write_bytes(cert_pem)  # kept for a failure's post-mortem
    return key_pem, cert_pem


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def _der_children(body: bytes) -> list[tuple[int, bytes, bytes]]:
    """(tag, contents, whole element) of each DER element in ``body``."""
    children, i = [], 0
    while i < len(body):
        tag, size, start = body[i], body[i + 1], i + 2
        if size & 0x80:
            count = size & 0x7F
            size, start = int.from_bytes(body[start : start + count], "big"), start + count
        children.append((tag, body[start : start + size], body[i : start + size]))
        i = start + size
    return children


def with_second_san_extension(
    lab: Lab, cert_pem: bytes, second: x509.SubjectAlternativeName
) -> bytes:
    """The certificate with another subjectAltName extension appended, re-signed by the CA.

    No X.509 library builds this (RFC 5280 forbids repeating an extension), so it is done on
    the DER: the TBSCertificate's extension list gets one more element and a new signature.
    """
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    tbs, algorithm, _ = _der_children(_der_children(der)[0][1])
    *fields, extensions = _der_children(tbs[1])
    assert extensions[0] == 0xA3, "the last TBSCertificate field holds the extensions"
    listed = _der_children(extensions[1])[0][1]
    san_oid = _der(0x06, bytes.fromhex("551d11"))  # 2.5.29.17
    listed += _der(0x30, san_oid + _der(0x04, second.public_bytes()))
    new_tbs = _der(0x30, b"".join(f[2] for f in fields) + _der(0xA3, _der(0x30, listed)))
    signature = lab.pki.key.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    new_der = _der(0x30, new_tbs + algorithm[2] + _der(0x03, b"\x00" + signature))
    body = base64.encodebytes(new_der)
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"


def _agency_key(lab: Lab, agency: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    bundle = lab.bundle(agency)
    key = serialization.load_pem_private_key((bundle / "agency.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, x509.load_pem_x509_certificate((bundle / "agency.crt").read_bytes())


# --- The rows: each one attempt, as an attacker would make it ---------------------------------

Row = Callable[[Lab], Awaitable[Outcome]]


async def metadata_consumer_forged(lab: Lab) -> Outcome:
    async with lab.channel(*lab.key_and_cert(lab.bundle(GRANTED))) as channel:
        return await lab.call(channel, [(CONSUMER_KEY, VICTIM)])


async def metadata_consumer_forged_as_binary(lab: Lab) -> Outcome:
    async with lab.channel(*lab.key_and_cert(lab.bundle(GRANTED))) as channel:
        return await lab.call(channel, [(CONSUMER_KEY + "-bin", VICTIM.encode())])


async def metadata_consumer_forged_twice(lab: Lab) -> Outcome:
    async with lab.channel(*lab.key_and_cert(lab.bundle(GRANTED))) as channel:
        return await lab.call(channel, [(CONSUMER_KEY, VICTIM), (CONSUMER_KEY, VICTIM)])


async def metadata_consumer_forged_after_everything_else(lab: Lab) -> Outcome:
    filler = [(f"x-test-filler-{i}", "x") for i in range(20)]
    async with lab.channel(*lab.key_and_cert(lab.bundle(GRANTED))) as channel:
        return await lab.call(channel, [*filler, ("x-tabadol-request-id", "0"), (CONSUMER_KEY, VICTIM)])  # fmt: skip


async def metadata_consumer_forged_in_uppercase(lab: Lab) -> Outcome:
    # gRPC libraries refuse to send an upper-case key, so the frames are built by hand.
    return await lab.raw_call([("X-Tabadol-Consumer", VICTIM)])


async def metadata_consumer_forged_in_request_trailers(lab: Lab) -> Outcome:
    # HTTP/2 lets a client end its stream with a trailing HEADERS frame; gRPC never does.
    return await lab.raw_call(trailers=[(CONSUMER_KEY, VICTIM)])


async def sni_names_the_victim(lab: Lab) -> Outcome:
    options = [("grpc.ssl_target_name_override", VICTIM_DNS)]
    async with lab.channel(*lab.key_and_cert(lab.bundle(GRANTED)), options=options) as channel:
        return await lab.call(channel)


async def authority_names_the_victim(lab: Lab) -> Outcome:
    options = [
        ("grpc.ssl_target_name_override", BROKER_DNS),
        ("grpc.default_authority", VICTIM_DNS),
    ]
    async with lab.channel(*lab.key_and_cert(lab.bundle(GRANTED)), options=options) as channel:
        return await lab.call(channel)


async def victims_common_name_with_attackers_san(lab: Lab) -> Outcome:
    key, cert = forge_certificate(
        lab,
        "cn-victim-san-attacker",
        uris=[agency_spiffe_id(TRUST_DOMAIN, ATTACKER)],
        common_name=VICTIM,
    )
    async with lab.channel(key, cert) as channel:
        return await lab.call(channel)


async def victims_name_only_in_the_common_name(lab: Lab) -> Outcome:
    key, cert = forge_certificate(
        lab, "cn-only", uris=[], common_name=VICTIM, dns_names=[VICTIM_DNS]
    )
    async with lab.channel(key, cert) as channel:
        return await lab.call(channel)


async def victims_san_signed_by_an_agency_key(lab: Lab) -> Outcome:
    signer, signer_cert = _agency_key(lab, ATTACKER)
    key, cert = forge_certificate(
        lab,
        "signed-by-agency",
        uris=[agency_spiffe_id(TRUST_DOMAIN, VICTIM)],
        common_name=VICTIM,
        signer_key=signer,
        issuer=signer_cert.subject,
    )
    async with lab.channel(key, cert) as channel:
        return await lab.call(channel)


async def victims_san_chained_through_an_agency_certificate(lab: Lab) -> Outcome:
    # As above, but presenting the agency's (CA-signed) certificate as an intermediate.
    signer, signer_cert = _agency_key(lab, ATTACKER)
    key, cert = forge_certificate(
        lab,
        "chained-through-agency",
        uris=[agency_spiffe_id(TRUST_DOMAIN, VICTIM)],
        common_name=VICTIM,
        signer_key=signer,
        issuer=signer_cert.subject,
        chain=[signer_cert.public_bytes(serialization.Encoding.PEM)],
    )
    async with lab.channel(key, cert) as channel:
        return await lab.call(channel)


async def victims_certificate_from_another_ca(lab: Lab) -> Outcome:
    rogue = CertificateAuthority.init(lab.tmp / "rogue", TRUST_DOMAIN)
    bundle = rogue.issue_agency(VICTIM)
    # The client trusts the real CA (it must reach the broker); the broker must not trust it.
    async with lab.channel(*lab.key_and_cert(bundle)) as channel:
        return await lab.call(channel)


async def victims_expired_certificate(lab: Lab) -> Outcome:
    stale = lab.pki.issue_agency(
        VICTIM, force=True, days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    )
    expired = lab.tmp / "expired"
    shutil.copytree(stale, expired)
    lab.pki.issue_agency(VICTIM, force=True)  # the session's other tests keep a valid one
    async with lab.channel(*lab.key_and_cert(expired)) as channel:
        return await lab.call(channel)


async def victims_revoked_certificate(lab: Lab) -> Outcome:
    # A PKI and broker of its own, so revoking here leaves the session's agencies alone.
    own = CertificateAuthority.init(lab.tmp / "own-pki", TRUST_DOMAIN)
    own.issue_broker()
    victim = own.issue_agency(VICTIM)
    provider = ProviderServer(own.issue_agency("echo"))
    echo = EchoProvider()
    provider.server.add_generic_rpc_handlers((echo,))
    await provider.start()
    broker = await start_broker(lab.tmp, own.dir, lab.contracts, [provider.address])
    try:
        key, cert = lab.key_and_cert(victim)
        async with lab.channel(key, cert, broker=broker, ca_pem=own.cert_pem()) as channel:
            before = await lab.call(channel, echo=echo)
            assert (before.code, before.consumer) == (grpc.StatusCode.OK, VICTIM), "it worked once"
            own.revoke_agency(VICTIM)
            broker.reload(broker.config)
            return await lab.call(channel, echo=echo)
    finally:
        await broker.stop(0)
        await provider.stop(0)


async def broker_certificate_used_as_a_client(lab: Lab) -> Outcome:
    key, cert = (lab.pki.dir / "broker.key").read_bytes(), (lab.pki.dir / "broker.crt").read_bytes()
    async with lab.channel(key, cert) as channel:
        return await lab.call(channel)


async def two_spiffe_ids_victim_first(lab: Lab) -> Outcome:
    key, cert = forge_certificate(
        lab,
        "two-spiffe-ids",
        uris=[agency_spiffe_id(TRUST_DOMAIN, VICTIM), agency_spiffe_id(TRUST_DOMAIN, ATTACKER)],
        common_name=VICTIM,
    )
    async with lab.channel(key, cert) as channel:
        return await lab.call(channel)


async def two_san_extensions_victim_first(lab: Lab) -> Outcome:
    key, cert = forge_certificate(
        lab,
        "two-san-extensions",
        uris=[agency_spiffe_id(TRUST_DOMAIN, VICTIM)],
        common_name=VICTIM,
    )
    attacker = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(agency_spiffe_id(TRUST_DOMAIN, ATTACKER))]
    )
    cert = with_second_san_extension(lab, cert, attacker)
    async with lab.channel(key, cert) as channel:
        return await lab.call(channel)


async def victim_with_an_x400_address_in_the_san(lab: Lab) -> Outcome:
    # A legal GeneralName kind that TLS accepts but Python's X.509 library cannot read.
    x400_address = _der(0xA3, _der(0x30, b""))
    key, cert = forge_certificate(
        lab,
        "x400-address",
        uris=[agency_spiffe_id(TRUST_DOMAIN, VICTIM)],
        common_name=VICTIM,
        extra_general_names=x400_address,
    )
    async with lab.channel(key, cert) as channel:
        return await lab.call(channel)


async def victim_of_another_trust_domain(lab: Lab) -> Outcome:
    key, cert = forge_certificate(
        lab,
        "other-trust-domain",
        uris=[agency_spiffe_id("other.example", VICTIM)],
        common_name=VICTIM,
    )
    async with lab.channel(key, cert) as channel:
        return await lab.call(channel)


async def victim_of_a_lookalike_trust_domain(lab: Lab) -> Outcome:
    key, cert = forge_certificate(
        lab,
        "lookalike-trust-domain",
        uris=[f"spiffe://{TRUST_DOMAIN}.evil/agency/{VICTIM}"],
        common_name=VICTIM,
    )
    async with lab.channel(key, cert) as channel:
        return await lab.call(channel)


async def victim_with_a_path_after_the_agency_id(lab: Lab) -> Outcome:
    key, cert = forge_certificate(
        lab,
        "path-after-id",
        uris=[agency_spiffe_id(TRUST_DOMAIN, VICTIM) + "/../" + ATTACKER],
        common_name=VICTIM,
    )
    async with lab.channel(key, cert) as channel:
        return await lab.call(channel)


async def no_client_certificate(lab: Lab) -> Outcome:
    async with lab.channel(None, None) as channel:
        return await lab.call(channel)


def refused(code: grpc.StatusCode, says: str = "") -> Expect:
    return Expect(code, says=says)


TLS_REFUSES = refused(grpc.StatusCode.UNAVAILABLE)

TABLE = [
    # Metadata: the consumer comes from the certificate, never from what the caller sends.
    pytest.param(metadata_consumer_forged, SERVED_AS_GRANTED, id="metadata-consumer-forged"),
    pytest.param(metadata_consumer_forged_in_uppercase, refused(grpc.StatusCode.INTERNAL, "Illegal header key"), id="metadata-consumer-uppercase-key"),
    pytest.param(metadata_consumer_forged_as_binary, SERVED_AS_GRANTED, id="metadata-consumer-bin-suffix"),
    pytest.param(metadata_consumer_forged_twice, SERVED_AS_GRANTED, id="metadata-consumer-duplicated"),
    pytest.param(metadata_consumer_forged_after_everything_else, SERVED_AS_GRANTED, id="metadata-consumer-last"),
    pytest.param(metadata_consumer_forged_in_request_trailers, SERVED_AS_GRANTED, id="metadata-consumer-in-http2-trailers"),
    # Names on the connection: TLS checks the broker's name, the authority proves nothing.
    pytest.param(sni_names_the_victim, TLS_REFUSES, id="sni-target-name-of-victim"),
    pytest.param(authority_names_the_victim, SERVED_AS_GRANTED, id="authority-of-victim"),
    # Certificates: only the single SPIFFE ID of a CA-signed, valid, unrevoked agency counts.
    pytest.param(victims_common_name_with_attackers_san, refused(grpc.StatusCode.PERMISSION_DENIED, f"agency {ATTACKER!r}"), id="cert-cn-victim-san-attacker"),
    pytest.param(victims_name_only_in_the_common_name, refused(grpc.StatusCode.UNAUTHENTICATED, "exactly one SPIFFE ID"), id="cert-cn-and-dns-victim-no-spiffe-id"),
    pytest.param(victims_san_signed_by_an_agency_key, TLS_REFUSES, id="cert-signed-by-agency-key"),
    pytest.param(victims_san_chained_through_an_agency_certificate, TLS_REFUSES, id="cert-chained-through-agency-cert"),
    pytest.param(victims_certificate_from_another_ca, TLS_REFUSES, id="cert-from-another-ca"),
    pytest.param(victims_expired_certificate, TLS_REFUSES, id="cert-expired"),
    pytest.param(victims_revoked_certificate, refused(grpc.StatusCode.UNAUTHENTICATED, "revoked"), id="cert-revoked-after-reload"),
    pytest.param(broker_certificate_used_as_a_client, refused(grpc.StatusCode.UNAUTHENTICATED, "not an agency"), id="cert-of-the-broker"),
    pytest.param(two_spiffe_ids_victim_first, refused(grpc.StatusCode.UNAUTHENTICATED, "exactly one SPIFFE ID"), id="cert-two-spiffe-ids"),
    pytest.param(two_san_extensions_victim_first, TLS_REFUSES, id="cert-two-san-extensions"),
    pytest.param(victim_with_an_x400_address_in_the_san, refused(grpc.StatusCode.UNAUTHENTICATED, "certificate"), id="cert-san-unreadable-by-the-broker"),
    pytest.param(victim_of_another_trust_domain, refused(grpc.StatusCode.UNAUTHENTICATED, "not an agency of"), id="cert-other-trust-domain"),
    pytest.param(victim_of_a_lookalike_trust_domain, refused(grpc.StatusCode.UNAUTHENTICATED, "not an agency of"), id="cert-lookalike-trust-domain"),
    pytest.param(victim_with_a_path_after_the_agency_id, refused(grpc.StatusCode.UNAUTHENTICATED, "malformed agency id"), id="cert-path-after-agency-id"),
    pytest.param(no_client_certificate, TLS_REFUSES, id="no-client-certificate"),
]  # fmt: skip


@pytest.fixture
def lab(
    pki: CertificateAuthority,
    broker: Broker,
    echo_provider: RunningProvider,
    echo_contracts: Path,
    tmp_path: Path,
) -> Lab:
    return Lab(pki, broker, echo_provider, echo_contracts, tmp_path)


@pytest.mark.parametrize(("attempt", "expected"), TABLE)
async def test_no_credential_name_or_metadata_trick_acts_as_another_agency(
    lab: Lab, attempt: Row, expected: Expect
) -> None:
    outcome = await attempt(lab)

    assert outcome.consumer != VICTIM, f"the provider was told the caller is {VICTIM!r}"
    assert outcome.code == expected.code, outcome
    assert outcome.consumer == expected.consumer, outcome
    assert expected.says in outcome.details, outcome
    if outcome.consumer is not None:  # served: only the broker's own platform keys arrived
        assert outcome.platform_keys == {CONSUMER_KEY, REQUEST_ID_KEY, GRANT_KEY}, outcome
