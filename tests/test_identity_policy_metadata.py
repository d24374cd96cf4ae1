"""Specification of the pure core of a call: who is calling, may they, and what metadata crosses."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tabadol.contracts import Contracts
from tabadol.identity import (
    ConsumerIdentity,
    IdentityRejected,
    agency_id_from_spiffe,
    identify_consumer,
    spiffe_ids,
)
from tabadol.metadata import (
    CONSUMER_KEY,
    HOP_BY_HOP,
    REQUEST_ID_KEY,
    STATUS_DETAILS_KEY,
    request_metadata,
    response_metadata,
)
from tabadol.pki import CertificateAuthority
from tabadol.policy import GrantRule, Policy, purpose_header
from tabadol.spiffe import (
    agency_dns_name,
    agency_spiffe_id,
    broker_dns_name,
    broker_spiffe_id,
    trust_domain_of_agency,
)
from tests.support.echo import (
    BIDI,
    CLIENT_STREAM,
    SERVER_STREAM,
    SERVICE,
    UNARY,
    echo_file_descriptor,
)

TRUST_DOMAIN = "tabadol.test"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    ca = CertificateAuthority.init(tmp_path_factory.mktemp("pki") / "ca", TRUST_DOMAIN)
    ca.issue_agency("nocr")
    ca.issue_broker()
    return ca


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    ca = CertificateAuthority.init(tmp_path_factory.mktemp("pki") / "foreign", "other.test")
    ca.issue_agency("nocr")
    return ca


def agency_pem(ca: CertificateAuthority, agency_id: str = "nocr") -> bytes:
    return (ca.dir / "agencies" / agency_id / "agency.crt").read_bytes()


def leaf_with_uris(ca: CertificateAuthority, uris: list[str]) -> bytes:
    """A certificate the CA signed whose SAN holds these URIs and one DNS name."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crafted")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([*sans, x509.DNSName("crafted.tabadol.test")]),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# --- spiffe: names shared by both sides ------------------------------------------------------


def test_agency_and_broker_names_follow_the_trust_domain() -> None:
    assert agency_spiffe_id("gov.example", "nocr") == "spiffe://gov.example/agency/nocr"
    assert broker_spiffe_id("gov.example") == "spiffe://gov.example/broker"
    assert agency_dns_name("gov.example", "nocr") == "nocr.agency.gov.example"
    assert broker_dns_name("gov.example") == "broker.gov.example"


def test_agency_spiffe_id_splits_into_trust_domain_and_agency() -> None:
    assert trust_domain_of_agency("spiffe://gov.example/agency/post-2") == ("gov.example", "post-2")


@pytest.mark.parametrize(
    "spiffe_id",
    [
        "gov.example/agency/nocr",
        "https://gov.example/agency/nocr",
        "spiffe://gov.example/broker",
        "spiffe://gov.example",
        "spiffe://gov.example/agency/",
        "spiffe://gov.example/agency/NOCR",
        "spiffe://gov.example/agency/nocr/extra",
        "spiffe://gov.example/workload/nocr",
    ],
)
def test_anything_but_an_agency_spiffe_id_is_not_split(spiffe_id: str) -> None:
    with pytest.raises(ValueError, match="is not a Tabadol agency identity"):
        trust_domain_of_agency(spiffe_id)


# --- identity: who is calling ---------------------------------------------------------------


def test_agency_certificate_identifies_the_agency(ca: CertificateAuthority) -> None:
    pem = agency_pem(ca)
    cert = x509.load_pem_x509_certificate(pem)

    identity = identify_consumer(pem, trust_domain=TRUST_DOMAIN, revoked=())

    assert identity == ConsumerIdentity(
        agency_id="nocr",
        serial=cert.serial_number,
        expires_at=cert.not_valid_after_utc.timestamp(),
    )


