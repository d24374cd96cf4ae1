"""The admission decision, without gRPC: every rule, in the order the broker applies them."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tabadol import admission
from tabadol.admission import (
    NOBODY,
    Admitted,
    Caller,
    CallFacts,
    FloodRecords,
    Identities,
    Now,
    Refused,
    Rules,
    admit,
    admit_platform,
    trailers_of,
)
from tabadol.balancer import UntrustedProvider
from tabadol.contracts import MethodContract, RpcKind
from tabadol.identity import ConsumerIdentity, IdentityRejected
from tabadol.limits import LimitRule, Limits
from tabadol.metadata import CONSUMER_KEY, REQUEST_ID_KEY
from tabadol.pki import CertificateAuthority
from tabadol.policy import GrantRule, Policy
from tabadol.status import Code

LOOKUP = MethodContract("demo.v1.People", "Lookup", RpcKind.UNARY)
SECRET = MethodContract("demo.v1.People", "Secret", RpcKind.UNARY)
NOW = Now(wall=time.time(), monotonic=1000.0)
TAX_GRANT = GrantRule("tax", "demo.v1.People", ("Lookup",), "g-tax", "Tax%20Act", NOW.wall + 3600)
TRACE = (("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"),)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Endpoints:
    """A route's endpoints as the balancer gives them: the next one, or untrusted."""

    def __init__(self, *names: str, untrusted: UntrustedProvider | None = None) -> None:
        self.names, self.untrusted, self.picks = list(names), untrusted, 0

    def pick(self, now: float) -> str:
        if self.untrusted is not None:
            raise self.untrusted
        self.picks += 1
        return self.names[(self.picks - 1) % len(self.names)]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    ca = CertificateAuthority.init(tmp_path_factory.mktemp("pki") / "pki", "test.tabadol")
    for agency in ("tax", "post", "stranger", "revoked"):
        ca.issue_agency(agency)
    ca.issue_person("operator", "maryam")
    ca.revoke_agency("revoked")
    return ca


def pem(ca: CertificateAuthority, agency: str) -> bytes:
    return (ca.dir / "agencies" / agency / "agency.crt").read_bytes()


def serial(ca: CertificateAuthority, agency: str) -> str:
    return next(f"{c.serial:x}" for c in ca.issued() if c.spiffe_id.endswith(f"/{agency}"))


def rules(
    ca: CertificateAuthority,
    *,
    limits: Limits | None = None,
    stale_at: float | None = None,
    floods: FloodRecords | None = None,
) -> Rules:
    return Rules(
        Identities(ca.trust_domain, frozenset(ca.revoked_serials()), stale_at),
        Policy({"tax": {LOOKUP.path: (TAX_GRANT,)}}),  # grants name only declared agencies
        frozenset({"tax", "post", "revoked"}),
        limits,
        floods or FloodRecords(),
    )


def facts(certificate: bytes | None, method: MethodContract = LOOKUP, **state: object) -> CallFacts:
    incoming = (
        ("x-tabadol-consumer", "forged"),
        ("traceparent", "00-" + "c" * 32 + "-" + "d" * 16 + "-01"),
        ("x-case", "42"),
    )
    return CallFacts(method, "cra", "r1", certificate, incoming, TRACE, **state)  # type: ignore[arg-type]


def refused(decision: object) -> Refused:
    assert isinstance(decision, Refused), decision
    return decision


def test_an_agency_with_a_grant_is_admitted_to_the_next_endpoint(ca: CertificateAuthority) -> None:
    endpoints = Endpoints("10.0.0.1:443", "10.0.0.2:443")
    decision = admit(facts(pem(ca, "tax")), rules(ca), endpoints, NOW)
    assert isinstance(decision, Admitted)
    assert decision.caller == Caller("tax", serial(ca, "tax"), True)
    assert decision.endpoint == "10.0.0.1:443"
    # The caller's own x-tabadol-* keys are dropped, its trace context replaced by the broker's.
    assert decision.headers == (
        ("x-case", "42"),
        *TRACE,
        (CONSUMER_KEY, "tax"),
        (REQUEST_ID_KEY, "r1"),
        ("x-tabadol-grant", "g-tax"),
        ("x-tabadol-purpose", "Tax%20Act"),
    )
    assert decision.grant == "g-tax"
    second = admit(facts(pem(ca, "tax")), rules(ca), endpoints, NOW)
    assert isinstance(second, Admitted) and second.endpoint == "10.0.0.2:443"


def test_a_grant_past_its_expiry_admits_nothing_with_no_one_acting(
    ca: CertificateAuthority,
) -> None:
    later = Now(TAX_GRANT.expires_at or 0, NOW.monotonic + 3600)
    decision = admit(facts(pem(ca, "tax")), rules(ca), Endpoints("10.0.0.1:443"), later)
    assert isinstance(decision, Refused)
    assert decision.code == Code.PERMISSION_DENIED and "has no grant" in decision.details


