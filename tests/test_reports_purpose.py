"""The quarterly report counts calls per purpose: each call under the purpose of the grant
that admitted it, read from every registry version or from the configuration's own grants."""

from __future__ import annotations

import csv
import dataclasses
import io
import uuid
from pathlib import Path
from typing import Any

import pytest

from tabadol.config import BrokerConfig, GrantEntry, grant_id, load
from tabadol.ledger.record import LedgerRecord, Seal
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.ops.app import own_assessment
from tabadol.registry.entries import digest
from tabadol.registry.store import open_registry
from tabadol.reports import (
    NO_PURPOSE,
    PurposeCalls,
    QuarterlyReport,
    build_quarterly,
    grant_purposes,
    render_html,
    render_purposes_csv,
    report_json,
    write_quarterly,
)
from tests.support.echo import SERVICE as ECHO
from tests.support.echo import write_echo_contracts
from tests.test_reports import CONFIG, DAY, MS, Q2, Q3, TAX, write_tax_contracts

CIVIL = "Civil Registration Act, art. 5 <verification>"  # markup: every output escapes it
TAX_LAW = "Direct Taxation Act, art. 9"
MID = Q3.start_ns + 30 * DAY  # in 1405-Q3, far from its edges: rollup rows answer


def write_config(directory: Path, grants: str = "") -> BrokerConfig:
    (directory / "contracts").mkdir(parents=True)
    write_echo_contracts(directory / "contracts" / "echo.pb")
    write_tax_contracts(directory / "contracts" / "tax.pb")
    (directory / "broker.toml").write_text(CONFIG + grants, encoding="utf-8")
    return load(directory / "broker.toml")


def call(at: int, consumer: str, provider: str, service: str, grant: str, status: int = 0) -> Any:
    return (at, consumer, provider, service, grant, status)


def write_ledger(path: Path, calls: list[Any]) -> SqliteLedgerStore:
    """A real SQLite ledger holding the calls, each naming the grant that admitted it."""
    records = [
        LedgerRecord(
            start_ns=at, end_ns=at + 5 * MS, trace_id="", request_id=f"req-{n}",
            consumer=consumer, provider=provider, service=service,
            method="Pay" if service == TAX else "Unary", kind="unary", status_code=status,
            request_bytes=10, request_messages=1, response_bytes=10, response_messages=1,
            endpoint="" if status == 7 else "10.0.0.1:443", broker_instance="test",
            grant=grant,
        )
        for n, (at, consumer, provider, service, grant, status) in enumerate(calls, start=1)
    ]  # fmt: skip
    store = SqliteLedgerStore(path)
    store.append_sealed(records, lambda s, c, h: Seal(s, c, h, 0, "test", "00"), b"")
    return store


def agency(id: str, name: str) -> dict[str, Any]:
    return {"id": id, "name": name}


AGENCIES = [agency(a, a) for a in ("nocr", "tax", "post", "cra")]
SERVICES = [
    {"name": ECHO, "provider": "nocr", "endpoints": ["10.0.0.1:443"]},
    {"name": TAX, "provider": "tax", "endpoints": ["10.0.0.2:443"]},
]


def grant(id: str | None, consumer: str, service: str, **purpose: str) -> dict[str, Any]:
    methods = ["Pay"] if service == TAX else ["Unary"]
    entry = {"consumer": consumer, "service": service, "methods": methods, **purpose}
    return entry if id is None else {"id": id, **entry}


# The registry's versions: g-civil is revoked in version 2, mid-quarter; g-civil-2 (the same
# purpose, another consumer) and g-tax-law come in; the tax grant is a file's, with no id.
CIVIL_GRANT = grant("g-civil", "post", ECHO, purpose=CIVIL, purpose_reference="CRA-5")
FILE_GRANT = grant(None, "post", TAX)  # no purpose recorded
VERSIONS = [
    [CIVIL_GRANT, FILE_GRANT],
    [
        FILE_GRANT,
        grant("g-civil-2", "cra", ECHO, purpose=CIVIL, purpose_reference="CRA-5"),
        grant("g-tax-law", "tax", ECHO, purpose=TAX_LAW),
    ],
]


def file_grant_id() -> str:
    return grant_id(GrantEntry.model_validate(FILE_GRANT))


