"""Which provider endpoint a call goes to, without gRPC: health, ejection and choice.

The clock is a plain number passed in, so back-offs of seconds are tested in no time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import grpc.aio
import pytest

from tabadol.balancer import (
    EJECT_AFTER,
    EJECT_BASE_S,
    EJECT_MAX_S,
    REPORT_INTERVAL_S,
    Balancer,
    EndpointHealth,
    UntrustedProvider,
)
from tabadol.broker.upstream import Route, Target, Upstream
from tabadol.contracts import MethodContract, RpcKind

T0 = 1000.0


@dataclass(eq=False)
class Node:
    name: str
    health: EndpointHealth = field(default_factory=EndpointHealth)


def nodes(*names: str, trusted: bool | None = True) -> list[Node]:
    made = [Node(name) for name in names]
    for node in made:
        node.health.trusted = trusted
    return made


def balancer(*endpoints: Node) -> Balancer[Node]:
    return Balancer("civil-registry", endpoints)


def picks(b: Balancer[Node], count: int, now: float = T0, avoid: Node | None = None) -> list[str]:
    return [b.pick(now, avoid).name for _ in range(count)]


def eject(node: Node, now: float) -> float:
    """Fail calls to ``node`` until it is ejected; the back-off it got."""
    for _ in range(node.health.eject_after - 1):
        assert node.health.record(False, now) is False
    assert node.health.record(False, now) is True
    return node.health.ejected_until - now


# Choice


def test_round_robin_takes_every_available_endpoint_in_turn() -> None:
    b = balancer(*nodes("a", "b", "c"))
    assert picks(b, 6) == ["a", "b", "c", "a", "b", "c"]


def test_round_robin_is_fair_over_many_calls() -> None:
    b = balancer(*nodes("a", "b", "c", "d", "e"))
    assert Counter(picks(b, 1000)) == {name: 200 for name in "abcde"}


def test_each_balancer_keeps_its_own_turn_over_shared_endpoints() -> None:
    shared = nodes("a", "b")
    first, second = balancer(*shared), balancer(*shared)
    assert picks(first, 1) == ["a"]
    assert picks(second, 1) == ["a"]
    assert picks(first, 1) == ["b"]


def test_unavailable_endpoints_are_skipped_and_the_rest_share_the_calls() -> None:
    a, b, c = nodes("a", "b", "c")
    b.health.healthy = False
    assert Counter(picks(balancer(a, b, c), 10)) == {"a": 5, "c": 5}


def test_an_endpoint_failing_its_health_check_gets_no_calls_while_another_is_healthy() -> None:
    a, b = nodes("a", "b")
    a.health.healthy = False
    assert picks(balancer(a, b), 4) == ["b"] * 4


def test_an_endpoint_healthy_again_gets_calls_again() -> None:
    a, b = nodes("a", "b")
    bal = balancer(a, b)
    a.health.healthy = False
    assert picks(bal, 2) == ["b", "b"]
    a.health.healthy = True
    assert Counter(picks(bal, 4)) == {"a": 2, "b": 2}


def test_when_every_endpoint_fails_its_health_check_one_is_still_picked_to_fail_fast() -> None:
    a, b = nodes("a", "b")
    a.health.healthy = b.health.healthy = False
    assert picks(balancer(a, b), 1)[0] in {"a", "b"}


def test_avoid_is_not_picked_while_another_will_do() -> None:
    a, b, c = nodes("a", "b", "c")
    assert set(picks(balancer(a, b, c), 20, avoid=b)) == {"a", "c"}


def test_avoid_is_picked_when_it_is_the_only_available_endpoint() -> None:
    a, b = nodes("a", "b")
    b.health.healthy = False
    assert picks(balancer(a, b), 3, avoid=a) == ["a", "a", "a"]


def test_avoid_matches_anything_that_carries_the_same_endpoint_health() -> None:
    a, b = nodes("a", "b")
    same_as_a = Node("a, as another route holds it", a.health)
    assert picks(balancer(a, b), 4, avoid=same_as_a) == ["b"] * 4


def test_avoid_is_still_a_fallback_when_nothing_is_available() -> None:
    a, b = nodes("a", "b")
    eject(a, T0)
    eject(b, T0 + 5)
    assert picks(balancer(a, b), 1, avoid=a) == ["a"]  # back soonest


def test_with_none_available_the_endpoint_back_soonest_is_picked() -> None:
    a, b, c = nodes("a", "b", "c")
    eject(a, T0 + 2)
    eject(b, T0)
    eject(c, T0 + 1)
    assert picks(balancer(a, b, c), 3, now=T0 + 0.5) == ["b", "b", "b"]


def test_an_unhealthy_endpoint_is_back_sooner_than_an_ejected_one() -> None:
    a, b = nodes("a", "b")
    eject(a, T0)
    b.health.healthy = False
    assert picks(balancer(a, b), 2) == ["b", "b"]


def test_an_ejected_endpoint_gets_calls_again_once_its_back_off_has_passed() -> None:
    a, b = nodes("a", "b")
    bal = balancer(a, b)
    back_off = eject(a, T0)
    assert picks(bal, 4, now=T0 + back_off - 0.001) == ["b"] * 4
    assert Counter(picks(bal, 4, now=T0 + back_off)) == {"a": 2, "b": 2}


def test_a_single_endpoint_is_picked_whatever_its_state_while_trusted() -> None:
    (only,) = nodes("only")
    bal = balancer(only)
    assert picks(bal, 2) == ["only", "only"]
    assert picks(bal, 1, avoid=only) == ["only"]
    eject(only, T0)
    assert picks(bal, 1) == ["only"]
    only.health.healthy = False
    assert picks(bal, 1) == ["only"]
    only.health.trusted = False
    with pytest.raises(UntrustedProvider):
        bal.pick(T0)


# Trust


def test_endpoints_never_checked_get_no_calls_and_say_so() -> None:
    bal = balancer(*nodes("a", "b", trusted=None))
    with pytest.raises(UntrustedProvider) as raised:
        bal.pick(T0)
    assert raised.value.provider == "civil-registry"
    assert raised.value.revoked is False


def test_a_revoked_endpoint_gets_no_calls_and_says_it_is_revoked() -> None:
    a, b = nodes("a", "b", trusted=None)
    a.health.trusted = False
    with pytest.raises(UntrustedProvider) as raised:
        balancer(a, b).pick(T0)
    assert raised.value.revoked is True


def test_an_untrusted_endpoint_is_never_a_fallback() -> None:
    a, b, c = nodes("a", "b", "c")
    a.health.trusted = False
    b.health.trusted = None
    eject(c, T0)
    assert picks(balancer(a, b, c), 3) == ["c", "c", "c"]  # the only trusted one, though out


def test_an_untrusted_endpoint_is_skipped_even_when_healthy() -> None:
    a, b = nodes("a", "b")
    a.health.trusted = False
    assert picks(balancer(a, b), 3) == ["b", "b", "b"]


def test_an_endpoint_trusted_again_gets_calls_again() -> None:
    a, b = nodes("a", "b")
    bal = balancer(a, b)
    a.health.trusted = False
    assert picks(bal, 2) == ["b", "b"]
    a.health.trusted = True
    assert Counter(picks(bal, 4)) == {"a": 2, "b": 2}


def test_a_route_with_no_endpoints_has_nobody_to_call() -> None:
    with pytest.raises(UntrustedProvider) as raised:
        balancer().pick(T0)
    assert raised.value.revoked is False


# Ejection


def test_an_endpoint_is_ejected_after_three_unreachable_calls_in_a_row() -> None:
    health = EndpointHealth()
    health.trusted = True
    assert EJECT_AFTER == 3
    assert [health.record(False, T0) for _ in range(3)] == [False, False, True]
    assert not health.available(T0)
    assert health.ejected_until == T0 + EJECT_BASE_S


def test_a_call_that_reaches_the_endpoint_starts_the_count_again() -> None:
    health = EndpointHealth()
    health.trusted = True
    for _ in range(5):
        assert health.record(False, T0) is False
        assert health.record(False, T0) is False
        assert health.record(True, T0) is False
    assert health.available(T0)


def test_the_number_of_failures_before_ejection_is_configurable() -> None:
    health = EndpointHealth(eject_after=1)
    assert health.record(False, T0) is True
    health = EndpointHealth()
    health.eject_after = 5  # a reload may change it on an endpoint it keeps
    assert [health.record(False, T0) for _ in range(5)] == [False] * 4 + [True]


def test_back_off_doubles_with_each_ejection_up_to_its_cap() -> None:
    (node,) = nodes("a")
    now, back_offs = T0, []
    for _ in range(8):
        back_offs.append(eject(node, now))
        now = node.health.ejected_until  # fails again as soon as it is back
    assert back_offs == [1.0, 2.0, 4.0, 8.0, 16.0, EJECT_MAX_S, EJECT_MAX_S, EJECT_MAX_S]


def test_calls_failing_during_an_ejection_count_towards_the_next_one() -> None:
    (node,) = nodes("a")
    eject(node, T0)
    assert eject(node, T0 + 0.5) == 2.0  # calls already under way fail too


def test_a_call_reaching_the_endpoint_during_its_ejection_keeps_the_back_off() -> None:
    (node,) = nodes("a")
    eject(node, T0)
    node.health.record(True, T0 + 0.5)  # under way before the ejection: says nothing now
    assert eject(node, T0 + 1) == 2.0


def test_recovery_resets_the_back_off_once_the_ejection_has_passed() -> None:
    (node,) = nodes("a")
    eject(node, T0)
    eject(node, T0 + 1)
    node.health.record(True, T0 + 3)
    assert eject(node, T0 + 4) == EJECT_BASE_S


def test_an_outcome_recorded_on_the_endpoint_picked_steers_the_balancer() -> None:
    a, b = nodes("a", "b")
    bal = balancer(a, b)
    assert [a.health.record(False, T0) for _ in range(3)] == [False, False, True]
    assert picks(bal, 3) == ["b", "b", "b"]
    assert b.health.record(True, T0) is False


# Reports


def test_failure_reports_are_due_once_per_interval() -> None:
    health = EndpointHealth()
    assert health.report_due(T0) is True
    assert health.report_due(T0) is False
    assert health.report_due(T0 + REPORT_INTERVAL_S - 0.001) is False
    assert health.report_due(T0 + REPORT_INTERVAL_S) is True
    assert health.report_due(T0 + REPORT_INTERVAL_S + 1) is False


# The broker's shell: one Upstream per endpoint, holding its health, shared by routes


METHOD = MethodContract("demo.v1.People", "Lookup", RpcKind.UNARY)
OTHER = MethodContract("demo.v1.People", "List", RpcKind.SERVER_STREAMING)


async def test_routes_pick_upstreams_with_their_stubs_and_share_their_health() -> None:
    closing: set[asyncio.Task[None]] = set()
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in (1, 2)]
    try:
        a, b = (
            Upstream("civil-registry", f"127.0.0.1:{port}", channel, closing)
            for port, channel in zip((1, 2), channels, strict=True)
        )
        for upstream in (a, b):
            upstream.health.trusted = True
        lookup = Route(METHOD, "civil-registry", tuple(Target(u, u.stub(METHOD)) for u in (a, b)))
        listing = Route(OTHER, "civil-registry", tuple(Target(u, u.stub(OTHER)) for u in (a, b)))

        upstream, stub = lookup.balancer.pick(T0)
        assert upstream is a and stub is lookup.targets[0][1]
        assert lookup.balancer.pick(T0, avoid=b).upstream is a  # avoid names the Upstream

        assert [a.health.record(False, T0) for _ in range(3)] == [False, False, True]
        assert not a.health.available(T0)
        assert {listing.balancer.pick(T0).upstream for _ in range(4)} == {
            b
        }  # ejected for every route
        assert a.health.report_due(T0) and not a.health.report_due(T0 + 1)
        assert [u for u, _ in listing.targets] == [a, b]
    finally:
        for channel in channels:
            await channel.close()