def test_the_access_service_admits_operators_and_declared_agencies_only(
    ca: CertificateAuthority,
) -> None:
    ca.issue_person("operator", "alice")
    operator = (ca.dir / "operators" / "alice" / "operator.crt").read_bytes()
    method = "tabadol.platform.v1.Access/ListGrants"
    assert admission.admit_access(operator, method, rules(ca), NOW) == ("operator", "alice")
    assert admission.admit_access(pem(ca, "tax"), method, rules(ca), NOW) == ("agency", "tax")
    ca.revoke_person("operator", "alice")
    revoked = rules(ca)
    refused = admission.admit_access(operator, method, revoked, NOW)
    assert isinstance(refused, Refused) and refused.code == Code.UNAUTHENTICATED
    assert "revoked" in refused.details
    stale = admission.admit_access(pem(ca, "tax"), method, rules(ca, stale_at=NOW.wall), NOW)
    assert isinstance(stale, Refused) and "out of date" in stale.details


@pytest.mark.parametrize(
    ("state", "code", "words", "recorded", "counted"),
    [
        ({"draining": True}, Code.UNAVAILABLE, "shutting down", True, ""),
        ({"registry_stale": "the registry is 90 s old"}, Code.UNAVAILABLE, "90 s old", True,
         "registry_stale"),
        ({"ledger_problem": "disk full"}, Code.UNAVAILABLE, "disk full", False,
         "ledger_unavailable"),
    ],
)  # fmt: skip
def test_the_brokers_own_state_refuses_before_anyone_is_identified(
    ca: CertificateAuthority,
    state: dict[str, object],
    code: Code,
    words: str,
    recorded: bool,
    counted: str,
) -> None:
    endpoints = Endpoints("e")
    for certificate in (pem(ca, "tax"), None):
        decision = refused(admit(facts(certificate, **state), rules(ca), endpoints, NOW))
        assert (decision.code, decision.recorded, decision.counted) == (code, recorded, counted)
        assert words in decision.details and decision.caller == NOBODY
    assert endpoints.picks == 0


def test_draining_comes_before_a_stale_registry_and_a_broken_ledger(
    ca: CertificateAuthority,
) -> None:
    everything = {"draining": True, "registry_stale": "stale", "ledger_problem": "full"}
    decision = refused(admit(facts(pem(ca, "tax"), **everything), rules(ca), Endpoints("e"), NOW))
    assert "shutting down" in decision.details
    del everything["draining"]
    decision = refused(admit(facts(pem(ca, "tax"), **everything), rules(ca), Endpoints("e"), NOW))
    assert decision.counted == "registry_stale"


def test_a_call_without_a_certificate_is_unauthenticated(ca: CertificateAuthority) -> None:
    decision = refused(admit(facts(None), rules(ca), Endpoints("e"), NOW))
    assert decision.code is Code.UNAUTHENTICATED
    assert decision.details == "Tabadol broker: no client certificate"
    assert decision.caller == NOBODY and decision.recorded


def test_a_revoked_certificate_is_recorded_as_whom_it_claims_unverified(
    ca: CertificateAuthority,
) -> None:
    decision = refused(admit(facts(pem(ca, "revoked")), rules(ca), Endpoints("e"), NOW))
    assert decision.code is Code.UNAUTHENTICATED and "revoked" in decision.details
    assert decision.caller == Caller("revoked", serial(ca, "revoked"), False)
    assert decision.warning is not None and decision.warning[0][0] == "identity"


def test_an_operators_certificate_cannot_call_a_service(ca: CertificateAuthority) -> None:
    operator = (ca.dir / "operators" / "maryam" / "operator.crt").read_bytes()
    decision = refused(admit(facts(operator), rules(ca), Endpoints("e"), NOW))
    assert decision.code is Code.UNAUTHENTICATED and decision.caller == NOBODY


def test_a_certificate_is_judged_by_the_time_admission_is_given(
    ca: CertificateAuthority,
) -> None:
    later = Now(NOW.wall + 20 * 365 * 86400, NOW.monotonic)  # past every certificate's end
    decision = refused(admit(facts(pem(ca, "post")), rules(ca), Endpoints("e"), later))
    assert decision.code is Code.UNAUTHENTICATED
    assert "outside its validity period" in decision.details
    earlier = Now(NOW.wall - 20 * 365 * 86400, NOW.monotonic)  # before it was issued
    assert (
        "outside its validity period"
        in refused(admit(facts(pem(ca, "tax")), rules(ca), Endpoints("e"), earlier)).details
    )


