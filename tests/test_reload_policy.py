"""What a reload may change, decided without a broker: ``reload_refusals(old, new)``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tabadol import config
from tabadol.config import BrokerConfig
from tabadol.pki import CertificateAuthority
from tabadol.reloading import reload_refusals
from tests.conftest import DEFAULT_GRANTS, broker_toml
from tests.test_contract_publishing import without_bidi


def configuration(
    directory: Path,
    pki: CertificateAuthority,
    contracts: Path,
    name: str = "broker.toml",
    *,
    edit: tuple[str, str] = ("", ""),
    **settings: str,
) -> BrokerConfig:
    text = broker_toml(
        pki_dir=pki.dir,
        contracts=contracts,
        endpoints=["127.0.0.1:7001"],
        grants=DEFAULT_GRANTS,
        **settings,
    )
    path = directory / name
    path.write_text(text.replace(*edit) if edit[0] else text)
    return config.load(path)


@pytest.fixture
def old(tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path) -> BrokerConfig:
    return configuration(tmp_path, pki, echo_contracts, "old.toml")


def new(tmp_path: Path, pki: CertificateAuthority, contracts: Path, **kw: object) -> BrokerConfig:
    return configuration(tmp_path, pki, contracts, "new.toml", **kw)  # type: ignore[arg-type]


def test_the_same_configuration_may_be_reloaded(
    old: BrokerConfig, tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    assert reload_refusals(old, new(tmp_path, pki, echo_contracts)) == []


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"listen": "127.0.0.1:7443"}, "[broker] listen"),
        ({"tracing": 'exporter = "console"'}, "[tracing]"),
        ({"extra_broker": "max_message_bytes = 1024"}, "[broker] max_message_bytes"),
    ],
)
def test_a_setting_held_for_the_brokers_life_is_refused_naming_the_file_and_setting(
    old: BrokerConfig,
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    settings: dict[str, str],
    setting: str,
) -> None:
    refusals = reload_refusals(old, new(tmp_path, pki, echo_contracts, **settings))
    assert refusals == [
        f"{tmp_path / 'new.toml'}: {setting} cannot change on reload; restart the broker"
    ]


def test_the_ledger_section_cannot_change(
    old: BrokerConfig, tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    changed = new(
        tmp_path, pki, echo_contracts, edit=("[tracing]", '[ledger]\nmode = "strict"\n\n[tracing]')
    )
    assert changed.ledger != old.ledger
    assert reload_refusals(old, changed) == [
        f"{tmp_path / 'new.toml'}: [ledger] cannot change on reload; restart the broker"
    ]


def test_grants_agencies_and_endpoints_may_change(
    old: BrokerConfig, tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    changed = new(
        tmp_path,
        pki,
        echo_contracts,
        edit=('methods = ["Unary"]', 'methods = ["Unary", "Bidi"]'),
        extra_broker="eject_after_failures = 5",
    )
    assert changed.grants != old.grants
    assert reload_refusals(old, changed) == []


def test_a_contract_change_that_breaks_consumers_is_refused_with_each_change(
    old: BrokerConfig, tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    broken = without_bidi(tmp_path / "broken.pb")
    (refusal,) = reload_refusals(old, new(tmp_path, pki, broken))
    assert "1 change(s) would break consumers" in refusal
    assert "tabadol.test.v1.Echo/Bidi" in refusal and "METHOD_REMOVED" in refusal


def test_every_reason_is_given_at_once(
    old: BrokerConfig, tmp_path: Path, pki: CertificateAuthority
) -> None:
    broken = without_bidi(tmp_path / "broken.pb")
    refusals = reload_refusals(
        old, new(tmp_path, pki, broken, listen="127.0.0.1:7443", tracing='exporter = "console"')
    )
    assert [r.split(": ", 1)[1].split(" cannot")[0].split(" contracts")[0] for r in refusals] == [
        "[broker] listen",
        "[tracing]",
        "[broker]",
    ]
