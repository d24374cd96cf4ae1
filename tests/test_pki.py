"""Specification of the national PKI, the broker's and agencies' credentials, and `tabadol pki`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tabadol.broker.credentials import BrokerCredentials
from tabadol.cli import main
from tabadol.client.credentials import AgencyCredentials, CredentialsError
from tabadol.errors import ConfigError, PkiError
from tabadol.pki import CertificateAuthority, load_crl, trust_domain_of
from tests.support.certs import self_signed

TRUST_DOMAIN = "tabadol.test"
CONFIG = Path("/etc/tabadol/broker.toml")  # only ever named in messages, never read


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """A CA with an agency 'nocr' and the broker issued. Tests must not change it."""
    ca = CertificateAuthority.init(tmp_path_factory.mktemp("pki") / "ca", TRUST_DOMAIN)
    ca.issue_agency("nocr")
    ca.issue_broker(dns_names=["localhost", "broker.internal"], ips=["127.0.0.1", "::1"])
    return ca


@pytest.fixture(scope="module")
def impostor_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """Another CA for the same trust domain, with the same subject name: not ours all the same."""
    ca = CertificateAuthority.init(tmp_path_factory.mktemp("pki") / "impostor", TRUST_DOMAIN)
    ca.issue_broker()
    return ca


@pytest.fixture
def fresh_ca(tmp_path: Path) -> CertificateAuthority:
    """A CA of this test's own, for tests that issue or revoke."""
    return CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def read_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def revoked_in_crl(ca: CertificateAuthority) -> set[int]:
    return {r.serial_number for r in load_crl(ca.dir / "crl.pem", ca.cert)}


# --- Files and their modes ------------------------------------------------------------------


def test_ca_directory_is_readable_by_its_owner_only(ca: CertificateAuthority) -> None:
    assert mode(ca.dir) == 0o700


def test_agency_bundle_directory_is_readable_by_its_owner_only(ca: CertificateAuthority) -> None:
    assert mode(ca.dir / "agencies" / "nocr") == 0o700


@pytest.mark.parametrize("key", ["ca.key", "broker.key", "agencies/nocr/agency.key"])
def test_private_keys_are_mode_0600(ca: CertificateAuthority, key: str) -> None:
    assert mode(ca.dir / key) == 0o600


@pytest.mark.parametrize(
    "public",
    ["ca.crt", "crl.pem", "broker.crt", "agencies/nocr/agency.crt", "agencies/nocr/ca.crt"],
)
def test_certificates_and_crl_are_mode_0644(ca: CertificateAuthority, public: str) -> None:
    assert mode(ca.dir / public) == 0o644


def test_no_temporary_files_are_left_behind(ca: CertificateAuthority) -> None:
    assert [p for p in ca.dir.rglob("*.tmp")] == []


@pytest.mark.parametrize("key", ["ca.key", "broker.key", "agencies/nocr/agency.key"])
def test_keys_are_unencrypted_p256(ca: CertificateAuthority, key: str) -> None:
    loaded = serialization.load_pem_private_key((ca.dir / key).read_bytes(), password=None)

    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert isinstance(loaded.curve, ec.SECP256R1)


# --- What the certificates say --------------------------------------------------------------


def test_ca_certificate_is_a_signing_ca_for_its_trust_domain(ca: CertificateAuthority) -> None:
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value

    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    assert usage.key_cert_sign and usage.crl_sign
    assert trust_domain_of(ca.cert) == TRUST_DOMAIN
    assert ca.trust_domain == TRUST_DOMAIN


def test_agency_certificate_carries_its_spiffe_id_and_dns_name(ca: CertificateAuthority) -> None:
    cert = read_cert(ca.dir / "agencies" / "nocr" / "agency.crt")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/agency/nocr"
    ]
    assert san.get_values_for_type(x509.DNSName) == [f"nocr.agency.{TRUST_DOMAIN}"]
    assert san.get_values_for_type(x509.IPAddress) == []


