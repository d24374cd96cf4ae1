"""The benchmark's figures as tables (stdout and Markdown) and JSON, with the ratios that
make them comparable across machines: to the direct call and to nginx from the same run,
the proxy's CPU per call to the bare pass-through's, and the broker's HTTP entry's to its
own gRPC path's."""

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

from bench.loadgen import WORKLOADS, Measurement, Workload

# Issue 13's targets for the broker with every feature on, each a ratio to the bare
# pass-through measured in the same run.
CPU_PER_CALL_VS_BARE_MAX = 1.3
CPU_PER_CALL_VS_BARE_STRETCH = 1.15
P99_C1_VS_BARE_MAX = 2.0
CPU_PER_MESSAGE_VS_BARE_MAX = 1.05
# The workloads each target is checked on, and how they are named in the checks.
CPU_PER_CALL_WORKLOADS = {"unary_100B": "100 B", "unary_64KiB": "64 KiB"}
# The broker's HTTP entry: the rows of its protocols on the JSON workload (information).
JSON_WORKLOAD = "unary_json"
JSON_PROTOCOLS = {"broker-connect": "Connect JSON", "broker-rest": "REST JSON"}
CPU_PER_MESSAGE_WORKLOADS = {
    "server_stream": "server streaming",
    "bidi_pingpong": "bidi ping-pong",
    "bidi_pipelined": "bidi pipelined",
}


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


@dataclass(frozen=True)
class Check:
    """One of the request path's targets in one run: the ratio, the figures it came from, the limit."""

    key: str  # the same in every run, e.g. cpu_per_call_unary_100B
    what: str
    value: float | None  # None: this run did not measure the figures
    figures: dict[str, float]  # e.g. {"broker_cpu_us_per_call": 723.0, "bare_...": 364.0}
    shown: str  # the value and its figures, as a reader wants them
    limit: float | None  # None: information, not a target
    stretch: float | None = None
    failed: int = 0  # calls (or streams) that failed in the measurements it came from

    @property
    def met(self) -> bool | None:
        """Whether the target is met; None for information or figures not measured. Failed
        calls void a measurement: they are not in its latencies or its CPU per call."""
        if self.limit is None or self.value is None:
            return None
        return not self.failed and self.value <= self.limit

    @property
    def stretch_met(self) -> bool | None:
        if self.stretch is None or self.value is None:
            return None
        return not self.failed and self.value <= self.stretch

    @property
    def target(self) -> str | None:
        if self.limit is None:
            return None
        stretch = f" (stretch <= {self.stretch:g}x)" if self.stretch is not None else ""
        return f"<= {self.limit:g}x{stretch}"

    @property
    def verdict(self) -> str:
        if self.limit is None:
            return "information, not a target"
        if self.value is None:
            return "NOT MEASURED"
        verdict = "MET" if self.met else "NOT MET"
        if self.failed:
            verdict += f" ({self.failed} failed calls void the measurement)"
        if self.stretch is not None:
            verdict += f"; stretch {'MET' if self.stretch_met else 'not met'}"
        return verdict

    def line(self) -> str:
        """The check as one line of the report."""
        if self.limit is None:
            return f"{self.what}: {self.shown} ({self.verdict})"
        return f"{self.what}: {self.shown}; target {self.target}: {self.verdict}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "what": self.what,
            "value": self.value,
            "figures": self.figures,
            "shown": self.shown,
            "target": self.target,
            "limit": self.limit,
            "stretch": self.stretch,
            "failed": self.failed,
            "met": self.met,
            "stretch_met": self.stretch_met,
            "verdict": self.verdict,
        }


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

    def checks(self) -> list[Check]:
        """Where the broker stands against the request path's targets, each from this run's figures,
        met or not; a target whose figures this run did not measure says so."""
        out: list[Check] = []
        for key, size in CPU_PER_CALL_WORKLOADS.items():
            c = self._concurrency(key)
            out.append(
                _vs_bare(
                    self, f"cpu_per_call_{key}", key, c, "cpu_us_per_call", _cpu_per_unit, _show_us,
                    f"CPU per unary call, {size} at concurrency {c}, broker / bare",
                    CPU_PER_CALL_VS_BARE_MAX, CPU_PER_CALL_VS_BARE_STRETCH,
                )
            )  # fmt: skip
        out.append(
            _vs_bare(
                self, "p99_c1_unary_100B", "unary_100B", 1, "p99_ms_c1", _p99, _show_ms,
                "p99 latency at concurrency 1, unary 100 B, broker / bare", P99_C1_VS_BARE_MAX,
            )
        )  # fmt: skip
        for key, kind in CPU_PER_MESSAGE_WORKLOADS.items():
            c = self._concurrency(key)
            at = "one stream" if c == 1 and _WORKLOADS[key].one_stream else f"concurrency {c}"
            out.append(
                _vs_bare(
                    self, f"cpu_per_message_{key}", key, c, "cpu_us_per_msg", cpu_per_message, _show_us,
                    f"CPU per message, {kind} ({at}), broker / bare", CPU_PER_MESSAGE_VS_BARE_MAX,
                )
            )  # fmt: skip
        out.append(self._added_latency())
        c = self.concurrency
        for target, name in JSON_PROTOCOLS.items():
            for base, over in (("broker", "gRPC through the same broker"), ("bare", "bare")):
                out.append(
                    _cpu_ratio(
                        self, f"cpu_per_call_{target}_vs_{base}",
                        f"CPU per unary call, person record at concurrency {c}, {name} / {over}",
                        target, base, c,
                    )
                )  # fmt: skip
        return out

    def _concurrency(self, workload: str) -> int:
        return 1 if _WORKLOADS[workload].one_stream else self.concurrency

    def _added_latency(self) -> Check:
        """The broker's p50 at concurrency 1 over calling the provider directly: information."""
        broker, direct = self.get("broker", "unary_100B", 1), self.get("direct", "unary_100B", 1)
        what = "added p50 latency at concurrency 1, unary 100 B, broker - direct"
        key = "added_p50_c1_unary_100B"
        if broker is None or direct is None or broker.p50_ms is None or direct.p50_ms is None:
            missing = "no p50 for broker and direct on unary_100B at concurrency 1 in this run"
            return Check(key, what, None, {}, missing, limit=None)
        added = broker.p50_ms - direct.p50_ms
        return Check(
            key,
            what,
            added,
            {"broker_p50_ms_c1": broker.p50_ms, "direct_p50_ms_c1": direct.p50_ms},
            f"{added:+.2f} ms (broker {broker.p50_ms:.2f} ms, direct {direct.p50_ms:.2f} ms)",
            limit=None,
            failed=broker.errors + direct.errors,
        )

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
                if w.kind == "server_stream":
                    row["proxy_cpu_us_per_msg"] = cpu_per_message(m)
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
            "checks": [check.as_dict() for check in self.checks()],
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
            *(
                [("CPU µs/msg", lambda r: _us_fine(r["proxy_cpu_us_per_msg"]))]
                if workload.kind == "server_stream"
                else []
            ),
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
        lines.append(
            _heading("Against the request path's targets (broker, every feature on)", markdown)
        )
        lines += [f"{'- ' if markdown else '  '}{check.line()}" for check in self.checks()]
        lines.append("")
        return "\n".join(lines)

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "latest.json").write_text(json.dumps(self.as_json(), indent=2) + "\n")
        (directory / "latest.md").write_text(self.text(markdown=True))