def quarter_calls() -> list[Any]:
    tax_grant = file_grant_id()
    return [
        call(MID, "post", "nocr", ECHO, "g-civil"),
        call(MID + 1, "post", "nocr", ECHO, "g-civil"),
        call(MID + 2, "post", "nocr", ECHO, "g-civil", status=5),  # admitted, not successful
        call(MID + 3 * DAY, "cra", "nocr", ECHO, "g-civil-2"),
        call(MID + 4 * DAY, "tax", "nocr", ECHO, "g-tax-law"),
        call(MID + 4 * DAY + 1, "tax", "nocr", ECHO, "g-tax-law"),
        call(MID + 5 * DAY, "post", "nocr", ECHO, "g-gone"),  # a grant the registry never held
        call(MID + 5 * DAY + 1, "post", "nocr", ECHO, "", status=7),  # refused: no grant
        call(MID + 6 * DAY, "post", "tax", TAX, tax_grant),
        call(MID + 6 * DAY + 1, "post", "tax", TAX, tax_grant, status=14),
        call(Q2.start_ns + DAY, "post", "nocr", ECHO, "g-civil"),  # in 1405-Q2: not counted
    ]


def expected_nocr() -> tuple[PurposeCalls, ...]:
    return (
        PurposeCalls(ECHO, CIVIL, "CRA-5", "purpose", ("g-civil", "g-civil-2"), 4, 3),
        PurposeCalls(ECHO, TAX_LAW, None, "purpose", ("g-tax-law",), 2, 2),
        PurposeCalls(ECHO, "g-gone", None, "unknown grant", ("g-gone",), 1, 1),
    )


def expected_tax() -> tuple[PurposeCalls, ...]:
    return (PurposeCalls(TAX, NO_PURPOSE, None, "no purpose", (file_grant_id(),), 2, 1),)


@pytest.fixture
def registry_report(tmp_path: Path) -> QuarterlyReport:
    """1405-Q3's report over a memory registry of two versions and a real ledger."""
    cfg = write_config(tmp_path)
    url = f"memory://purposes-{uuid.uuid4().hex}"
    registry = open_registry(url)
    for n, grants in enumerate(VERSIONS, start=1):
        entries = {"agency": AGENCIES, "service": SERVICES, "grant": grants}
        registry.commit(entries, "spiffe://tabadol.test/operator/alice", f"v{n}", digest(entries))
    cfg = dataclasses.replace(cfg, registry=cfg.registry.model_copy(update={"url": url}))
    store = write_ledger(tmp_path / "ledger.db", quarter_calls())
    try:
        return build_quarterly(cfg, store, Q3)
    finally:
        store.close()


def test_calls_are_counted_per_provider_service_and_purpose_from_every_registry_version(
    registry_report: QuarterlyReport,
) -> None:
    assert registry_report.figures("nocr").purposes == expected_nocr()
    assert registry_report.figures("tax").purposes == expected_tax()
    assert registry_report.figures("post").purposes == ()  # it provides nothing