def test_agency_certificate_serves_both_server_and_client_auth(ca: CertificateAuthority) -> None:
    cert = read_cert(ca.dir / "agencies" / "nocr" / "agency.crt")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku


def test_agency_certificate_is_a_leaf_signed_by_the_ca(ca: CertificateAuthority) -> None:
    cert = read_cert(ca.dir / "agencies" / "nocr" / "agency.crt")

    cert.verify_directly_issued_by(ca.cert)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_agency_bundle_holds_the_ca_certificate(ca: CertificateAuthority) -> None:
    bundle = ca.dir / "agencies" / "nocr"

    assert (bundle / "ca.crt").read_bytes() == (ca.dir / "ca.crt").read_bytes()


def test_agency_key_matches_its_certificate(ca: CertificateAuthority) -> None:
    bundle = ca.dir / "agencies" / "nocr"
    key = serialization.load_pem_private_key((bundle / "agency.key").read_bytes(), password=None)

    assert key.public_key() == read_cert(bundle / "agency.crt").public_key()


def test_broker_certificate_names_the_broker_and_the_extra_names_and_addresses(
    ca: CertificateAuthority,
) -> None:
    cert = read_cert(ca.dir / "broker.crt")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    cert.verify_directly_issued_by(ca.cert)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/broker"
    ]
    assert san.get_values_for_type(x509.DNSName) == [
        f"broker.{TRUST_DOMAIN}",
        "localhost",
        "broker.internal",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_broker_with_a_bad_ip_address_is_refused(fresh_ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="bad IP address for the certificate"):
        fresh_ca.issue_broker(ips=["999.1.1.1"])

    assert not (fresh_ca.dir / "broker.key").exists()


def test_two_issues_get_different_serials(fresh_ca: CertificateAuthority) -> None:
    first = read_cert(fresh_ca.issue_agency("nocr") / "agency.crt").serial_number
    second = read_cert(fresh_ca.issue_agency("nocr", force=True) / "agency.crt").serial_number

    assert first != second


def test_certificate_issued_in_the_past_for_one_day_is_expired(
    fresh_ca: CertificateAuthority,
) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)

    cert = read_cert(fresh_ca.issue_agency("old", not_before=start, days=1) / "agency.crt")

    assert cert.not_valid_before_utc == start.replace(microsecond=0)
    assert cert.not_valid_after_utc == start.replace(microsecond=0) + dt.timedelta(days=1)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)


# --- Refusals -------------------------------------------------------------------------------


def test_init_refuses_an_existing_ca_and_leaves_it_unchanged(
    fresh_ca: CertificateAuthority,
) -> None:
    before = {name: (fresh_ca.dir / name).read_bytes() for name in ("ca.crt", "ca.key")}

    with pytest.raises(PkiError) as excinfo:
        CertificateAuthority.init(fresh_ca.dir, "other.test")

    assert (
        str(excinfo.value) == f"{fresh_ca.dir}: a CA already exists here; refusing to overwrite it"
    )
    assert {name: (fresh_ca.dir / name).read_bytes() for name in before} == before


def test_init_refuses_a_directory_holding_only_a_ca_key(tmp_path: Path) -> None:
    tmp_path.joinpath("ca.key").write_bytes(b"precious")

    with pytest.raises(PkiError, match="a CA already exists here"):
        CertificateAuthority.init(tmp_path, TRUST_DOMAIN)

    assert tmp_path.joinpath("ca.key").read_bytes() == b"precious"


@pytest.mark.parametrize(
    "trust_domain",
    [
        "Tabadol.Test",
        "",
        "-tabadol.test",
        "tabadol.test/",
        "tabadol test",
        pytest.param("tabadol.test\n", id="trailing-newline"),
    ],
)
def test_init_refuses_a_trust_domain_that_is_not_a_lower_case_dns_name(
    tmp_path: Path, trust_domain: str
) -> None:
    with pytest.raises(PkiError) as excinfo:
        CertificateAuthority.init(tmp_path / "ca", trust_domain)

    assert str(excinfo.value) == (
        f"trust domain {trust_domain!r} is not a lower-case DNS-style name"
    )
    assert not (tmp_path / "ca").exists()


