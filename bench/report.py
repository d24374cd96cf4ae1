"""The benchmark's figures as tables (stdout and Markdown) and JSON, with the ratios that
make them comparable across machines: to the direct call and to nginx from the same run,
and the proxy's CPU per call to the bare pass-through's."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.loadgen import Measurement, Workload

# The targets for the broker with every feature on, on 2 cores.
CPU_VS_BARE_MAX = 1.15
ADDED_P50_MAX_MS = 0.6
BIDI_VS_DIRECT_MIN = 0.5


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "grpcio": version("grpcio"),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "code": code_version(),
    }


def code_version() -> str:
    """The commit measured, and whether the server or client code differed from it."""
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--", "server", "clients"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return (
        f"{commit} with {len(changed)} uncommitted file(s) in server/ and clients/"
        if changed
        else commit
    )


@dataclass
class Run:
    """Everything one run measured, and how."""

    command: str
    seconds: float
    concurrency: int
    generators: int
    workloads: Sequence[Workload]
    targets: dict[str, str]  # name -> description, in table order
    measurements: list[Measurement] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why
    tracing: dict[str, Any] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)
    broker_counters: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine)

    def get(self, target: str, workload: str, concurrency: int) -> Measurement | None:
        for m in self.measurements:
            if (m.target, m.workload, m.concurrency) == (target, workload, concurrency):
                return m
        return None

    def load(self, target: str, workload: Workload) -> Measurement | None:
        return self.get(target, workload.key, 1 if workload.one_stream else self.concurrency)

    def checks(self) -> list[dict[str, Any]]:
        """Where the broker stands against the issue's targets."""
        unary = next(w for w in self.workloads if w.key == "unary_100B")
        out: list[dict[str, Any]] = []
        broker, bare = self.load("broker", unary), self.load("bare", unary)
        if broker and bare and broker.proxy_cpu_us and bare.proxy_cpu_us:
            ratio = broker.proxy_cpu_us / bare.proxy_cpu_us
            out.append(
                {
                    "what": f"CPU per unary call (100 B, concurrency {self.concurrency}), "
                    "broker / bare pass-through",
                    "value": ratio,
                    "shown": f"{ratio:.2f}x ({broker.proxy_cpu_us:.0f} vs {bare.proxy_cpu_us:.0f} µs)",
                    "target": f"<= {CPU_VS_BARE_MAX}x",
                    "met": ratio <= CPU_VS_BARE_MAX,
                }
            )
        broker1, direct1 = self.get("broker", unary.key, 1), self.get("direct", unary.key, 1)
        if broker1 and direct1 and broker1.p50_ms is not None and direct1.p50_ms is not None:
            added = broker1.p50_ms - direct1.p50_ms
            out.append(
                {
                    "what": "added p50 latency at concurrency 1 (unary 100 B), broker - direct",
                    "value": added,
                    "shown": f"{added:+.2f} ms ({broker1.p50_ms:.2f} vs {direct1.p50_ms:.2f} ms)",
                    "target": f"<= {ADDED_P50_MAX_MS} ms",
                    "met": added <= ADDED_P50_MAX_MS,
                }
            )
        for w in self.workloads:
            if not w.one_stream:
                continue
            b, d = self.load("broker", w), self.load("direct", w)
            if b and d and d.per_s:
                ratio = b.per_s / d.per_s
                out.append(
                    {
                        "what": f"messages/s on one bidi stream ({w.kind.split('_')[1]}), "
                        "broker / direct",
                        "value": ratio,
                        "shown": f"{ratio:.2f}x ({b.per_s:,.0f} vs {d.per_s:,.0f} msg/s)",
                        "target": f">= {BIDI_VS_DIRECT_MIN}x",
                        "met": ratio >= BIDI_VS_DIRECT_MIN,
                    }
                )
        return out

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per workload and target: the headline figures and their ratios."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for w in self.workloads:
            rows: dict[str, dict[str, Any]] = {}
            direct, nginx, bare = (self.load(t, w) for t in ("direct", "nginx", "bare"))
            # A single stream has one concurrency: its load figures are its c=1 figures.
            direct1, nginx1 = (
                (direct, nginx) if w.one_stream else (self.get(t, w.key, 1) for t in ("direct", "nginx"))
            )  # fmt: skip
            for name in self.targets:
                m = self.load(name, w)
                if m is None:
                    continue
                one = m if w.one_stream else self.get(name, w.key, 1)
                p50_1, direct_p50_1 = _of(one, "p50_ms"), _of(direct1, "p50_ms")
                row: dict[str, Any] = {
                    f"{w.unit}s_per_s": m.per_s,
                    f"{w.unit}s_per_s_vs_direct": _ratio(m.per_s, _of(direct, "per_s")),
                    f"{w.unit}s_per_s_vs_nginx": _ratio(m.per_s, _of(nginx, "per_s")),
                    "p50_ms_c1": p50_1,
                    "p99_ms_c1": _of(one, "p99_ms"),
                    "p50_ms_c1_vs_direct": _ratio(p50_1, direct_p50_1),
                    "p50_ms_c1_vs_nginx": _ratio(p50_1, _of(nginx1, "p50_ms")),
                    "p50_ms_c1_added_to_direct": (
                        p50_1 - direct_p50_1
                        if p50_1 is not None and direct_p50_1 is not None
                        else None
                    ),
                    f"proxy_cpu_us_per_{w.unit}": m.proxy_cpu_us,
                    "proxy_cpu_vs_bare": _ratio(m.proxy_cpu_us, _of(bare, "proxy_cpu_us")),
                    "proxy_cpu_vs_nginx": _ratio(m.proxy_cpu_us, _of(nginx, "proxy_cpu_us")),
                    f"provider_cpu_us_per_{w.unit}": m.provider_cpu_us,
                    "errors": m.errors + (one.errors if one is not None and one is not m else 0),
                }
                if not w.one_stream:
                    row.update(
                        {
                            "p50_ms_load": m.p50_ms,
                            "p99_ms_load": m.p99_ms,
                            "p50_ms_load_vs_direct": _ratio(m.p50_ms, _of(direct, "p50_ms")),
                            "p50_ms_load_vs_nginx": _ratio(m.p50_ms, _of(nginx, "p50_ms")),
                            "proxy_cpu_us_per_call_c1": _of(one, "proxy_cpu_us"),
                        }
                    )
                rows[name] = row
            out[w.key] = rows
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "command": self.command,
            "bench_seconds": self.seconds,
            "concurrency": self.concurrency,
            "generator_processes": self.generators,
            "targets": self.targets,
            "skipped": self.skipped,
            "workloads": {w.key: w.title for w in self.workloads},
            "summary": self.summary(),
            "checks": self.checks(),
            "tracing": self.tracing,
            "ledger": self.ledger,
            "broker_counters": self.broker_counters,
            "notes": self.notes,
            "measurements": [m.as_dict() for m in self.measurements],
        }

    # --- Tables --------------------------------------------------------------------------

    def columns(self, workload: Workload) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
        """The table's columns for ``workload``: a header and how to show a summary row."""
        if workload.one_stream:
            return [
                ("msg/s", lambda r: _n(r["msgs_per_s"])),
                ("/direct", lambda r: _x(r["msgs_per_s_vs_direct"])),
                ("/nginx", lambda r: _x(r["msgs_per_s_vs_nginx"])),
                ("p50 ms", lambda r: _ms(r["p50_ms_c1"])),
                ("p99 ms", lambda r: _ms(r["p99_ms_c1"])),
                ("CPU µs/msg", lambda r: _us(r["proxy_cpu_us_per_msg"])),
                ("/bare", lambda r: _x(r["proxy_cpu_vs_bare"])),
                ("/nginx", lambda r: _x(r["proxy_cpu_vs_nginx"])),
            ]
        c = self.concurrency
        return [
            (f"calls/s c={c}", lambda r: _n(r["calls_per_s"])),
            ("/direct", lambda r: _x(r["calls_per_s_vs_direct"])),
            ("/nginx", lambda r: _x(r["calls_per_s_vs_nginx"])),
            ("p50 c=1 ms", lambda r: _ms(r["p50_ms_c1"])),
            ("+direct", lambda r: _plus(r["p50_ms_c1_added_to_direct"])),
            ("/nginx", lambda r: _x(r["p50_ms_c1_vs_nginx"])),
            ("p99 c=1", lambda r: _ms(r["p99_ms_c1"])),
            (f"p50 c={c}", lambda r: _ms(r["p50_ms_load"])),
            ("/direct", lambda r: _x(r["p50_ms_load_vs_direct"])),
            ("/nginx", lambda r: _x(r["p50_ms_load_vs_nginx"])),
            (f"p99 c={c}", lambda r: _ms(r["p99_ms_load"])),
            ("CPU µs/call", lambda r: _us(r["proxy_cpu_us_per_call"])),
            ("/bare", lambda r: _x(r["proxy_cpu_vs_bare"])),
            ("/nginx", lambda r: _x(r["proxy_cpu_vs_nginx"])),
        ]

    def tables(self, markdown: bool) -> str:
        parts = []
        summary = self.summary()
        for w in self.workloads:
            rows = summary[w.key]
            if not rows:
                continue
            columns = self.columns(w)
            if any(r["errors"] for r in rows.values()):
                columns.append(("errors", lambda r: str(r["errors"])))
            header = ["target", *(name for name, _ in columns)]
            body = [[target, *(show(r) for _, show in columns)] for target, r in rows.items()]
            parts.append(_table(w.title, header, body, markdown))
        return "\n".join(parts)

    def text(self, markdown: bool = False) -> str:
        m = self.machine
        lines = []
        if markdown:
            lines += ["# Tabadol benchmark: latest run", ""]
        lines += [
            f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, "
            f"grpcio {m['grpcio']}; commit {m['code']}; {m['date']}.",
            f"Command: `{self.command}`; {self.seconds:g} s per measurement; concurrency "
            f"{self.concurrency} over {self.generators} load generator processes.",
            "",
        ]
        for name, description in self.targets.items():
            lines.append(f"{'- ' if markdown else '  '}{name}: {description}")
        for name, why in self.skipped.items():
            lines.append(f"{'- ' if markdown else '  '}{name}: SKIPPED: {why}")
        lines += ["", self.tables(markdown)]
        if self.tracing:
            t = self.tracing
            lines += [
                _heading("Tracing: the broker sampled (default sampler) vs sampler always_off", markdown),
                f"{'- ' if markdown else '  '}CPU per unary call (100 B, concurrency "
                f"{self.concurrency}): {t['sampled_cpu_us']:.0f} µs sampled and exported over "
                f"OTLP vs {t['unsampled_cpu_us']:.0f} µs always_off: tracing costs "
                f"{t['sampled_cpu_us'] - t['unsampled_cpu_us']:.0f} µs per call ({t['ratio']:.2f}x)",
                f"{'- ' if markdown else '  '}latency at concurrency 1: p50 "
                f"{t['sampled_p50_ms_c1']:.2f} vs {t['unsampled_p50_ms_c1']:.2f} ms, p99 "
                f"{t['sampled_p99_ms_c1']:.2f} vs {t['unsampled_p99_ms_c1']:.2f} ms",
                "",
            ]  # fmt: skip
        if self.ledger:
            g = self.ledger
            lines += [
                _heading("Ledger writer (bench/ledger_write.py)", markdown),
                f"{g['records']:,} records in {g['seconds']:.2f} s: {g['records_per_s']:,.0f} "
                f"records/s, {g['seals']} sealed batches, batch interval {g['batch_ms']:g} ms",
                "",
            ]
        if self.broker_counters:
            c = self.broker_counters
            lines += [
                f"Broker (full features) afterwards: {c['ledger_records_written']:,.0f} ledger "
                f"records written, {c['spans_dropped']:,.0f} spans dropped, "
                f"{c.get('spans_stored', 0):,.0f} stored by the collector (OTLP over mTLS).",
                "",
            ]
        for note in self.notes:
            lines += [f"```\n{note}\n```" if markdown else note, ""]
        checks = self.checks()
        if checks:
            lines.append(_heading("Against the targets (broker, every feature on)", markdown))
            for check in checks:
                verdict = "MET" if check["met"] else "NOT MET"
                lines.append(
                    f"{'- ' if markdown else '  '}{check['what']}: {check['shown']}; "
                    f"target {check['target']}: {verdict}"
                )
            lines.append("")
        return "\n".join(lines)

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "latest.json").write_text(json.dumps(self.as_json(), indent=2) + "\n")
        (directory / "latest.md").write_text(self.text(markdown=True))


def _heading(text: str, markdown: bool) -> str:
    return f"### {text}\n" if markdown else f"{text}:"


def _table(title: str, header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    return "\n".join([title, line(header), *(line(r) for r in body)]) + "\n"


def _of(m: Measurement | None, figure: str) -> float | None:
    """One figure of a measurement that may not have been made."""
    value: float | None = getattr(m, figure) if m is not None else None
    return value


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _n(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _plus(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _us(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"