def test_broker_certificate_cannot_call_as_a_consumer(ca: CertificateAuthority) -> None:
    pem = (ca.dir / "broker.crt").read_bytes()

    with pytest.raises(IdentityRejected) as excinfo:
        identify_consumer(pem, trust_domain=TRUST_DOMAIN, revoked=())

    assert str(excinfo.value) == (
        f"certificate identity 'spiffe://{TRUST_DOMAIN}/broker' is not an agency of {TRUST_DOMAIN}"
    )


def test_ca_certificate_cannot_call_as_a_consumer(ca: CertificateAuthority) -> None:
    with pytest.raises(IdentityRejected, match="is not an agency of"):
        identify_consumer((ca.dir / "ca.crt").read_bytes(), trust_domain=TRUST_DOMAIN, revoked=())


def test_certificate_with_two_spiffe_ids_is_rejected(ca: CertificateAuthority) -> None:
    pem = leaf_with_uris(
        ca,
        [agency_spiffe_id(TRUST_DOMAIN, "nocr"), agency_spiffe_id(TRUST_DOMAIN, "post")],
    )

    with pytest.raises(IdentityRejected) as excinfo:
        identify_consumer(pem, trust_domain=TRUST_DOMAIN, revoked=())

    assert str(excinfo.value) == "certificate must carry exactly one SPIFFE ID, found 2"


def test_certificate_with_no_spiffe_id_is_rejected(ca: CertificateAuthority) -> None:
    pem = leaf_with_uris(ca, ["https://nocr.example/"])

    with pytest.raises(IdentityRejected) as excinfo:
        identify_consumer(pem, trust_domain=TRUST_DOMAIN, revoked=())

    assert str(excinfo.value) == "certificate must carry exactly one SPIFFE ID, found 0"


def test_non_spiffe_uris_beside_one_spiffe_id_do_not_count(ca: CertificateAuthority) -> None:
    pem = leaf_with_uris(ca, ["https://nocr.example/", agency_spiffe_id(TRUST_DOMAIN, "nocr")])

    assert identify_consumer(pem, trust_domain=TRUST_DOMAIN, revoked=()).agency_id == "nocr"
    assert spiffe_ids(x509.load_pem_x509_certificate(pem)) == [
        agency_spiffe_id(TRUST_DOMAIN, "nocr")
    ]


def test_agency_of_another_trust_domain_is_rejected(foreign_ca: CertificateAuthority) -> None:
    with pytest.raises(IdentityRejected) as excinfo:
        identify_consumer(agency_pem(foreign_ca), trust_domain=TRUST_DOMAIN, revoked=())

    assert str(excinfo.value) == (
        f"certificate identity 'spiffe://other.test/agency/nocr' is not an agency of {TRUST_DOMAIN}"
    )


def test_trust_domain_that_merely_starts_like_ours_is_rejected(ca: CertificateAuthority) -> None:
    pem = leaf_with_uris(ca, [f"spiffe://{TRUST_DOMAIN}.evil/agency/nocr"])

    with pytest.raises(IdentityRejected, match="is not an agency of"):
        identify_consumer(pem, trust_domain=TRUST_DOMAIN, revoked=())


@pytest.mark.parametrize(
    "agency_id",
    ["NOCR", "nocr/admin", "", "1nocr", pytest.param("nocr\n", id="trailing-newline")],
)
def test_malformed_agency_id_in_the_certificate_is_rejected(
    ca: CertificateAuthority, agency_id: str
) -> None:
    pem = leaf_with_uris(ca, [f"spiffe://{TRUST_DOMAIN}/agency/{agency_id}"])

    with pytest.raises(IdentityRejected, match="has a malformed agency id"):
        identify_consumer(pem, trust_domain=TRUST_DOMAIN, revoked=())


def test_revoked_certificate_is_rejected_naming_agency_and_serial(ca: CertificateAuthority) -> None:
    pem = agency_pem(ca)
    serial = x509.load_pem_x509_certificate(pem).serial_number

    with pytest.raises(IdentityRejected) as excinfo:
        identify_consumer(pem, trust_domain=TRUST_DOMAIN, revoked={1, serial})

    assert str(excinfo.value) == f"certificate {serial:x} of agency 'nocr' has been revoked"


