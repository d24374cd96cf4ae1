"""The scale-out benchmark's figures (bench/scale_out.py) as tables (stdout and Markdown)
and JSON: ledger records/s by store and number of nodes, registry change-to-enforcement
latency, and the broker's CPU per call with the ledger on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import _table, machine

RESULTS_NAME = "scale_out"  # bench/results/scale_out.json and .md


@dataclass
class ScaleRun:
    """Everything one run of bench/scale_out.py measured, and how."""

    command: str
    seconds: float
    postgres: dict[str, Any] = field(default_factory=dict)  # where, version, settings
    ledger: list[dict[str, Any]] = field(default_factory=list)  # LedgerRun.as_dict()
    registry: dict[str, Any] = field(default_factory=dict)  # RegistryRun.as_dict()
    ledger_cpu: dict[str, Any] = field(default_factory=dict)  # rounds and summary
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine)

    def as_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "command": self.command,
            "bench_seconds": self.seconds,
            "postgres": self.postgres,
            "ledger": self.ledger,
            "registry": self.registry,
            "ledger_cpu": self.ledger_cpu,
            "notes": self.notes,
        }

    def write(self, directory: Path) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        data, text = directory / f"{RESULTS_NAME}.json", directory / f"{RESULTS_NAME}.md"
        data.write_text(json.dumps(self.as_json(), indent=2) + "\n")
        text.write_text(self.text(markdown=True))
        return data, text

    # --- Tables --------------------------------------------------------------------------

    def text(self, markdown: bool = False) -> str:
        m, pg = self.machine, self.postgres
        bullet = "- " if markdown else "  "
        lines = ["# Tabadol benchmark: several nodes on PostgreSQL", ""] if markdown else []
        lines += [
            f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, "
            f"grpcio {m['grpcio']}; commit {m['code']}; {m['date']}.",
            f"Command: `{self.command}`; {self.seconds:g} s per measurement.",
        ]
        if pg:
            settings = ", ".join(f"{k} {v}" for k, v in pg.get("settings", {}).items())
            lines.append(
                f"PostgreSQL {pg.get('version', '?')}: {pg.get('where', '?')}; {settings}."
            )
        lines.append("")
        if self.ledger:
            lines += [self.ledger_table(markdown), ""]
        if self.registry:
            lines += [self.registry_table(markdown), ""]
        if self.ledger_cpu:
            lines += [self.cpu_table(markdown), ""]
        for note in self.notes:
            lines.append(f"{bullet}{note}")
        return "\n".join(lines).rstrip() + "\n"

    def ledger_table(self, markdown: bool) -> str:
        by_name = {r["name"]: r for r in self.ledger}
        pg1 = by_name.get("postgresql, one node")
        header = ["store", "writer processes", "records/s", "per process", "/PG one node",
                  "CPU busy", "chains verified"]  # fmt: skip
        body = []
        for r in self.ledger:
            vs = r["records_per_s"] / pg1["records_per_s"] if pg1 and pg1["records_per_s"] else None
            verified = (
                f"OK: {len(r['verified'])} chain(s), {r['verified_records']:,} records"
                if r["verified_ok"]
                else "BROKEN: " + "; ".join(f"{c}: {v}" for c, v in r["verified"].items())
            )
            if r["verified_records"] != r["written_total"]:
                verified += f" (writers said {r['written_total']:,})"
            body.append(
                [
                    r["name"],
                    str(r["nodes"]),
                    f"{r['records_per_s']:,.0f}",
                    f"{r['records_per_s'] / r['nodes']:,.0f}",
                    "—" if vs is None else f"{vs:.2f}",
                    f"{r['machine_busy']:.0%}",
                    verified,
                ]
            )
        title = (
            "Ledger records/s committed (batched mode, batch interval "
            f"{self.ledger[0].get('batch_ms', 100):g} ms, each writer fed as fast as it takes records)"
        )
        out = _table(title, header, body, markdown)
        for r in self.ledger:
            if failures := r["write_failures"]:
                out += (
                    f"\n{'- ' if markdown else '  '}{r['name']}: {len(failures)} batch(es) could "
                    f"not be committed at once and were retried, e.g. {failures[0]}"
                )
        return out

    def registry_table(self, markdown: bool) -> str:
        r = self.registry
        s = r["summary"]
        header = ["", "p50 ms", "p99 ms", "max ms", "probe round trip ms"]
        body = [
            ["all (change, node) pairs", _ms(s["p50_ms"]), _ms(s["p99_ms"]), _ms(s["max_ms"]), ""]
        ]
        for node, n in r["per_node"].items():
            body.append([node, _ms(n.get("p50_ms")), "", _ms(n.get("max_ms")),
                         _ms(n.get("probe_call_ms"))])  # fmt: skip
        title = (
            f"Registry change to enforcement: {r['nodes']} broker processes, {r['changes']} "
            f"commits (grant revoked, restored, ...), {s['pairs']} (change, node) pairs"
        )
        out = _table(title, header, body, markdown)
        bullet = "- " if markdown else "  "
        applied = set(r["versions_applied"].values())
        out += "\n" + "\n".join(
            [
                f"{bullet}missed (not enforced within 10 s): {r['missed']}; outcome changes "
                f"beyond the commits: {r['extra_flips']}; other statuses seen: "
                f"{r['other_statuses'] or 'none'}",
                f"{bullet}the commit itself took p50 {_ms(s['commit_p50_ms'])} ms, max "
                f"{_ms(s['commit_max_ms'])} ms; counted from its return instead, p50 "
                f"{_ms(s['after_commit_p50_ms'])} ms, p99 {_ms(s['after_commit_p99_ms'])} ms",
                f"{bullet}every node applies "
                f"version {', '.join(f'{v:g}' for v in sorted(applied))} at the end (last "
                f"committed: {r['last_version']})",
                f"{bullet}`tabadol ledger verify` afterwards: "
                + ("OK" if r["ledger_verify_ok"] else "FAILED")
                + " ("
                + "; ".join(line for line in r["ledger_verify"].splitlines() if "node" in line)
                + ")",
            ]
        )
        return out

    def cpu_table(self, markdown: bool) -> str:
        c = self.ledger_cpu
        s = c["summary"]
        header = ["ledger", "broker CPU µs/call", "PostgreSQL server CPU µs/call",
                  "broker + server", "calls/s", "errors"]  # fmt: skip
        body = [
            [
                name,
                _range(s[key]["broker_cpu_us"]),
                _range(s[key]["server_cpu_us"]),
                _range(s[key]["total_cpu_us"]),
                _range(s[key]["calls_per_s"]),
                str(s[key]["errors"]),
            ]
            for key, name in (("sqlite", "SQLite (path)"), ("postgresql", "PostgreSQL (url)"))
        ]
        ratio = s["ratio"]
        body.append(
            ["PostgreSQL / SQLite", _range(ratio["broker_cpu"], 2), "",
             _range(ratio["total_cpu"], 2), "", ""]
        )  # fmt: skip
        title = (
            f"Broker CPU per call, ledger on SQLite vs PostgreSQL: unary 100 B, "
            f"{c['concurrency']} in flight, every feature on, median (range) of "
            f"{len(c['rounds'])} rounds"
        )
        out = _table(title, header, body, markdown)
        verify = "; ".join(f"{k}: {'OK' if v['ok'] else 'FAILED'}" for k, v in c["verify"].items())
        out += f"\n{'- ' if markdown else '  '}`tabadol ledger verify` afterwards: {verify}"
        return out


def summarise(values: list[float | None]) -> dict[str, float | None]:
    """Median and range of a figure measured several times (None if never measured)."""
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(known), "min": min(known), "max": max(known)}


def _range(figure: dict[str, float | None], places: int = 0) -> str:
    if figure["median"] is None:
        return "—"
    assert figure["min"] is not None and figure["max"] is not None
    fmt = f",.{places}f"
    return f"{figure['median']:{fmt}} ({figure['min']:{fmt}} to {figure['max']:{fmt}})"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"