def test_opening_a_directory_without_a_ca_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(PkiError) as excinfo:
        CertificateAuthority(tmp_path)

    message = str(excinfo.value)
    assert message.startswith(f"{tmp_path}: no CA here")
    assert "ca.crt" in message
    assert "tabadol pki init" in message


def test_reopened_ca_speaks_for_the_same_trust_domain(ca: CertificateAuthority) -> None:
    reopened = CertificateAuthority(ca.dir)

    assert reopened.trust_domain == TRUST_DOMAIN
    assert reopened.cert == ca.cert


def test_issue_refuses_to_overwrite_an_agency_certificate_without_force(
    fresh_ca: CertificateAuthority,
) -> None:
    bundle = fresh_ca.issue_agency("nocr")
    before = (bundle / "agency.crt").read_bytes(), (bundle / "agency.key").read_bytes()

    with pytest.raises(PkiError) as excinfo:
        fresh_ca.issue_agency("nocr")

    message = str(excinfo.value)
    assert message.startswith(f"{bundle}: agency 'nocr' already has a certificate")
    assert "--force" in message
    assert ((bundle / "agency.crt").read_bytes(), (bundle / "agency.key").read_bytes()) == before


def test_issue_with_force_replaces_the_agency_certificate(fresh_ca: CertificateAuthority) -> None:
    bundle = fresh_ca.issue_agency("nocr")
    old = (bundle / "agency.crt").read_bytes()

    fresh_ca.issue_agency("nocr", force=True)

    assert (bundle / "agency.crt").read_bytes() != old
    assert mode(bundle / "agency.key") == 0o600


def test_issue_refuses_to_overwrite_the_broker_certificate_without_force(
    fresh_ca: CertificateAuthority,
) -> None:
    path = fresh_ca.issue_broker()
    before = path.read_bytes()

    with pytest.raises(PkiError) as excinfo:
        fresh_ca.issue_broker()

    assert str(excinfo.value) == f"{path}: the broker already has a certificate; pass --force"
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "agency_id",
    [
        "NOCR",
        "1nocr",
        "no_cr",
        "",
        "../nocr",
        "a" * 64,
        pytest.param("nocr\n", id="trailing-newline"),
    ],
)
def test_bad_agency_id_is_refused_before_anything_is_written(
    fresh_ca: CertificateAuthority, agency_id: str
) -> None:
    with pytest.raises(PkiError) as excinfo:
        fresh_ca.issue_agency(agency_id)

    assert str(excinfo.value).startswith(f"agency id {agency_id!r} must be lower-case letters")
    assert not (fresh_ca.dir / "agencies").exists()
    assert list(fresh_ca.issued()) == []


# --- Revocation and the record of issues ----------------------------------------------------


def test_new_ca_publishes_an_empty_crl_it_signed(fresh_ca: CertificateAuthority) -> None:
    crl = load_crl(fresh_ca.dir / "crl.pem", fresh_ca.cert)

    assert len(crl) == 0
    assert crl.issuer == fresh_ca.cert.subject
    assert fresh_ca.revoked_serials() == set()


def test_revoke_lists_every_certificate_ever_issued_to_the_agency(
    fresh_ca: CertificateAuthority,
) -> None:
    first = read_cert(fresh_ca.issue_agency("nocr") / "agency.crt").serial_number
    second = read_cert(fresh_ca.issue_agency("nocr", force=True) / "agency.crt").serial_number

    revoked = fresh_ca.revoke_agency("nocr")

    assert sorted(revoked) == sorted([first, second])
    assert revoked_in_crl(fresh_ca) == {first, second}


def test_revoking_one_agency_leaves_the_others_valid(fresh_ca: CertificateAuthority) -> None:
    nocr = read_cert(fresh_ca.issue_agency("nocr") / "agency.crt").serial_number
    post = read_cert(fresh_ca.issue_agency("post") / "agency.crt").serial_number
    broker = read_cert(fresh_ca.issue_broker()).serial_number

    fresh_ca.revoke_agency("nocr")

    assert revoked_in_crl(fresh_ca) == {nocr}
    assert post not in revoked_in_crl(fresh_ca)
    assert broker not in revoked_in_crl(fresh_ca)