def test_nobody_is_identified_once_the_crl_is_stale(ca: CertificateAuthority) -> None:
    stale = rules(ca, stale_at=NOW.wall - 1)
    decision = refused(admit(facts(pem(ca, "tax")), stale, Endpoints("e"), NOW))
    assert decision.code is Code.UNAUTHENTICATED and "out of date" in decision.details
    fresh = rules(ca, stale_at=NOW.wall + 60)
    assert isinstance(admit(facts(pem(ca, "tax")), fresh, Endpoints("e"), NOW), Admitted)


def test_a_certificate_refused_too_often_is_throttled_and_sampled_in_the_ledger(
    ca: CertificateAuthority,
) -> None:
    clock = Clock()
    limits = Limits(clock, refused_rate=1.0, refused_burst=1.0)
    limits.configure([LimitRule("tax", None, None, None, 10)])
    gate = rules(ca, limits=limits)
    first = refused(admit(facts(pem(ca, "revoked")), gate, Endpoints("e"), NOW))
    assert first.code is Code.UNAUTHENTICATED
    throttled = [
        refused(admit(facts(pem(ca, "revoked")), gate, Endpoints("e"), NOW)) for _ in range(3)
    ]
    assert all(r.code is Code.RESOURCE_EXHAUSTED for r in throttled)
    assert "revoked" in throttled[0].details and "retry after" in throttled[0].details
    # One record a second per flooding certificate; the rest are only counted.
    assert [r.recorded for r in throttled] == [True, False, False]
    assert [r.counted for r in throttled] == ["", "flood_unrecorded", "flood_unrecorded"]
    pushback = dict(trailers_of(throttled[0], "r1"))
    assert pushback[REQUEST_ID_KEY] == "r1"
    assert int(pushback["grpc-retry-pushback-ms"]) >= 1 and "retry-after" in str(pushback)


def test_an_agency_without_a_grant_is_denied_and_holds_nothing(ca: CertificateAuthority) -> None:
    limits = Limits(Clock())
    limits.configure([LimitRule("post", None, None, None, 1)])
    gate = rules(ca, limits=limits)
    for _ in range(2):  # the one call in flight it may hold was given back
        decision = refused(admit(facts(pem(ca, "post")), gate, Endpoints("e"), NOW))
        assert decision.code is Code.PERMISSION_DENIED
        assert decision.details == (
            "Tabadol broker: agency 'post' has no grant for method 'Lookup' of service "
            "'demo.v1.People'"
        )
        assert decision.caller == Caller("post", serial(ca, "post"), True)


def test_a_grant_covers_only_its_methods(ca: CertificateAuthority) -> None:
    decision = refused(admit(facts(pem(ca, "tax"), SECRET), rules(ca), Endpoints("e"), NOW))
    assert decision.code is Code.PERMISSION_DENIED and "'Secret'" in decision.details


def test_an_agency_the_registry_does_not_declare_is_told_so(
    ca: CertificateAuthority,
) -> None:
    decision = refused(admit(facts(pem(ca, "stranger")), rules(ca), Endpoints("e"), NOW))
    assert decision.code is Code.PERMISSION_DENIED
    assert "is not a registered agency and has no grant" in decision.details


def test_limits_come_before_policy_so_probing_without_a_grant_is_throttled(
    ca: CertificateAuthority,
) -> None:
    limits = Limits(Clock())
    limits.configure([LimitRule("post", None, 1.0, 1.0, None)])
    gate = rules(ca, limits=limits)
    assert refused(admit(facts(pem(ca, "post")), gate, Endpoints("e"), NOW)).code is (
        Code.PERMISSION_DENIED
    )
    over = refused(admit(facts(pem(ca, "post")), gate, Endpoints("e"), NOW))
    assert over.code is Code.RESOURCE_EXHAUSTED and "rate limit" in over.details
    assert over.recorded  # a declared agency: every refusal is recorded


def test_an_undeclared_agency_over_its_limit_is_recorded_once_a_second(
    ca: CertificateAuthority,
) -> None:
    limits = Limits(Clock())
    limits.configure([LimitRule("stranger", None, 1.0, 1.0, None)])
    floods = FloodRecords()
    gate = rules(ca, limits=limits, floods=floods)
    admit(facts(pem(ca, "stranger")), gate, Endpoints("e"), NOW)
    over = [refused(admit(facts(pem(ca, "stranger")), gate, Endpoints("e"), NOW)) for _ in range(2)]
    assert [r.recorded for r in over] == [True, False]
    later = Now(NOW.wall, NOW.monotonic + 1.5)
    assert refused(admit(facts(pem(ca, "stranger")), gate, Endpoints("e"), later)).recorded