_WORKLOADS = {w.key: w for w in WORKLOADS}


def _vs_bare(
    run: Run,
    key: str,
    workload: str,
    concurrency: int,
    figure: str,
    of: Callable[[Measurement], float | None],
    show: Callable[[float], str],
    what: str,
    limit: float,
    stretch: float | None = None,
) -> Check:
    """The broker's ``figure`` over the bare pass-through's, both from ``run``."""
    broker, bare = run.get("broker", workload, concurrency), run.get("bare", workload, concurrency)
    b, base = (of(broker) if broker else None), (of(bare) if bare else None)
    if broker is None or bare is None or b is None or not base:
        missing = " and ".join(name for name, value in (("broker", b), ("bare", base)) if not value)
        return Check(
            key,
            what,
            None,
            {},
            f"no {figure} for {missing} on {workload} at concurrency {concurrency} in this run",
            limit,
            stretch,
        )
    ratio = b / base
    return Check(
        key,
        what,
        ratio,
        {f"broker_{figure}": b, f"bare_{figure}": base},
        f"{ratio:.2f}x (broker {show(b)}, bare {show(base)})",
        limit,
        stretch,
        failed=broker.errors + bare.errors,
    )


def _cpu_ratio(run: Run, key: str, what: str, top: str, base: str, concurrency: int) -> Check:
    """``top``'s CPU per call on the JSON workload over ``base``'s, from ``run``: information."""
    a, b = run.get(top, JSON_WORKLOAD, concurrency), run.get(base, JSON_WORKLOAD, concurrency)
    x, y = _of(a, "proxy_cpu_us"), _of(b, "proxy_cpu_us")
    if a is None or b is None or x is None or not y:
        missing = (
            f"no CPU per call for {top} and {base} on {JSON_WORKLOAD} at concurrency "
            f"{concurrency} in this run"
        )
        return Check(key, what, None, {}, missing, limit=None)
    ratio = x / y
    return Check(
        key,
        what,
        ratio,
        {f"{top}_cpu_us_per_call": x, f"{base}_cpu_us_per_call": y},
        f"{ratio:.2f}x ({top} {_show_us(x)}, {base} {_show_us(y)})",
        limit=None,
        failed=a.errors + b.errors,
    )


def _cpu_per_unit(m: Measurement) -> float | None:
    return m.proxy_cpu_us


def cpu_per_message(m: Measurement) -> float | None:
    """The proxy's CPU per message received: per call over a call's messages when streaming."""
    if m.proxy_cpu_us is None or not m.messages:
        return None
    return m.proxy_cpu_us * m.units / m.messages


def _p99(m: Measurement) -> float | None:
    return m.p99_ms


def _show_us(value: float) -> str:
    return f"{value:,.1f} µs" if value < 100 else f"{value:,.0f} µs"


def _show_ms(value: float) -> str:
    return f"{value:.2f} ms"


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


def _us_fine(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"