def test_revocations_accumulate_in_the_crl(fresh_ca: CertificateAuthority) -> None:
    nocr = read_cert(fresh_ca.issue_agency("nocr") / "agency.crt").serial_number
    post = read_cert(fresh_ca.issue_agency("post") / "agency.crt").serial_number

    fresh_ca.revoke_agency("nocr")
    fresh_ca.revoke_agency("post")

    assert revoked_in_crl(fresh_ca) == {nocr, post}
    assert mode(fresh_ca.dir / "crl.pem") == 0o644


def test_revoking_an_agency_that_was_never_issued_is_refused(
    fresh_ca: CertificateAuthority,
) -> None:
    fresh_ca.issue_agency("nocr")
    crl_before = (fresh_ca.dir / "crl.pem").read_bytes()

    with pytest.raises(PkiError) as excinfo:
        fresh_ca.revoke_agency("post")

    assert str(excinfo.value) == (
        f"{fresh_ca.dir}: no certificate was ever issued to agency 'post'"
    )
    assert (fresh_ca.dir / "crl.pem").read_bytes() == crl_before


def test_issued_log_records_each_issue(fresh_ca: CertificateAuthority) -> None:
    first = read_cert(fresh_ca.issue_agency("nocr") / "agency.crt")
    broker = read_cert(fresh_ca.issue_broker())
    second = read_cert(fresh_ca.issue_agency("nocr", force=True) / "agency.crt")

    lines = (fresh_ca.dir / "issued.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]

    assert records == [
        {
            "serial": first.serial_number,
            "spiffe_id": f"spiffe://{TRUST_DOMAIN}/agency/nocr",
            "not_after": first.not_valid_after_utc.isoformat(),
            "path": "agencies/nocr/agency.crt",
        },
        {
            "serial": broker.serial_number,
            "spiffe_id": f"spiffe://{TRUST_DOMAIN}/broker",
            "not_after": broker.not_valid_after_utc.isoformat(),
            "path": "broker.crt",
        },
        {
            "serial": second.serial_number,
            "spiffe_id": f"spiffe://{TRUST_DOMAIN}/agency/nocr",
            "not_after": second.not_valid_after_utc.isoformat(),
            "path": "agencies/nocr/agency.crt",
        },
    ]
    assert [c.serial for c in fresh_ca.issued()] == [r["serial"] for r in records]


# --- trust_domain_of and load_crl -----------------------------------------------------------


def test_trust_domain_of_a_certificate_without_san_is_refused() -> None:
    with pytest.raises(PkiError, match=r"names no trust domain \(no SAN\)"):
        trust_domain_of(self_signed([]))


def test_trust_domain_of_a_certificate_without_a_bare_spiffe_uri_is_refused() -> None:
    cert = self_signed(
        [
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/agency/nocr"),
                    x509.UniformResourceIdentifier("https://tabadol.test"),
                    x509.DNSName(TRUST_DOMAIN),
                ]
            )
        ]
    )

    with pytest.raises(PkiError, match=r"names no trust domain \(no spiffe:// URI\)"):
        trust_domain_of(cert)


def test_trust_domain_of_picks_the_bare_spiffe_uri_among_others() -> None:
    cert = self_signed(
        [
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("https://tabadol.test"),
                    x509.UniformResourceIdentifier("spiffe://gov.example"),
                ]
            )
        ]
    )

    assert trust_domain_of(cert) == "gov.example"


def test_missing_crl_is_named(ca: CertificateAuthority, tmp_path: Path) -> None:
    with pytest.raises(PkiError) as excinfo:
        load_crl(tmp_path / "crl.pem", ca.cert)

    assert str(excinfo.value) == f"{tmp_path / 'crl.pem'}: CRL missing"