def test_revocation_of_another_serial_does_not_reject(ca: CertificateAuthority) -> None:
    pem = agency_pem(ca)
    serial = x509.load_pem_x509_certificate(pem).serial_number

    assert (
        identify_consumer(pem, trust_domain=TRUST_DOMAIN, revoked={serial + 1}).agency_id == "nocr"
    )


def test_certificate_is_rejected_after_it_expires(ca: CertificateAuthority) -> None:
    pem = agency_pem(ca)
    not_after = x509.load_pem_x509_certificate(pem).not_valid_after_utc

    with pytest.raises(IdentityRejected) as excinfo:
        identify_consumer(
            pem,
            trust_domain=TRUST_DOMAIN,
            revoked=(),
            now=lambda: not_after + dt.timedelta(seconds=1),
        )

    assert str(excinfo.value) == "certificate of agency 'nocr' is outside its validity period"


def test_certificate_is_rejected_before_it_becomes_valid(ca: CertificateAuthority) -> None:
    pem = agency_pem(ca)
    not_before = x509.load_pem_x509_certificate(pem).not_valid_before_utc

    with pytest.raises(IdentityRejected, match="outside its validity period"):
        identify_consumer(
            pem,
            trust_domain=TRUST_DOMAIN,
            revoked=(),
            now=lambda: not_before - dt.timedelta(seconds=1),
        )


@pytest.mark.parametrize("edge", ["not_valid_before_utc", "not_valid_after_utc"])
def test_certificate_is_accepted_at_either_edge_of_its_validity(
    ca: CertificateAuthority, edge: str
) -> None:
    pem = agency_pem(ca)
    instant: dt.datetime = getattr(x509.load_pem_x509_certificate(pem), edge)

    identity = identify_consumer(pem, trust_domain=TRUST_DOMAIN, revoked=(), now=lambda: instant)

    assert identity.agency_id == "nocr"


