"""The Access desk's rules apart from any wire: racing changes, budgets, bounds."""

from __future__ import annotations

import datetime as dt
import threading
import tomllib
from pathlib import Path

import pytest

from tabadol import config
from tabadol.access.desk import (
    CHANGE_BURST,
    MAX_OPEN_REQUESTS,
    MAX_TEXT,
    AccessDesk,
    AccessError,
    Actor,
)
from tabadol.config import parse_entries
from tabadol.registry import open_registry
from tabadol.registry.entries import digest, entries_data
from tabadol.status import Code
from tests.conftest import TRUST_DOMAIN
from tests.support.echo import SERVICE
from tests.support.registry import registry_config, registry_toml

ECHO = Actor.agency(TRUST_DOMAIN, "echo")
NOCR = Actor.agency(TRUST_DOMAIN, "nocr")


@pytest.fixture
def desk(tmp_path: Path, echo_contracts: Path) -> AccessDesk:
    url = f"sqlite:///{tmp_path}/registry.db"
    cfg = config.load(registry_config(tmp_path, tmp_path / "pki", echo_contracts, url))
    data = entries_data(parse_entries(tomllib.loads(registry_toml(["127.0.0.1:1"], "")), "t"))
    open_registry(url).commit(data, "tester", "first", digest(data))
    return AccessDesk(open_registry(url), lambda: cfg)


def test_changes_racing_each_other_are_each_applied_to_the_version_before(
    desk: AccessDesk,
) -> None:
    consumers = ("nocr", "post", "cra", "tax")
    errors: list[BaseException] = []

    def grant(consumer: str) -> None:
        try:
            desk.grant(ECHO, consumer, SERVICE, ["*"], "racing")
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=grant, args=(c,)) for c in consumers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    snap, grants = desk.grants(ECHO)
    assert sorted(g.consumer for g in grants) == sorted(consumers)  # no change was lost
    assert snap.version == 1 + len(consumers)


def test_an_actor_making_changes_too_fast_is_told_to_wait(desk: AccessDesk) -> None:
    for n in range(CHANGE_BURST):
        desk.request(NOCR, SERVICE, ["Unary"], f"ask {n}")
    with pytest.raises(AccessError) as e:
        desk.request(NOCR, SERVICE, ["Unary"], "one too many")
    assert e.value.code == Code.RESOURCE_EXHAUSTED
    assert "too many changes" in str(e.value)
    desk.grant(ECHO, "nocr", SERVICE, ["*"], "another actor has its own budget")


def test_texts_are_bounded_and_fields_are_named(desk: AccessDesk) -> None:
    with pytest.raises(AccessError) as e:
        desk.request(NOCR, SERVICE, ["Unary"], "x" * (MAX_TEXT + 1))
    assert e.value.code == Code.INVALID_ARGUMENT and "at most 2000" in str(e.value)
    with pytest.raises(AccessError) as e:
        desk.request(NOCR, SERVICE, ["Unary"], "fine", reference="r" * 201)
    assert e.value.code == Code.INVALID_ARGUMENT and "purpose reference" in str(e.value)
    with pytest.raises(AccessError) as e:
        desk.request(NOCR, SERVICE, ["NoSuchMethod"], "fine")
    assert e.value.code == Code.INVALID_ARGUMENT and "'NoSuchMethod' is not in service" in str(
        e.value
    )
    with pytest.raises(AccessError) as e:
        desk.request(NOCR, SERVICE, [], "fine")
    assert e.value.code == Code.INVALID_ARGUMENT and "methods" in str(e.value)


def test_an_agency_cannot_request_its_own_service_nor_an_operator_request_at_all(
    desk: AccessDesk,
) -> None:
    with pytest.raises(AccessError) as e:
        desk.request(ECHO, SERVICE, ["*"], "mine")
    assert e.value.code == Code.INVALID_ARGUMENT and "provides" in str(e.value)
    with pytest.raises(AccessError) as e:
        desk.request(Actor.operator(TRUST_DOMAIN, "maryam"), SERVICE, ["*"], "ops")
    assert e.value.code == Code.PERMISSION_DENIED


def test_the_audit_trail_pages_from_where_the_reader_left_off(desk: AccessDesk) -> None:
    operator = Actor.operator(TRUST_DOMAIN, "maryam")
    for consumer in ("nocr", "post", "cra"):
        desk.grant(ECHO, consumer, SERVICE, ["*"], f"for {consumer}")
    first, more = desk.audit(operator, 0, 2)
    assert [e.version for e in first] == [1, 2] and more
    rest, more = desk.audit(operator, 2, 2)
    assert [e.version for e in rest] == [3, 4] and not more
    # The page after version 2 diffs against version 2 itself: one grant added.
    assert [c.kind for c in rest[0].changes] == ["added"]
    assert all(e.chain for e in first + rest)


def test_a_request_whose_asked_expiry_passed_is_approved_only_with_a_new_one(
    desk: AccessDesk,
) -> None:
    now = [dt.datetime.now(dt.UTC)]
    late = AccessDesk(desk._store, desk._config, clock=lambda: now[0])
    asked = now[0] + dt.timedelta(days=1)
    made = late.request(NOCR, SERVICE, ["Unary"], "for a day", expires_at=asked)
    assert made.request is not None
    now[0] += dt.timedelta(days=2)  # the provider answers late
    with pytest.raises(AccessError) as e:
        late.approve(ECHO, made.request.id)
    assert e.value.code == Code.INVALID_ARGUMENT
    assert "the expiry asked for" in str(e.value) and "--expires" in str(e.value)
    approved = late.approve(ECHO, made.request.id, now[0] + dt.timedelta(days=30))
    assert approved.grant is not None and approved.grant.expires_at is not None


def test_a_providers_grants_awaiting_an_operator_do_not_use_up_the_consumers_requests(
    desk: AccessDesk,
) -> None:
    operator = Actor.operator(TRUST_DOMAIN, "maryam")
    desk.publish(operator, SERVICE, "echo", ["127.0.0.1:1"], sensitive=True)
    for n in range(MAX_OPEN_REQUESTS // 2):
        desk.grant(ECHO, "nocr", SERVICE, ["Unary"], f"pending an operator {n}")
    _, waiting = desk.requests(NOCR, "awaiting_operator")
    assert len(waiting) == MAX_OPEN_REQUESTS // 2
    asked = desk.request(NOCR, SERVICE, ["Unary"], "its own")
    assert asked.request is not None and asked.request.state == "pending"