def test_concurrency_is_held_until_released(ca: CertificateAuthority) -> None:
    limits = Limits(Clock())
    limits.configure([LimitRule("tax", "demo.v1.People", None, None, 1)])
    gate = rules(ca, limits=limits)
    first = admit(facts(pem(ca, "tax")), gate, Endpoints("e"), NOW)
    assert isinstance(first, Admitted)
    second = refused(admit(facts(pem(ca, "tax")), gate, Endpoints("e"), NOW))
    assert second.code is Code.RESOURCE_EXHAUSTED and "1 calls in flight" in second.details
    first.held.release()
    assert isinstance(admit(facts(pem(ca, "tax")), gate, Endpoints("e"), NOW), Admitted)


@pytest.mark.parametrize(
    ("revoked", "words"),
    [
        (True, "presents a revoked certificate"),
        (False, "could not be reached to check its certificate"),
    ],
)
def test_a_provider_whose_certificate_is_not_allowed_gets_no_call(
    ca: CertificateAuthority, revoked: bool, words: str
) -> None:
    limits = Limits(Clock())
    limits.configure([LimitRule("tax", None, None, None, 1)])
    gate = rules(ca, limits=limits)
    endpoints = Endpoints(untrusted=UntrustedProvider("cra", revoked))
    for _ in range(2):  # the concurrency it held was given back
        decision = refused(admit(facts(pem(ca, "tax")), gate, endpoints, NOW))
        assert decision.code is Code.UNAVAILABLE
        assert (
            decision.details
            == f"Tabadol broker: provider 'cra' {words}; the call was not forwarded"
        )
        assert decision.caller.agency == "tax" and decision.recorded


def test_identities_are_cached_per_certificate_and_so_are_refusals_for_a_while(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    judged: list[bytes] = []
    real = admission.identify_consumer

    def counted(pem: bytes, **kw: Any) -> ConsumerIdentity:
        judged.append(pem)
        return real(pem, **kw)

    monkeypatch.setattr(admission, "identify_consumer", counted)
    identities = Identities(ca.trust_domain, frozenset(ca.revoked_serials()))
    tax, revoked = pem(ca, "tax"), pem(ca, "revoked")
    assert identities.identify(tax, NOW.wall) is identities.identify(bytes(tax), NOW.wall)
    for _ in range(2):
        with pytest.raises(IdentityRejected, match="revoked"):
            identities.identify(revoked, NOW.wall)
    assert judged == [tax, revoked]  # one judgement each
    with pytest.raises(IdentityRejected, match="revoked"):
        identities.identify(revoked, NOW.wall + 61)  # a refusal is judged again later
    assert judged == [tax, revoked, revoked]


def test_a_certificate_not_yet_valid_is_admitted_once_it_is(ca: CertificateAuthority) -> None:
    identities = Identities(ca.trust_domain, frozenset(ca.revoked_serials()))
    early = NOW.wall - 20 * 365 * 86400  # before it was issued
    with pytest.raises(IdentityRejected, match="outside its validity period"):
        identities.identify(pem(ca, "tax"), early)
    assert identities.identify(pem(ca, "tax"), NOW.wall).agency_id == "tax"


def test_the_brokers_own_services_answer_only_declared_agencies(ca: CertificateAuthority) -> None:
    gate = rules(ca)
    assert admit_platform(pem(ca, "tax"), "/d.D/M", gate, NOW) == Caller(
        "tax", serial(ca, "tax"), True
    )
    stranger = refused(admit_platform(pem(ca, "stranger"), "/d.D/M", gate, NOW))
    assert stranger.code is Code.PERMISSION_DENIED and stranger.counted == "platform_undeclared"
    assert stranger.details == (
        "Tabadol broker: agency 'stranger' is not a registered agency of this exchange"
    )
    nobody = refused(admit_platform(None, "/d.D/M", gate, NOW))
    assert nobody.code is Code.UNAUTHENTICATED and nobody.counted == "platform_unauthenticated"
    revoked = refused(admit_platform(pem(ca, "revoked"), "/d.D/M", gate, NOW))
    assert revoked.code is Code.UNAUTHENTICATED and revoked.caller.agency == "revoked"


def test_a_certificate_refused_by_the_brokers_own_services_is_throttled_too(
    ca: CertificateAuthority,
) -> None:
    limits = Limits(Clock(), refused_rate=1.0, refused_burst=1.0)
    gate = rules(ca, limits=limits)
    assert refused(admit_platform(pem(ca, "stranger"), "/d.D/M", gate, NOW)).code is (
        Code.PERMISSION_DENIED
    )
    throttled = refused(admit_platform(pem(ca, "stranger"), "/d.D/M", gate, NOW))
    assert throttled.code is Code.RESOURCE_EXHAUSTED
    assert "not a registered agency" in throttled.details and "retry after" in throttled.details
    assert dict(throttled.trailers)["grpc-retry-pushback-ms"].isdigit()