def test_certificate_issued_in_the_past_for_one_day_is_rejected_now(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    bundle = ca.issue_agency("old", not_before=start, days=1)

    with pytest.raises(
        IdentityRejected, match="certificate of agency 'old' is outside its validity"
    ):
        identify_consumer(
            (bundle / "agency.crt").read_bytes(), trust_domain=TRUST_DOMAIN, revoked=()
        )


def test_agency_id_from_spiffe_reads_only_our_trust_domain() -> None:
    assert agency_id_from_spiffe("spiffe://tabadol.test/agency/tax", TRUST_DOMAIN) == "tax"
    with pytest.raises(IdentityRejected, match=r"is not an agency of tabadol\.test$"):
        agency_id_from_spiffe("spiffe://tabadol.test/broker", TRUST_DOMAIN)


# --- policy: may they call this method ------------------------------------------------------


@pytest.fixture(scope="module")
def contracts() -> Contracts:
    return Contracts.from_files([echo_file_descriptor()])


ALL_ECHO_METHODS = frozenset({UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI})
NOW = 1_800_000_000.0  # POSIX seconds: the wall time the calls are judged at


def test_a_grant_admits_until_its_expiry_and_not_from_then_on(contracts: Contracts) -> None:
    expiring = GrantRule("post", SERVICE, ("Unary",), "g-1", "Postal Act", expires_at=NOW + 60)
    policy = Policy.from_grants([expiring], contracts)

    assert policy.grant_for("post", UNARY, NOW + 59.9) == expiring
    assert policy.grant_for("post", UNARY, NOW + 60) is None
    assert not policy.allows("post", UNARY, NOW + 61)
    assert policy.allowed_paths("post", NOW + 60) == frozenset()
    assert policy.next_expiry("post", NOW) == NOW + 60
    assert policy.next_expiry("post", NOW + 60) == float("inf")


def test_an_expired_grant_gives_way_to_another_that_still_holds(contracts: Contracts) -> None:
    old = GrantRule("post", SERVICE, ("*",), "g-old", expires_at=NOW)
    lasting = GrantRule("post", SERVICE, ("Unary",), "g-lasting")
    policy = Policy.from_grants([old, lasting], contracts)

    assert policy.grant_for("post", UNARY, NOW - 1) == old  # the first that holds
    assert policy.grant_for("post", UNARY, NOW) == lasting
    assert policy.grant_for("post", BIDI, NOW) is None
    assert policy.allowed_paths("post", NOW) == {UNARY}


def test_the_purpose_header_is_ascii_and_reads_back_as_written() -> None:
    import urllib.parse

    reference = "قانون مدیریت داده‌ها ماده ۷"  # noqa: RUF001
    value = purpose_header(reference, "ignored when a reference is given")

    assert value.isascii()
    assert urllib.parse.unquote(value) == reference
    assert purpose_header(None, "Verifying a sender") == "Verifying a sender"
    assert purpose_header(None, None) == ""
    assert "\n" not in urllib.parse.quote("a\nb") and purpose_header("a\nb", None) == "a%0Ab"


def test_the_provider_is_told_the_grant_and_its_purpose_and_callers_cannot_forge_them() -> None:
    forged = [("x-tabadol-grant", "g-forged"), ("x-tabadol-purpose", "forged")]
    headers = request_metadata(forged, "post", "r-1", (), "g-real", "Postal%20Act")

    assert ("x-tabadol-grant", "g-real") in headers
    assert ("x-tabadol-purpose", "Postal%20Act") in headers
    assert not any(v in ("g-forged", "forged") for _, v in headers)
    bare = dict(request_metadata((), "post", "r-1"))
    assert "x-tabadol-grant" not in bare and "x-tabadol-purpose" not in bare


def test_nothing_is_allowed_without_grants(contracts: Contracts) -> None:
    policy = Policy.from_grants([], contracts)

    for path in ALL_ECHO_METHODS:
        assert not policy.allows("nocr", path, NOW)
    assert policy.allowed_paths("nocr", NOW) == frozenset()


def test_star_grants_every_method_of_the_service(contracts: Contracts) -> None:
    policy = Policy.from_grants([GrantRule("post", SERVICE, ("*",))], contracts)

    assert policy.allowed_paths("post", NOW) == ALL_ECHO_METHODS
    assert all(policy.allows("post", path, NOW) for path in ALL_ECHO_METHODS)


def test_grant_for_one_method_does_not_allow_another(contracts: Contracts) -> None:
    policy = Policy.from_grants([GrantRule("post", SERVICE, ("Unary",))], contracts)

    assert policy.allows("post", UNARY, NOW)
    assert not policy.allows("post", SERVER_STREAM, NOW)
    assert not policy.allows("post", CLIENT_STREAM, NOW)
    assert not policy.allows("post", BIDI, NOW)


def test_grant_to_one_consumer_does_not_allow_another(contracts: Contracts) -> None:
    policy = Policy.from_grants([GrantRule("post", SERVICE, ("*",))], contracts)

    assert not policy.allows("tax", UNARY, NOW)
    assert policy.allowed_paths("tax", NOW) == frozenset()


def test_unknown_consumer_is_denied(contracts: Contracts) -> None:
    policy = Policy.from_grants([GrantRule("post", SERVICE, ("Unary",))], contracts)

    assert not policy.allows("ghost", UNARY, NOW)
    assert not policy.allows("", UNARY, NOW)


def test_grants_for_the_same_consumer_add_up(contracts: Contracts) -> None:
    policy = Policy.from_grants(
        [GrantRule("post", SERVICE, ("Unary",)), GrantRule("post", SERVICE, ("Bidi",))],
        contracts,
    )

    assert policy.allowed_paths("post", NOW) == {UNARY, BIDI}


def test_paths_outside_the_contracts_are_denied(contracts: Contracts) -> None:
    policy = Policy.from_grants([GrantRule("post", SERVICE, ("*",))], contracts)

    assert not policy.allows("post", f"/{SERVICE}/Missing", NOW)
    assert not policy.allows("post", "/tabadol.test.v1.Other/Unary", NOW)
    assert not policy.allows("post", f"{SERVICE}/Unary", NOW)
    assert not policy.allows("post", f"/{SERVICE}/unary", NOW)


def test_grant_for_a_service_missing_from_the_contracts_allows_nothing(
    contracts: Contracts,
) -> None:
    policy = Policy.from_grants(
        [
            GrantRule("post", "tabadol.test.v1.Other", ("*",)),
            GrantRule("tax", SERVICE, ("Missing",)),
        ],
        contracts,
    )

    assert policy.allowed_paths("post", NOW) == frozenset()
    assert policy.allowed_paths("tax", NOW) == frozenset()


# --- metadata: what crosses the broker ------------------------------------------------------


def test_request_metadata_keeps_application_keys_and_appends_the_platform_headers() -> None:
    incoming: list[tuple[str, str | bytes]] = [
        ("x-trace", "abc"),
        ("x-blob-bin", b"\x00\xff"),
        ("authorization-hint", "x"),
    ]

    out = request_metadata(incoming, "post", "req-1")

    assert out == (
        ("x-trace", "abc"),
        ("x-blob-bin", b"\x00\xff"),
        ("authorization-hint", "x"),
        (CONSUMER_KEY, "post"),
        (REQUEST_ID_KEY, "req-1"),
    )


@pytest.mark.parametrize("key", sorted(HOP_BY_HOP))
def test_request_metadata_strips_hop_by_hop_headers(key: str) -> None:
    assert request_metadata([(key, "v"), ("x-keep", "1")], "post", "r") == (
        ("x-keep", "1"),
        (CONSUMER_KEY, "post"),
        (REQUEST_ID_KEY, "r"),
    )


@pytest.mark.parametrize(
    "key",
    [
        ":authority",
        ":path",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        STATUS_DETAILS_KEY,
    ],
)
def test_request_metadata_strips_pseudo_and_grpc_reserved_keys(key: str) -> None:
    assert request_metadata([(key, "v")], "post", "r") == (
        (CONSUMER_KEY, "post"),
        (REQUEST_ID_KEY, "r"),
    )


def test_caller_cannot_claim_another_consumer_or_request_id() -> None:
    incoming: list[tuple[str, str | bytes]] = [
        (CONSUMER_KEY, "nocr"),
        (REQUEST_ID_KEY, "forged"),
        ("x-tabadol-anything", "forged"),
        ("x-tabadol-trace-bin", b"forged"),
    ]

    out = request_metadata(incoming, "post", "req-7")

    assert out == ((CONSUMER_KEY, "post"), (REQUEST_ID_KEY, "req-7"))
    assert [v for k, v in out if k == CONSUMER_KEY] == ["post"]


def test_request_metadata_keeps_repeated_keys_in_order() -> None:
    incoming = [("x-tag", "a"), ("x-tag", "b")]

    assert request_metadata(incoming, "post", "r")[:2] == (("x-tag", "a"), ("x-tag", "b"))


def test_response_metadata_keeps_status_details_and_binary_values() -> None:
    incoming: list[tuple[str, str | bytes]] = [
        (STATUS_DETAILS_KEY, b"\x08\x05\x12\x03bad"),
        ("x-test-trailer-bin", b"\x00\x01\x02"),
        ("x-provider-note", "ok"),
    ]

    assert response_metadata(incoming) == tuple(incoming)


def test_response_metadata_strips_platform_and_reserved_keys() -> None:
    incoming = [
        (CONSUMER_KEY, "nocr"),
        ("x-tabadol-anything", "x"),
        ("grpc-status", "0"),
        ("grpc-message", "fine"),
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("x-keep", "1"),
    ]

    assert response_metadata(incoming) == (("x-keep", "1"),)


@pytest.mark.parametrize("incoming", [None, (), []])
def test_response_metadata_of_nothing_is_empty(incoming: list[tuple[str, str]] | None) -> None:
    assert response_metadata(incoming) == ()