def test_a_grant_revoked_mid_quarter_still_names_its_purpose(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    url = f"memory://revoked-{uuid.uuid4().hex}"
    registry = open_registry(url)
    for n, grants in enumerate(VERSIONS, start=1):
        entries = {"agency": AGENCIES, "service": SERVICES, "grant": grants}
        registry.commit(entries, "spiffe://tabadol.test/operator/alice", f"v{n}", digest(entries))
    for _ in range(150):  # more versions than one page of history
        registry.commit(entries, "spiffe://tabadol.test/operator/alice", "again", digest(entries))
    amended = {
        **entries,
        "grant": [*entries["grant"][:2], grant("g-tax-law", "tax", ECHO, purpose="Amended")],
    }
    registry.commit(amended, "spiffe://tabadol.test/operator/alice", "amended", digest(amended))
    cfg = dataclasses.replace(cfg, registry=cfg.registry.model_copy(update={"url": url}))
    purposes = grant_purposes(cfg)
    assert purposes["g-civil"].purpose == CIVIL  # only version 1 held it
    assert purposes["g-civil"].reference == "CRA-5"
    assert purposes[file_grant_id()].purpose is None
    assert "g-gone" not in purposes
    assert purposes["g-tax-law"].purpose == "Amended"  # read past the first page: the latest


def test_every_format_shows_the_calls_by_purpose(
    registry_report: QuarterlyReport, tmp_path: Path
) -> None:
    html = render_html(registry_report)
    assert '<section id="purposes"><h2>Calls by purpose</h2>' in html
    assert "Civil Registration Act, art. 5 &lt;verification&gt;" in html and CIVIL not in html
    assert NO_PURPOSE in html and "a grant the registry does not know" in html
    data = report_json(registry_report)
    nocr = next(a for a in data["agencies"] if a["id"] == "nocr")
    assert nocr["calls_by_purpose"][0] == {
        "service": ECHO,
        "purpose": CIVIL,
        "purpose_reference": "CRA-5",
        "recorded": "purpose",
        "grants": ["g-civil", "g-civil-2"],
        "calls_admitted": 4,
        "successful": 3,
    }
    assert "calls_by_purpose" in data["definitions"]
    rows = list(csv.DictReader(io.StringIO(render_purposes_csv(registry_report))))
    assert [(r["agency_id"], r["purpose"], r["calls_admitted"], r["successful"]) for r in rows] == [
        ("nocr", CIVIL, "4", "3"),
        ("nocr", TAX_LAW, "2", "2"),
        ("nocr", "g-gone", "1", "1"),
        ("tax", NO_PURPOSE, "2", "1"),
    ]
    written = write_quarterly(registry_report, tmp_path / "out")
    purposes_csv = tmp_path / "out" / "quarterly-1405-Q3-purposes.csv"
    assert purposes_csv in written
    assert purposes_csv.read_bytes().decode() == render_purposes_csv(registry_report)


def test_an_agency_viewing_its_own_assessment_sees_only_its_own_purposes(
    registry_report: QuarterlyReport,
) -> None:
    own = own_assessment(registry_report, "tax")
    assert [a.purposes for a in own.agencies] == [expected_tax()]
    html = render_html(own)
    assert TAX_LAW not in html and "g-gone" not in html and NO_PURPOSE in html
    assert "g-civil" not in render_purposes_csv(own)
    assert [a["calls_by_purpose"] for a in report_json(own)["agencies"]] == [
        [
            {
                "service": TAX,
                "purpose": NO_PURPOSE,
                "purpose_reference": None,
                "recorded": "no purpose",
                "grants": [file_grant_id()],
                "calls_admitted": 2,
                "successful": 1,
            }
        ]
    ]


def test_a_configuration_file_registry_counts_by_its_own_grants(tmp_path: Path) -> None:
    """No registry database: the file's grants, ids derived where the file gives none."""
    grants = f"""
[[grant]]
consumer = "post"
service = "{ECHO}"
methods = ["Unary"]
purpose = "{CIVIL}"
purpose_reference = "CRA-5"

[[grant]]
id = "g-tax-law"
consumer = "tax"
service = "{ECHO}"
methods = ["Unary"]
purpose = "{TAX_LAW}"

[[grant]]
consumer = "post"
service = "{TAX}"
methods = ["Pay"]
"""
    cfg = write_config(tmp_path, grants)
    civil, tax_law, no_purpose = (grant_id(g) for g in cfg.grants)
    assert civil.startswith("file-") and tax_law == "g-tax-law"
    assert no_purpose == file_grant_id()  # the same grant in a registry has the same id
    calls = [
        call(MID, "post", "nocr", ECHO, civil),
        call(MID + DAY, "post", "nocr", ECHO, civil, status=13),
        call(MID + 2 * DAY, "tax", "nocr", ECHO, tax_law),
        call(MID + 3 * DAY, "post", "tax", TAX, no_purpose),
        call(MID + 3 * DAY + 1, "post", "nocr", ECHO, "g-elsewhere"),
    ]
    store = write_ledger(tmp_path / "ledger.db", calls)
    try:
        report = build_quarterly(cfg, store, Q3)
    finally:
        store.close()
    assert report.figures("nocr").purposes == (
        PurposeCalls(ECHO, CIVIL, "CRA-5", "purpose", (civil,), 2, 1),
        PurposeCalls(ECHO, TAX_LAW, None, "purpose", ("g-tax-law",), 1, 1),
        PurposeCalls(ECHO, "g-elsewhere", None, "unknown grant", ("g-elsewhere",), 1, 1),
    )
    assert report.figures("tax").purposes == (
        PurposeCalls(TAX, NO_PURPOSE, None, "no purpose", (no_purpose,), 1, 1),
    )
