"""The pure core decides without I/O frameworks: importing any of its modules, in a fresh
interpreter, loads no grpc, asyncio, sqlite3 or OpenTelemetry."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PURE_CORE = (
    "tabadol.admission",
    "tabadol.balancer",
    "tabadol.catalogue",
    "tabadol.config",
    "tabadol.contracts",
    "tabadol.describe",
    "tabadol.errors",
    "tabadol.gateway.http_rules",
    "tabadol.gateway.openapi",
    "tabadol.gateway.wire",
    "tabadol.governance",
    "tabadol.identity",
    "tabadol.ledger.record",
    "tabadol.ledger.rollup",
    "tabadol.ledger.seal",
    "tabadol.ledger.signers",
    "tabadol.ledger.timestamps",
    "tabadol.limits",
    "tabadol.metadata",
    "tabadol.ops.access",
    "tabadol.ops.ingest",
    "tabadol.ops.model",
    "tabadol.ops.query",
    "tabadol.ops.sessions",
    "tabadol.ops.store.eviction",
    "tabadol.policy",
    "tabadol.protocol",
    "tabadol.refusals",
    "tabadol.registry.audit",
    "tabadol.registry.entries",
    "tabadol.registry.freshness",
    "tabadol.reloading",
    "tabadol.reports.figures",
    "tabadol.revocation",
    "tabadol.samplers",
    "tabadol.spiffe",
    "tabadol.status",
)
FORBIDDEN = ("grpc", "asyncio", "sqlite3", "opentelemetry")

# Prints what the import loaded of FORBIDDEN, and for each what first imported it.
_PROBE = """
import builtins, sys
forbidden, first = {forbidden!r}, {{}}
real_import = builtins.__import__
def watching(name, globals=None, *args, **kwargs):
    top = name.partition(".")[0]
    if top in forbidden and top not in first and top not in sys.modules:
        first[top] = (globals or {{}}).get("__name__", "?")
    return real_import(name, globals, *args, **kwargs)
builtins.__import__ = watching
import {module}
loaded = sorted({{n.partition(".")[0] for n in sys.modules}} & set(forbidden))
print(", ".join(f"{{top}} (imported by {{first.get(top, '?')}})" for top in loaded))
"""


@pytest.fixture(scope="module")
def loaded_by() -> dict[str, str]:
    """What each core module loads of FORBIDDEN, each in its own fresh interpreter."""
    probes = {
        module: subprocess.Popen(
            [sys.executable, "-c", _PROBE.format(forbidden=FORBIDDEN, module=module)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for module in PURE_CORE
    }
    out = {}
    for module, probe in probes.items():
        stdout, stderr = probe.communicate(timeout=120)
        assert probe.returncode == 0, f"importing {module} failed:\n{stderr}"
        out[module] = stdout.strip()
    return out


@pytest.mark.parametrize("module", PURE_CORE)
def test_a_core_module_loads_no_io_framework(module: str, loaded_by: dict[str, str]) -> None:
    assert loaded_by[module] == "", f"import {module} loads {loaded_by[module]}"


def test_the_probe_sees_a_module_that_does_load_one() -> None:
    probe = _PROBE.format(forbidden=FORBIDDEN, module="tabadol.ledger.writer")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "sqlite3" in out.stdout


def test_the_names_loaded_on_first_use_are_the_ones_their_packages_always_gave() -> None:
    from tabadol import ledger
    from tabadol.ledger import store as ledger_store
    from tabadol.ledger.store import sqlite as ledger_sqlite
    from tabadol.ledger.writer import LedgerWriter
    from tabadol.ops import store as span_store
    from tabadol.ops.store import sqlite as span_sqlite

    # The submodule ``verify`` is loaded, and still the package's ``verify`` is the function.
    verify_module = importlib.import_module("tabadol.ledger.verify")
    assert ledger.verify is verify_module.verify
    assert ledger.LedgerWriter is LedgerWriter
    assert ledger_store.SqliteLedgerStore is ledger_sqlite.SqliteLedgerStore
    assert span_store.SqliteSpanStore is span_sqlite.SqliteSpanStore
    with pytest.raises(AttributeError, match=r"tabadol\.ledger' has no attribute 'Nothing'"):
        ledger.Nothing  # noqa: B018