def test_crl_that_is_not_pem_is_named(ca: CertificateAuthority, tmp_path: Path) -> None:
    (tmp_path / "crl.pem").write_bytes(
        b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n"
    )

    with pytest.raises(PkiError) as excinfo:
        load_crl(tmp_path / "crl.pem", ca.cert)

    assert str(excinfo.value).startswith(f"{tmp_path / 'crl.pem'}: not a PEM CRL")


def test_crl_signed_by_another_ca_is_refused(
    ca: CertificateAuthority, impostor_ca: CertificateAuthority
) -> None:
    path = impostor_ca.dir / "crl.pem"

    with pytest.raises(PkiError) as excinfo:
        load_crl(path, ca.cert)

    assert str(excinfo.value) == f"{path}: CRL is not signed by the platform CA"


# --- BrokerCredentials.load ----------------------------------------------------------------


@pytest.fixture
def broker_pki(ca: CertificateAuthority, tmp_path: Path) -> Path:
    """A copy of the module CA's directory that a test may damage."""
    return Path(shutil.copytree(ca.dir, tmp_path / "pki"))


def broker_load_error(pki_dir: Path, trust_domain: str = TRUST_DOMAIN) -> str:
    with pytest.raises(ConfigError) as excinfo:
        BrokerCredentials.load(pki_dir, trust_domain, CONFIG)
    return str(excinfo.value)


def test_broker_credentials_load_from_a_complete_pki_dir(broker_pki: Path) -> None:
    creds = BrokerCredentials.load(broker_pki, TRUST_DOMAIN, CONFIG)

    assert creds.ca_pem == (broker_pki / "ca.crt").read_bytes()
    assert creds.cert_pem == (broker_pki / "broker.crt").read_bytes()
    assert creds.key_pem == (broker_pki / "broker.key").read_bytes()
    assert creds.revoked == frozenset()


def test_broker_credentials_carry_the_revoked_serials(broker_pki: Path) -> None:
    serials = CertificateAuthority(broker_pki).revoke_agency("nocr")

    creds = BrokerCredentials.load(broker_pki, TRUST_DOMAIN, CONFIG)

    assert creds.revoked == frozenset(serials)


@pytest.mark.parametrize("name", ["ca.crt", "broker.crt", "broker.key"])
def test_missing_broker_file_is_named_with_the_configuration(broker_pki: Path, name: str) -> None:
    (broker_pki / name).unlink()

    message = broker_load_error(broker_pki)

    assert message == (
        f"{CONFIG}: [broker] pki_dir: {broker_pki / name}: cannot read: No such file or directory"
    )


def test_missing_crl_is_named_with_the_configuration(broker_pki: Path) -> None:
    (broker_pki / "crl.pem").unlink()

    message = broker_load_error(broker_pki)

    assert message == f"{CONFIG}: [broker] pki_dir: {broker_pki / 'crl.pem'}: CRL missing"


def test_unreadable_broker_key_is_named(broker_pki: Path) -> None:
    # A directory cannot be read as a file even by root, unlike a file with mode 000.
    (broker_pki / "broker.key").unlink()
    (broker_pki / "broker.key").mkdir()

    message = broker_load_error(broker_pki)

    assert (
        message
        == f"{CONFIG}: [broker] pki_dir: {broker_pki / 'broker.key'}: cannot read: Is a directory"
    )


def test_ca_certificate_that_is_not_pem_is_named(broker_pki: Path) -> None:
    (broker_pki / "ca.crt").write_bytes(b"not a certificate")

    message = broker_load_error(broker_pki)

    assert message.startswith(
        f"{CONFIG}: [broker] pki_dir: {broker_pki / 'ca.crt'}: not a PEM certificate"
    )


def test_broker_key_that_is_not_a_key_is_named_without_echoing_it(broker_pki: Path) -> None:
    secret = (
        b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0IGtleSBtYXRlcmlhbA==\n-----END PRIVATE KEY-----\n"
    )
    (broker_pki / "broker.key").write_bytes(secret)

    message = broker_load_error(broker_pki)

    assert message == (
        f"{CONFIG}: [broker] pki_dir: {broker_pki / 'broker.key'}: "
        "not an unencrypted PEM private key"
    )
    assert "c2VjcmV0" not in message


def test_broker_key_that_does_not_match_the_certificate_is_refused(broker_pki: Path) -> None:
    shutil.copyfile(broker_pki / "agencies" / "nocr" / "agency.key", broker_pki / "broker.key")

    message = broker_load_error(broker_pki)

    assert (
        message
        == f"{CONFIG}: [broker] pki_dir: {broker_pki / 'broker.key'}: does not match broker.crt"
    )


def test_ca_of_another_trust_domain_is_refused(broker_pki: Path) -> None:
    message = broker_load_error(broker_pki, trust_domain="other.test")

    assert message == (
        f"{CONFIG}: [broker] pki_dir: {broker_pki / 'ca.crt'}: CA is for trust domain "
        f"'{TRUST_DOMAIN}', configuration says 'other.test'"
    )


def test_agency_certificate_in_place_of_the_broker_certificate_is_refused(broker_pki: Path) -> None:
    bundle = broker_pki / "agencies" / "nocr"
    shutil.copyfile(bundle / "agency.crt", broker_pki / "broker.crt")
    shutil.copyfile(bundle / "agency.key", broker_pki / "broker.key")

    message = broker_load_error(broker_pki)

    assert message == (
        f"{CONFIG}: [broker] pki_dir: {broker_pki / 'broker.crt'}: not a broker certificate: "
        f"expected spiffe://{TRUST_DOMAIN}/broker"
    )


def test_broker_certificate_not_signed_by_the_ca_is_refused(
    broker_pki: Path, impostor_ca: CertificateAuthority
) -> None:
    shutil.copyfile(impostor_ca.dir / "broker.crt", broker_pki / "broker.crt")
    shutil.copyfile(impostor_ca.dir / "broker.key", broker_pki / "broker.key")

    message = broker_load_error(broker_pki)

    assert message == (
        f"{CONFIG}: [broker] pki_dir: {broker_pki / 'broker.crt'}: not signed by the CA in ca.crt"
    )


def test_crl_signed_by_another_ca_is_refused_at_broker_load(
    broker_pki: Path, impostor_ca: CertificateAuthority
) -> None:
    shutil.copyfile(impostor_ca.dir / "crl.pem", broker_pki / "crl.pem")

    message = broker_load_error(broker_pki)

    assert message == (
        f"{CONFIG}: [broker] pki_dir: {broker_pki / 'crl.pem'}: "
        "CRL is not signed by the platform CA"
    )


# --- AgencyCredentials.load (the client side) ----------------------------------------------


def test_agency_credentials_load_the_bundle_and_its_identity(ca: CertificateAuthority) -> None:
    bundle = ca.dir / "agencies" / "nocr"

    creds = AgencyCredentials.load(bundle)

    assert creds.agency_id == "nocr"
    assert creds.trust_domain == TRUST_DOMAIN
    assert creds.ca_pem == (bundle / "ca.crt").read_bytes()
    assert creds.cert_pem == (bundle / "agency.crt").read_bytes()
    assert creds.key_pem == (bundle / "agency.key").read_bytes()


def test_agency_credentials_accept_a_string_path(ca: CertificateAuthority) -> None:
    assert AgencyCredentials.load(str(ca.dir / "agencies" / "nocr")).agency_id == "nocr"


@pytest.mark.parametrize("name", ["ca.crt", "agency.crt", "agency.key"])
def test_missing_agency_file_error_names_its_path(
    ca: CertificateAuthority, tmp_path: Path, name: str
) -> None:
    bundle = Path(shutil.copytree(ca.dir / "agencies" / "nocr", tmp_path / "nocr"))
    (bundle / name).unlink()

    with pytest.raises(CredentialsError) as excinfo:
        AgencyCredentials.load(bundle)

    assert str(excinfo.value) == f"{bundle / name}: cannot read: No such file or directory"


def test_agency_credentials_refuse_a_certificate_that_is_not_an_agencys(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    bundle = Path(shutil.copytree(ca.dir / "agencies" / "nocr", tmp_path / "nocr"))
    shutil.copyfile(ca.dir / "broker.crt", bundle / "agency.crt")

    with pytest.raises(CredentialsError) as excinfo:
        AgencyCredentials.load(bundle)

    assert str(excinfo.value) == (
        f"{bundle / 'agency.crt'}: carries no spiffe://.../agency/<id> identity"
    )


def test_agency_credentials_refuse_garbage_in_place_of_the_certificate(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    bundle = Path(shutil.copytree(ca.dir / "agencies" / "nocr", tmp_path / "nocr"))
    (bundle / "agency.crt").write_bytes(b"garbage")

    with pytest.raises(CredentialsError) as excinfo:
        AgencyCredentials.load(bundle)

    assert str(excinfo.value) == f"{bundle / 'agency.crt'}: not a Tabadol agency certificate"


def test_agency_credentials_repr_never_contains_key_material(ca: CertificateAuthority) -> None:
    creds = AgencyCredentials.load(ca.dir / "agencies" / "nocr")
    key_lines = [
        line
        for line in creds.key_pem.decode().splitlines()
        if line and not line.startswith("-----")
    ]

    for shown in (repr(creds), str(creds), f"{creds}", repr([creds])):
        assert "nocr" in shown
        assert "PRIVATE KEY" not in shown
        assert "key_pem" not in shown
        assert not any(line in shown for line in key_lines)


# --- The `tabadol` command ------------------------------------------------------------------


def test_pki_init_issue_and_revoke_work_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = tmp_path / "pki"

    assert main(["pki", "init", "--dir", str(pki), "--trust-domain", TRUST_DOMAIN]) == 0
    assert main(["pki", "issue", "--dir", str(pki), "--agency", "nocr"]) == 0
    assert main(["pki", "issue", "--dir", str(pki), "--broker", "--dns", "broker.internal"]) == 0
    serial = read_cert(pki / "agencies" / "nocr" / "agency.crt").serial_number
    assert main(["pki", "revoke", "--dir", str(pki), "--agency", "nocr"]) == 0

    out = capsys.readouterr().out
    assert f"created the platform CA for {TRUST_DOMAIN}" in out
    assert "issued agency 'nocr'" in out
    assert "issued the broker certificate" in out
    assert "revoked 1 certificate(s) of agency 'nocr'" in out
    ca = CertificateAuthority(pki)
    assert ca.revoked_serials() == {serial}
    assert "broker.internal" in read_cert(pki / "broker.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)


def test_pki_init_twice_exits_2_with_the_error_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = tmp_path / "pki"
    assert main(["pki", "init", "--dir", str(pki), "--trust-domain", TRUST_DOMAIN]) == 0
    ca_crt = (pki / "ca.crt").read_bytes()
    capsys.readouterr()

    assert main(["pki", "init", "--dir", str(pki), "--trust-domain", TRUST_DOMAIN]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"tabadol: error: {pki}: a CA already exists here; refusing to overwrite it\n"
    )
    assert (pki / "ca.crt").read_bytes() == ca_crt


def test_pki_revoke_of_an_unknown_agency_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = tmp_path / "pki"
    assert main(["pki", "init", "--dir", str(pki), "--trust-domain", TRUST_DOMAIN]) == 0

    assert main(["pki", "revoke", "--dir", str(pki), "--agency", "ghost"]) == 2

    assert "no certificate was ever issued to agency 'ghost'" in capsys.readouterr().err


def test_help_exits_0_and_names_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])

    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ")}
    assert {"broker", "pki", "demo", "config"} <= listed


def test_a_server_certificate_names_each_name_once(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "pki", "exchange.example")
    path = ca.issue_broker(
        dns_names=["broker.exchange.example", "node1.exchange.example", "node1.exchange.example"],
        ips=["10.0.0.11", "10.0.0.11"],
    )
    names = (
        x509.load_pem_x509_certificate(path.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert names.get_values_for_type(x509.DNSName) == [
        "broker.exchange.example",
        "node1.exchange.example",
    ]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.11"]
