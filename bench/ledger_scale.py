"""The ledger at national scale: a quarter of synthetic traffic between many agencies, in a
SQLite ledger filled to 1 M and then 10 M records, and what accounting costs at each size:
the quarterly report (time, peak RSS), a dashboard request, full and incremental verify,
bytes per record, and archive and restore-verify.

    .venv/bin/python bench/ledger_scale.py [--records 1000000,10000000] [--new 100000]
        [--keep DIR] [--quick]                                  # or: make bench-ledger

Writes bench/results/ledger-scale.json (with --quick: ledger-scale-quick.json) and prints a
table. Method, reading and the 1-billion-record projection: docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from google.protobuf import descriptor_pb2  # noqa: E402

from bench.report import _table, machine  # noqa: E402
from tabadol.ledger.record import LedgerRecord, Seal  # noqa: E402
from tabadol.ledger.seal import Sealer  # noqa: E402
from tabadol.ledger.store import SqliteLedgerStore  # noqa: E402
from tabadol.pki import CertificateAuthority  # noqa: E402
from tabadol.reports.quarter import TEHRAN, Quarter  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PYTHON = os.path.relpath(sys.executable, ROOT)
TRUST_DOMAIN = "tabadol.example"
BILLION = 1_000_000_000
# The targets the ledger at national scale is held to.
REPORT_GROWTH_MAX = 1.5  # report time at the largest size / at the smallest
REPORT_SECONDS_MAX = 5.0
FULL_VERIFY_MIN_PER_S = 200_000
INCREMENTAL_GROWTH_MAX = 1.5  # "independent of ledger size", allowing for noise

MS = 1_000_000
DAY_NS = 86_400 * 10**9
SERVICE_NOUNS = ("Registry", "Inquiry", "Records", "Payments", "Licences", "Permits", "Notices")
METHOD_VERBS = ("Inquire", "Get", "List", "Verify", "Submit", "Cancel", "Search", "Renew")


# --- The synthetic exchange ----------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    provider: str
    service: str
    name: str
    kind: str  # unary or server_streaming
    endpoints: tuple[str, ...]
    # Natural logarithms of the medians: the provider's typical answer time (ns) for the
    # method, and its request and response sizes (bytes).
    log_duration_ns: float
    log_request_bytes: float
    log_response_bytes: float


@dataclass(frozen=True)
class Outcome:
    """How a call ends: its status, whether the broker forwarded it (an endpoint was chosen)
    and whether the consumer's certificate identified it."""

    status: int
    share: float
    forwarded: bool
    verified: bool = True


# Mostly OK; provider errors; the broker's refusals (grant, rate limit: never forwarded);
# providers out of reach (UNAVAILABLE, forwarded); calls refused before identification.
OUTCOMES = (
    Outcome(0, 0.946, True),  # OK
    Outcome(3, 0.010, True),  # INVALID_ARGUMENT
    Outcome(5, 0.015, True),  # NOT_FOUND
    Outcome(4, 0.003, True),  # DEADLINE_EXCEEDED
    Outcome(13, 0.004, True),  # INTERNAL
    Outcome(7, 0.004, False),  # PERMISSION_DENIED: no grant for the method
    Outcome(8, 0.004, False),  # RESOURCE_EXHAUSTED: over the consumer's rate limit
    Outcome(14, 0.009, True),  # UNAVAILABLE: no endpoint answered
    Outcome(16, 0.005, False, False),  # UNAUTHENTICATED: revoked or expired certificate
)
_LOG_REFUSAL_NS = math.log(0.3 * MS)  # the broker refuses in about 0.3 ms
_LOG_DEADLINE_NS = math.log(10_000 * MS)  # consumers' deadlines: about 10 s
_LOG_UNREACHABLE_NS = math.log(2 * MS)  # failing to connect to every endpoint
ZIPF_S = 1.1  # calls over (consumer, method) pairs: weight of the pair of rank r is 1/r**s


@dataclass
class Exchange:
    """Agencies, their services and methods, and who calls what how often."""

    agencies: list[str]
    providers: list[str]
    methods: list[Method]
    pairs: list[tuple[str, Method]]  # (consumer, method), most called first
    pair_weights: list[float]  # sums to 1
    serials: dict[str, str]  # agency -> hex serial of its certificate
    government_services: dict[str, int]
    _cumulative: list[float] = field(default_factory=list)

    @classmethod
    def make(cls, rng: random.Random, agencies: int, providers: int) -> Exchange:
        ids = [f"org-{i:03d}" for i in range(1, agencies + 1)]
        methods: list[Method] = []
        for p, provider in enumerate(ids[:providers], start=1):
            package = f"tabadol.agencies.{provider.replace('-', '')}.v1"
            for s, noun in enumerate(rng.sample(SERVICE_NOUNS, rng.randint(2, 4)), start=1):
                endpoints = tuple(f"10.{p}.{s}.{k}:443" for k in range(1, rng.randint(1, 3) + 1))
                for verb in rng.sample(METHOD_VERBS, rng.randint(2, 5)):
                    methods.append(
                        Method(
                            provider,
                            f"{package}.{noun}",
                            f"{verb}{noun.rstrip('s')}",
                            "server_streaming" if rng.random() < 0.1 else "unary",
                            endpoints,
                            log_duration_ns=rng.gauss(math.log(20 * MS), 0.8),
                            log_request_bytes=rng.gauss(math.log(200), 0.8),
                            log_response_bytes=rng.gauss(math.log(1500), 1.0),
                        )
                    )
        # Each consumer calls a sparse subset, popular methods more often; then a Zipf law
        # over the pairs: a few pairs carry most of the traffic, most pairs a trickle.
        popularity = [1 / (r + 1) for r in range(len(methods))]
        rng.shuffle(popularity)
        pairs = sorted(
            {
                (consumer, m)
                for consumer in ids
                for m in rng.choices(methods, popularity, k=rng.randint(3, 25))
                if m.provider != consumer
            },
            key=lambda pair: (pair[0], pair[1].service, pair[1].name),
        )
        rng.shuffle(pairs)
        weights = [1 / (r + 1) ** ZIPF_S for r in range(len(pairs))]
        total = sum(weights)
        return cls(
            agencies=ids,
            providers=ids[:providers],
            methods=methods,
            pairs=pairs,
            pair_weights=[w / total for w in weights],
            serials={a: f"{rng.getrandbits(128):x}" for a in ids},
            government_services={a: rng.randint(1, 40) for a in ids},
            _cumulative=list(itertools.accumulate(w / total for w in weights)),
        )

    def describe(self) -> dict[str, Any]:
        services = {m.service for m in self.methods}
        return {
            "agencies": len(self.agencies),
            "providers": len(self.providers),
            "services": len(services),
            "methods": len(self.methods),
            "consumer_method_pairs": len(self.pairs),
            "calls_over_pairs": f"Zipf, s={ZIPF_S}: the top 1% of pairs carry "
            f"{sum(self.pair_weights[: max(1, len(self.pairs) // 100)]):.0%} of calls",
            "outcomes": {
                f"{o.status}{'' if o.forwarded else ' refused'}"
                f"{'' if o.verified else ' unidentified'}": o.share
                for o in OUTCOMES
            },
            "durations": "log-normal per method, median 20 ms x log-normal(0, 0.8), sigma 0.6; "
            "refusals about 0.3 ms, DEADLINE_EXCEEDED about 10 s",
            "time": "uniform over the quarter; each sealed batch covers its own slice of it, "
            "records in start order within the batch",
        }

    # --- The registry the broker configuration declares ----------------------------------

    def contracts(self) -> bytes:
        """A FileDescriptorSet with every provider's services."""
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        services: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}
        for m in self.methods:
            package, _, service_name = m.service.rpartition(".")
            fd = files.get(package)
            if fd is None:
                fd = files[package] = descriptor_pb2.FileDescriptorProto(
                    name=f"{package.replace('.', '/')}/service.proto",
                    package=package,
                    syntax="proto3",
                )
                for message in ("Request", "Response"):
                    fd.message_type.add(name=message).field.add(
                        name="data", number=1, type=12, label=1
                    )
            svc = services.get(m.service)
            if svc is None:
                svc = services[m.service] = fd.service.add(name=service_name)
            svc.method.add(
                name=m.name,
                input_type=f".{package}.Request",
                output_type=f".{package}.Response",
                server_streaming=m.kind == "server_streaming",
            )
        return descriptor_pb2.FileDescriptorSet(file=list(files.values())).SerializeToString()

    def config(self, ledger: str) -> str:
        """A broker configuration (TOML) declaring every agency, service and grant."""
        lines = [
            "[broker]",
            'listen = "127.0.0.1:7443"',
            f'trust_domain = "{TRUST_DOMAIN}"',
            'pki_dir = "pki"',
            'contracts = ["contracts.pb"]',
            "",
            "[ledger]",
            f'path = "{ledger}"',
        ]
        for a in self.agencies:
            lines += [
                "",
                "[[agency]]",
                f'id = "{a}"',
                f'name = "Agency {a[4:]}"',
                f"government_services = {self.government_services[a]}",
                "visits_per_exchange = 0.5",
                f"in_person_visits_per_quarter = {self.government_services[a] * 10_000}",
            ]
        for service, methods in itertools.groupby(
            sorted(self.methods, key=lambda m: m.service), key=lambda m: m.service
        ):
            first = next(methods)
            endpoints = ", ".join(f'"{e}"' for e in first.endpoints)
            lines += [
                "",
                "[[service]]",
                f'name = "{service}"',
                f'provider = "{first.provider}"',
                f"endpoints = [{endpoints}]",
            ]
        granted: dict[tuple[str, str], set[str]] = {}
        for consumer, m in self.pairs:
            granted.setdefault((consumer, m.service), set()).add(m.name)
        for (consumer, service), names in sorted(granted.items()):
            listed = ", ".join(f'"{n}"' for n in sorted(names))
            lines += [
                "",
                "[[grant]]",
                f'consumer = "{consumer}"',
                f'service = "{service}"',
                f"methods = [{listed}]",
            ]
        return "\n".join(lines) + "\n"

    # --- Records -------------------------------------------------------------------------

    def records(
        self, rng: random.Random, count: int, start_ns: int, end_ns: int, instance: str
    ) -> list[LedgerRecord]:
        """``count`` calls that started in [start_ns, end_ns), in start order."""
        pairs = rng.choices(self.pairs, cum_weights=self._cumulative, k=count)
        outcomes = rng.choices(OUTCOMES, [o.share for o in OUTCOMES], k=count)
        span = end_ns - start_ns
        rand, gauss, bits, exp = rng.random, rng.gauss, rng.getrandbits, math.exp
        starts = sorted(start_ns + int(rand() * span) for _ in range(count))
        out = []
        for (consumer, m), outcome, start in zip(pairs, outcomes, starts, strict=True):
            status = outcome.status
            if not outcome.forwarded:
                duration = int(exp(_LOG_REFUSAL_NS + 0.5 * gauss()))
                request_bytes, request_messages, response_bytes, response_messages = 0, 0, 0, 0
                endpoint = ""
            else:
                if status == 4:
                    duration = int(exp(_LOG_DEADLINE_NS + 0.3 * gauss()))
                elif status == 14:
                    duration = int(exp(_LOG_UNREACHABLE_NS + 0.7 * gauss()))
                else:
                    duration = int(exp(m.log_duration_ns + 0.6 * gauss()))
                request_bytes, request_messages = int(exp(m.log_request_bytes + 0.5 * gauss())), 1
                response_messages = 0
                if status == 0:
                    streaming = m.kind == "server_streaming"
                    response_messages = int(exp(1.5 + 0.8 * gauss())) + 1 if streaming else 1
                response_bytes = int(exp(m.log_response_bytes + 0.7 * gauss())) * response_messages
                endpoint = m.endpoints[int(rand() * len(m.endpoints))]
            out.append(
                LedgerRecord(
                    start,
                    start + duration,
                    f"{bits(128):032x}" if rand() < 0.7 else "",  # traced calls
                    f"{bits(128):032x}",  # uuid4().hex in the broker
                    consumer,
                    m.provider,
                    m.service,
                    m.name,
                    m.kind,
                    status,
                    request_bytes,
                    request_messages,
                    response_bytes,
                    response_messages,
                    endpoint,
                    instance,
                    "",
                    "",
                    self.serials[consumer] if outcome.verified else f"{bits(64):x}",
                    outcome.verified,
                )
            )
        return out

    # --- Expected rollup size (for the projection) ---------------------------------------

    def expected_rollup_rows(self, records: float, days: int) -> dict[str, float]:
        """How many call-group rows and provider-day rows (one per provider and Tehran day,
        holding its five-minute windows) a quarter of ``records`` calls is expected to fill,
        if calls are spread evenly in time: each possible row is there unless no call fell
        into it (Poisson)."""
        per_day = records / days
        groups = 0.0
        for w in self.pair_weights:
            for o in OUTCOMES:
                groups += 1 - math.exp(-per_day * w * o.share)
        forwarded = sum(o.share for o in OUTCOMES if o.forwarded)
        by_provider: dict[str, float] = {}
        for (_, m), w in zip(self.pairs, self.pair_weights, strict=True):
            by_provider[m.provider] = by_provider.get(m.provider, 0.0) + w * forwarded
        provider_days = sum(days * (1 - math.exp(-per_day * w)) for w in by_provider.values())
        return {"call_groups": groups * days, "provider_days": provider_days}

    def possible_rollup_rows(self, days: int) -> int:
        """The most rows a quarter can fill, whatever its number of records."""
        providers = {m.provider for _, m in self.pairs}
        return days * len(self.pairs) * len(OUTCOMES) + days * len(providers)


# --- Filling a ledger ----------------------------------------------------------------------


class Filler:
    """Appends synthetic calls to a SQLite ledger through the store's append_sealed, in big
    sealed batches signed by the broker's key, as the ledger writer does."""

    def __init__(
        self, path: Path, sealer: Sealer, exchange: Exchange, quarter: Quarter, seed: int
    ) -> None:
        self.store = SqliteLedgerStore(path)
        self.sealer = sealer
        self.exchange = exchange
        self.quarter = quarter
        self.rng = random.Random(seed)
        self._last_sealed_ns = 0
        self.seals: list[tuple[int, int]] = []  # (records sealed, sealed_ns), in order
        self.in_quarter = 0  # records that started in the quarter (the rest are new days')

    def _seal(self, seq: int, count: int, head: str) -> Seal:
        # Sealed now, as a broker seals each batch (`ledger archive --before` goes by it).
        self._last_sealed_ns = max(time.time_ns(), self._last_sealed_ns)
        return self.sealer.seal(seq, count, head, self._last_sealed_ns)

    def moment_after(self, records: int) -> str:
        """An ISO date-time between the seal closest to ``records`` records and the next:
        `ledger archive --before` it takes the sealed batches up to that seal."""
        i = min(range(len(self.seals)), key=lambda k: abs(self.seals[k][0] - records))
        after = self.seals[i + 1][1] if i + 1 < len(self.seals) else time.time_ns()
        middle = (self.seals[i][1] + after) // 2
        return dt.datetime.fromtimestamp(middle / 1e9, dt.UTC).isoformat()

    def fill(
        self,
        count: int,
        batch: int,
        progress: Callable[[int], None],
        within: tuple[int, int] | None = None,
    ) -> float:
        """Append ``count`` records spread evenly over the quarter (or ``within`` these
        bounds): batch k of n covers the k-th n-th of it. Returns the seconds taken."""
        batches = max(1, math.ceil(count / batch))
        start, end = within or (self.quarter.start_ns, self.quarter.end_ns)
        span = end - start
        began = time.perf_counter()
        written = 0
        for k in range(batches):
            n = count * (k + 1) // batches - count * k // batches
            lo, hi = start + span * k // batches, start + span * (k + 1) // batches
            instance = f"broker-{k % 2 + 1}"
            records = self.exchange.records(self.rng, n, lo, hi, instance)
            seal = self.store.append_sealed(records, self._seal, self.sealer.cert_pem)
            self.seals.append((seal.count, seal.sealed_ns))
            written += n
            if k % 20 == 19:
                progress(written)
        if within is None:
            self.in_quarter += count
        return time.perf_counter() - began

    def count(self) -> int:
        return self.store.records_count()

    def close(self) -> None:
        self.store.close()


# --- Measuring commands ----------------------------------------------------------------------


@dataclass
class Measured:
    """One command run as a child process: its wall time, peak RSS and output."""

    argv: list[str]
    seconds: float
    max_rss_mb: float
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def failure(self) -> str:
        tail = (self.stderr.strip() or self.stdout.strip()).splitlines()[-5:]
        return f"`{shlex.join(self.argv)}` exited {self.returncode}: " + " | ".join(tail)


# Runs argv[2:] and writes its peak RSS (KiB) to the file argv[1]. A child's ru_maxrss on
# Linux counts what it inherited before exec, so the measured command is started from this
# small process (a few MB), not from the benchmark (which holds the synthetic exchange).
_PEAK_RSS = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(argv: list[str], cwd: Path) -> Measured:
    """Run ``argv``: its time, and its own peak RSS (through _PEAK_RSS)."""
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.NamedTemporaryFile("r") as peak,
    ):
        began = time.perf_counter()
        code = subprocess.call(
            [sys.executable, "-S", "-c", _PEAK_RSS, peak.name, *argv],
            cwd=cwd,
            stdout=out,
            stderr=err,
            text=True,
        )
        seconds = time.perf_counter() - began
        out.seek(0)
        err.seek(0)
        kib = int(peak.read() or 0)
        return Measured(argv, seconds, kib / 1024, code, out.read(), err.read())


def tabadol() -> list[str]:
    """The command line tool of this checkout's environment."""
    script = Path(sys.executable).parent / "tabadol"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from tabadol.cli import main; sys.exit(main())"]


def verified_records(m: Measured) -> int | None:
    """The record count `ledger verify` printed in its OK line."""
    found = re.search(r"OK: ([0-9]+) records", m.stdout)
    return int(found.group(1)) if found else None


def ledger_bytes(path: Path) -> dict[str, int]:
    wal = path.with_name(path.name + "-wal")
    return {"db": path.stat().st_size, "wal": wal.stat().st_size if wal.exists() else 0}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def live_records(path: Path) -> int:
    """Records the SQLite file holds now (after an archive removed some)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT count(*) FROM records").fetchone()[0])


# --- The run ----------------------------------------------------------------------------------


@dataclass
class Bench:
    work: Path
    exchange: Exchange
    quarter: Quarter
    auditor: Path  # credentials for signed checkpoints
    ca_pem: Path
    errors: list[str] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.work / "broker.toml"

    @property
    def ledger(self) -> Path:
        return self.work / "ledger.db"

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def command(self, what: str, *args: str, cwd: Path | None = None) -> Measured | None:
        """Run `tabadol ARGS`; a failure is noted (and the run goes on) and gives None."""
        m = run_measured([*tabadol(), *args], cwd or self.work)
        if not m.ok:
            self.errors.append(f"{what}: {m.failure()}")
            self.say(f"  {what}: FAILED ({m.failure()})")
            return None
        return m

    def report(self) -> dict[str, Any]:
        out = self.work / "report"
        m = self.command(
            "report", "report", "quarterly", "--config", str(self.config),
            "--quarter", str(self.quarter), "--out", str(out),
        )  # fmt: skip
        if m is None:
            return {"ok": False}
        files = sorted(p.name for p in out.iterdir())
        data = json.loads(next(out.glob("*.json")).read_text())
        national = data.get("national", {})
        shutil.rmtree(out)
        self.say(f"  report: {m.seconds:.2f} s, peak RSS {m.max_rss_mb:.0f} MB")
        return {
            "ok": True,
            "seconds": m.seconds,
            "max_rss_mb": m.max_rss_mb,
            "files": files,
            "national": {k: v for k, v in national.items() if isinstance(v, int | float)},
        }

    def dashboard(self) -> dict[str, Any]:
        """dashboard() in this process, on its own read-only store, as the ops server calls
        it for a request (no HTTP, no TLS): a first request and a second one."""
        from tabadol.ops.dashboard import Accounts, dashboard
        from tabadol.registry.current import load_current

        cfg = load_current(self.config)
        store = SqliteLedgerStore(self.ledger, readonly=True)
        # Noon on the quarter's last day: "today" and "this quarter" both hold calls.
        last_day = dt.datetime.fromtimestamp(self.quarter.end_ns / 1e9, TEHRAN) - dt.timedelta(
            hours=12
        )
        try:
            times = []
            answer: dict[str, Any] = {}
            for _ in range(2):
                began = time.perf_counter()
                answer = dashboard(Accounts(cfg, store), last_day)
                times.append(time.perf_counter() - began)
        except Exception as e:  # a failure is a finding of the run, not its end
            self.errors.append(f"dashboard: {type(e).__name__}: {e}")
            self.say(f"  dashboard: FAILED ({type(e).__name__}: {e})")
            return {"ok": False}
        finally:
            store.close()
        self.say(f"  dashboard: {times[0]:.2f} s, then {times[1]:.2f} s")
        return {
            "ok": True,
            "how": "tabadol.ops.dashboard.dashboard() in-process (no HTTP), read-only store",
            "now": last_day.isoformat(),
            "first_seconds": times[0],
            "second_seconds": times[1],
            "transactions": answer.get("transactions"),
        }

    def verify(self, what: str, *extra: str) -> dict[str, Any]:
        m = self.command(
            what, "ledger", "verify", "--config", str(self.config), "--as", str(self.auditor),
            *extra,
        )  # fmt: skip
        if m is None:
            return {"ok": False}
        return {
            "ok": True,
            "seconds": m.seconds,
            "max_rss_mb": m.max_rss_mb,
            "records": verified_records(m),
            "output": m.stdout.strip().splitlines()[:5],
        }

    def rollup_rows(self) -> dict[str, int] | None:
        """The rollup's rows (live and archived), where the store keeps rollups."""
        store = SqliteLedgerStore(self.ledger, readonly=True)
        try:
            rows = getattr(store, "rollup_rows", None)
            if rows is None:
                return None
            live = rows()
            return {"call_groups": len(live.groups), "provider_days": len(live.provider_days)}
        except Exception as e:
            self.errors.append(f"rollup rows: {type(e).__name__}: {e}")
            return None
        finally:
            store.close()

    def archive_round(self, records: int, before: str) -> dict[str, Any]:
        """On a copy of the ledger: archive the sealed batches before ``before`` (about
        half the records), then verify archives and live store together, and the archives
        alone offline."""
        copy_dir = self.work / "archived"
        copy_dir.mkdir(exist_ok=True)
        copy = copy_dir / "ledger.db"
        config = self.work / "broker-archived.toml"
        config.write_text(self.exchange.config("archived/ledger.db"))
        began = time.perf_counter()
        with (
            sqlite3.connect(f"file:{self.ledger}?mode=ro", uri=True) as source,
            sqlite3.connect(copy) as target,
        ):
            source.backup(target)
        os.chmod(copy, 0o600)
        copied = time.perf_counter() - began
        out = self.work / "archives"
        result: dict[str, Any] = {"before": before, "copy_seconds": copied}
        m = self.command(
            "archive", "ledger", "archive", "--config", str(config), "--before", before,
            "--out", str(out),
        )  # fmt: skip
        if m is not None:
            left = live_records(copy)
            archived, archived_bytes = records - left, directory_bytes(out)
            result.update(
                archive_seconds=m.seconds,
                archived_records=archived,
                archived_records_per_s=archived / m.seconds,
                live_records=left,
                archive_files=len([p for p in out.rglob("*") if p.is_file()]),
                archive_bytes=archived_bytes,
                archive_bytes_per_record=archived_bytes / archived if archived else None,
                live_bytes_after=ledger_bytes(copy),  # SQLite keeps freed pages for reuse
            )
            self.say(
                f"  archive: {archived:,} records in {m.seconds:.2f} s, {archived_bytes:,} bytes"
            )
            v = self.command(
                "verify --archives", "ledger", "verify", "--config", str(config), "--full",
                "--archives", str(out),
            )  # fmt: skip
            if v is not None:
                result.update(
                    verify_archives_seconds=v.seconds,
                    verify_archives_records_per_s=records / v.seconds,
                    verify_archives_output=v.stdout.strip().splitlines()[:5],
                )
                self.say(f"  verify --archives: {v.seconds:.2f} s")
            o = self.command(
                "verify-archive", "ledger", "verify-archive", str(out), "--ca",
                str(self.ca_pem),
            )  # fmt: skip
            if o is not None:
                result.update(
                    verify_archive_offline_seconds=o.seconds,
                    verify_archive_offline_records_per_s=archived / o.seconds,
                    verify_archive_offline_output=o.stdout.strip().splitlines()[:5],
                )
                self.say(f"  verify-archive (offline): {o.seconds:.2f} s")
        shutil.rmtree(copy_dir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        config.unlink()
        return result


def prepare(work: Path, exchange: Exchange) -> tuple[Sealer, Path, Path]:
    """The PKI (CA, broker, an auditor for checkpoints), the contracts and the configuration."""
    ca = CertificateAuthority.init(work / "pki", TRUST_DOMAIN)
    ca.issue_broker()
    auditor = ca.issue_person("auditor", "bench")
    sealer = Sealer((ca.dir / "broker.key").read_bytes(), (ca.dir / "broker.crt").read_bytes())
    (work / "contracts.pb").write_bytes(exchange.contracts())
    (work / "broker.toml").write_text(exchange.config("ledger.db"))
    return sealer, auditor, ca.dir / "ca.crt"


def measure_size(
    bench: Bench, filler: Filler, target: int, new: int, batch: int, day_index: int
) -> dict[str, Any]:
    """Fill up to ``target`` records, then measure everything at that size."""
    have = filler.in_quarter
    bench.say(f"filling the quarter: {have:,} -> {target:,} records")

    def progress(n: int) -> None:
        bench.say(f"  ... {have + n:,}")

    fill_s = filler.fill(target - have, batch, progress)
    rate = (target - have) / fill_s
    bench.say(f"  filled {target - have:,} records in {fill_s:.1f} s: {rate:,.0f} records/s")
    size: dict[str, Any] = {
        "records": target,
        "fill": {"records": target - have, "seconds": fill_s, "records_per_s": rate},
    }
    on_disk, held = ledger_bytes(bench.ledger), filler.count()
    size["bytes"] = {
        **on_disk,
        "records": held,
        "per_record": (on_disk["db"] + on_disk["wal"]) / held,
    }
    size["rollup_rows"] = bench.rollup_rows()
    size["report"] = bench.report()
    size["dashboard"] = bench.dashboard()
    full = bench.verify("full verify", "--full")  # and signs a checkpoint at the last seal
    if full.get("ok"):
        full["records_per_s"] = (full["records"] or target) / full["seconds"]
        bench.say(f"  full verify: {full['seconds']:.2f} s, {full['records_per_s']:,.0f} records/s")
    size["verify_full"] = full
    # The archive round copies the ledger (gigabytes at 10 M): after it, the live file is no
    # longer in the page cache, so the verifies below it would measure the disk. It comes last.
    before = filler.moment_after(held // 2)
    # A day's new calls, as a daily verify finds them: on a day of their own after the
    # quarter (each size its own), so only they are new there and the quarter stays as filled.
    day = filler.quarter.end_ns + day_index * DAY_NS
    bench.say(f"  appending {new:,} new records, all on day {day_index} after the quarter")
    filler.fill(new, batch, lambda n: None, within=(day, day + DAY_NS))
    incremental = bench.verify("incremental verify")  # from the checkpoint: the new records
    nothing_new = bench.verify("verify with nothing new")  # the fixed cost of a run
    if incremental.get("ok"):
        incremental["new_records"] = new
        bench.say(f"  incremental verify of {new:,} new records: {incremental['seconds']:.2f} s")
    if nothing_new.get("ok"):
        bench.say(f"  verify with nothing new: {nothing_new['seconds']:.2f} s")
    size["verify_incremental"] = incremental
    size["verify_nothing_new"] = nothing_new
    size["archive"] = bench.archive_round(filler.count(), before)
    return size


def _figure(size: dict[str, Any], *path: str) -> float | None:
    value: Any = size
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def checks(sizes: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ratios of the largest size to the smallest, and the issue's targets."""
    small, large = sizes[0], sizes[-1]
    scale = f"{large['records']:,} / {small['records']:,} records"
    report_small, report_large = (_figure(s, "report", "seconds") for s in (small, large))
    incremental = [_figure(s, "verify_incremental", "seconds") for s in (small, large)]
    ratios = {
        "scale": scale,
        "records": large["records"] / small["records"],
        "report_seconds": _ratio(report_large, report_small),
        "report_max_rss": _ratio(*(_figure(s, "report", "max_rss_mb") for s in (large, small))),
        "dashboard_seconds": _ratio(
            *(_figure(s, "dashboard", "first_seconds") for s in (large, small))
        ),
        "verify_incremental_seconds": _ratio(incremental[1], incremental[0]),
        "verify_full_seconds": _ratio(
            *(_figure(s, "verify_full", "seconds") for s in (large, small))
        ),
    }
    out: list[dict[str, Any]] = []

    def check(what: str, value: float | None, shown: str, target: str, met: bool) -> None:
        out.append({"what": what, "value": value, "shown": shown, "target": target, "met": met})

    if ratios["report_seconds"] is not None:
        r = ratios["report_seconds"]
        check(
            f"quarterly report time, {scale}", r, f"{r:.2f}x", f"<= {REPORT_GROWTH_MAX}x",
            r <= REPORT_GROWTH_MAX,
        )  # fmt: skip
    if report_large is not None:
        check(
            f"quarterly report at {large['records']:,} records", report_large,
            f"{report_large:.2f} s", f"< {REPORT_SECONDS_MAX:g} s",
            report_large < REPORT_SECONDS_MAX,
        )  # fmt: skip
    rate = _figure(large, "verify_full", "records_per_s")
    if rate is not None:
        check(
            f"full verify at {large['records']:,} records", rate, f"{rate:,.0f} records/s",
            f">= {FULL_VERIFY_MIN_PER_S:,} records/s", rate >= FULL_VERIFY_MIN_PER_S,
        )  # fmt: skip
    if ratios["verify_incremental_seconds"] is not None:
        r = ratios["verify_incremental_seconds"]
        check(
            f"incremental verify of the same new records, {scale}", r, f"{r:.2f}x",
            f"independent of size (<= {INCREMENTAL_GROWTH_MAX}x)", r <= INCREMENTAL_GROWTH_MAX,
        )  # fmt: skip
    return ratios, out


def projection(
    sizes: list[dict[str, Any]], exchange: Exchange, quarter: Quarter, records: int = BILLION
) -> dict[str, Any]:
    """What a quarter of ``records`` would cost, from the figures measured (see the notes)."""
    small, large = sizes[0], sizes[-1]
    days = round((quarter.end_ns - quarter.start_ns) / (86_400 * 10**9))
    expected = {
        n: exchange.expected_rollup_rows(n, days)
        for n in (small["records"], large["records"], records)
    }
    out: dict[str, Any] = {"records": records, "assumptions": []}
    notes = out["assumptions"]
    # Report: from the rollup when the store keeps one, else the raw scan grows with records.
    t_small, t_large = (_figure(s, "report", "seconds") for s in (small, large))
    rows_measured = [s.get("rollup_rows") for s in (small, large)]
    out["rollup_rows_expected"] = {
        f"{n:,}": {k: round(v) for k, v in e.items()} for n, e in expected.items()
    }
    out["rollup_rows_possible"] = exchange.possible_rollup_rows(days)
    if t_small is not None and t_large is not None:
        if all(rows_measured):
            rows = [sum(r.values()) for r in rows_measured if r]
            target_rows = sum(expected[records].values())
            slope = (t_large - t_small) / (rows[1] - rows[0]) if rows[1] != rows[0] else 0.0
            slope = max(slope, 0.0)
            fixed = max(t_large - slope * rows[1], 0.0)
            out["report_seconds"] = fixed + slope * target_rows
            out["rollup_rows"] = round(target_rows)
            notes.append(
                "report time = a + b x rollup rows read, fitted on the two sizes measured "
                f"({rows[0]:,} and {rows[1]:,} rows); the rows at {records:,} records are those "
                "expected if calls keep this exchange's mix and spread evenly over the quarter "
                "(every (day, call group) row and (day, provider) row that gets at least one call, "
                f"Poisson); they cannot exceed {out['rollup_rows_possible']:,} for "
                "this exchange whatever the number of records"
            )
        else:
            per_record = t_large / large["records"]
            out["report_seconds"] = per_record * records
            notes.append(
                "no rollups in the measured store: the report scans every record, so its time "
                "is taken as proportional to records, at the rate of the largest size"
            )
    per_record = _figure(large, "bytes", "per_record")
    if per_record is not None:
        out["disk_bytes_live"] = per_record * records
        notes.append(
            f"live disk = {per_record:.0f} bytes/record (database + WAL at "
            f"{large['records']:,} records, rollups included) x records"
        )
    archived = _figure(large, "archive", "archive_bytes_per_record")
    if archived is not None:
        out["disk_bytes_archived"] = archived * records
        notes.append(f"archived = {archived:.0f} bytes/record (archive files) x records")
    rate = _figure(large, "verify_full", "records_per_s")
    if rate is not None:
        out["verify_full_seconds"] = records / rate
        notes.append(
            f"full verify at the rate measured at {large['records']:,} records "
            f"({rate:,.0f} records/s, same machine)"
        )
    fixed = _figure(large, "verify_nothing_new", "seconds")
    if rate is not None and fixed is not None:
        daily = records / days
        out["verify_daily_seconds"] = fixed + daily / rate
        notes.append(
            f"a daily verify from the last checkpoint: {daily:,.0f} new records at the full "
            f"verify's rate, plus the {fixed:.1f} s of a run with nothing new"
        )
    return out


def table(sizes: list[dict[str, Any]]) -> str:
    def n(value: float | None, form: str = ",.0f", unit: str = "") -> str:
        return "—" if value is None else f"{value:{form}}{unit}"

    def row(label: str, get: Callable[[dict[str, Any]], str]) -> list[str]:
        return [label, *(get(s) for s in sizes)]

    header = ["", *(f"{s['records']:,} records" for s in sizes)]
    body = [
        row("fill, records/s", lambda s: n(_figure(s, "fill", "records_per_s"))),
        row("bytes per record (db + wal)", lambda s: n(_figure(s, "bytes", "per_record"))),
        row("rollup rows", lambda s: n(sum(s["rollup_rows"].values()) if s["rollup_rows"] else None)),
        row("quarterly report, s", lambda s: n(_figure(s, "report", "seconds"), ".2f")),
        row("quarterly report, peak RSS MB", lambda s: n(_figure(s, "report", "max_rss_mb"))),
        row("dashboard request, s (first)", lambda s: n(_figure(s, "dashboard", "first_seconds"), ".2f")),
        row("dashboard request, s (second)", lambda s: n(_figure(s, "dashboard", "second_seconds"), ".2f")),
        row("full verify, records/s", lambda s: n(_figure(s, "verify_full", "records_per_s"))),
        row("full verify, s", lambda s: n(_figure(s, "verify_full", "seconds"), ".2f")),
        row("incremental verify of new records, s", lambda s: n(_figure(s, "verify_incremental", "seconds"), ".2f")),
        row("verify with nothing new, s", lambda s: n(_figure(s, "verify_nothing_new", "seconds"), ".2f")),
        row("archive first half, s", lambda s: n(_figure(s, "archive", "archive_seconds"), ".2f")),
        row("archive bytes per record", lambda s: n(_figure(s, "archive", "archive_bytes_per_record"))),
        row("verify --archives (restore-verify), s", lambda s: n(_figure(s, "archive", "verify_archives_seconds"), ".2f")),
        row("verify-archive (offline), s", lambda s: n(_figure(s, "archive", "verify_archive_offline_seconds"), ".2f")),
    ]  # fmt: skip
    return _table("The ledger at scale", header, body, markdown=False)


def main(args: argparse.Namespace) -> int:
    sizes_wanted = args.sizes
    quarter = Quarter.parse(args.quarter)
    rng = random.Random(args.seed)
    exchange = Exchange.make(rng, args.agencies, args.providers)
    command = f"{shlex.quote(PYTHON)} bench/ledger_scale.py {shlex.join(args.argv)}".rstrip()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        if any(args.keep.iterdir()):
            raise SystemExit(f"--keep {args.keep}: not empty; name a new or empty directory")
        work = args.keep
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="tabadol-ledger-scale-", dir=args.tmp)
        work = Path(cleanup.name)
    try:
        sealer, auditor, ca_pem = prepare(work, exchange)
        bench = Bench(work, exchange, quarter, auditor, ca_pem)
        print(
            f"{len(exchange.agencies)} agencies, {len(exchange.methods)} methods, "
            f"{len(exchange.pairs)} (consumer, method) pairs; quarter {quarter} "
            f"({quarter.period}); ledger in {work}",
            flush=True,
        )
        filler = Filler(bench.ledger, sealer, exchange, quarter, args.seed + 1)
        sizes: list[dict[str, Any]] = []
        try:
            for i, target in enumerate(sizes_wanted):
                sizes.append(measure_size(bench, filler, target, args.new, args.batch, i))
        finally:
            filler.close()
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    ratios, targets = checks(sizes)
    result = {
        "machine": machine(),
        "command": command,
        "quarter": {"name": str(quarter), "period": quarter.period},
        "exchange": {**exchange.describe(), "seed": args.seed},
        "batch_records": args.batch,
        "new_records": args.new,
        "sizes": sizes,
        "ratios": ratios,
        "targets": targets,
        "projection": projection(sizes, exchange, quarter),
        "errors": bench.errors,
        "notes": [
            "every command is timed as a child process, start to exit (Python start and "
            "imports included); peak RSS is that child's, from wait4",
            "incremental verify: `ledger verify --as` from the checkpoint the full verify "
            "signed, after --new records were appended: a day's new calls, all on a day of "
            "their own after the quarter (day 0 after it for the first size, day 1 for the "
            "next...), as a daily verify finds them; verify rechecks the rollups of the days "
            "the new records fall on, so new records spread over old days would cost more",
            "sizes count the quarter's records; bytes per record divide by every record held "
            "(the quarter's and the earlier sizes' new days')",
            "archive: on a copy of the ledger (SQLite backup), so the next size grows the "
            "original. `ledger archive --before` goes by seal time: the fill seals each "
            "batch when it writes it, so --before is the moment between the seal closing "
            "about half the records and the next (the records themselves span the quarter: "
            "each fill spreads its records over the whole quarter)",
        ],
    }
    out = args.out or RESULTS / ("ledger-scale-quick.json" if args.quick else "ledger-scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(sizes))
    for t in targets:
        print(
            f"  {'met ' if t['met'] else 'MISSED'} {t['what']}: {t['shown']} (target {t['target']})"
        )
    p = result["projection"]
    print(
        f"  projection, {BILLION:,} records a quarter: report "
        f"{_n(p.get('report_seconds'), '.1f')} s, live disk {_n(p.get('disk_bytes_live'), '.3g')} B, "
        f"archived {_n(p.get('disk_bytes_archived'), '.3g')} B, full verify "
        f"{_n(p.get('verify_full_seconds'), ',.0f')} s"
    )
    for error in bench.errors:
        print(f"  ERROR {error}")
    print(f"wrote {os.path.relpath(out, ROOT)}")
    return 1 if bench.errors else 0


def _n(value: float | None, form: str) -> str:
    return "—" if value is None else f"{value:{form}}"


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--records", help="ledger sizes to measure, increasing (default 1000000,10000000)"
    )
    parser.add_argument(
        "--new", type=int, help="records appended before incremental verify (default 100000)"
    )
    parser.add_argument("--keep", type=Path, help="fill the ledgers here and keep them")
    parser.add_argument("--quick", action="store_true", help="100000,300000 records, 10000 new")
    parser.add_argument("--batch", type=int, default=10_000, help="records per sealed batch")
    parser.add_argument("--quarter", default="1404-Q2", help="Solar Hijri quarter to fill")
    parser.add_argument("--agencies", type=int, default=150)
    parser.add_argument("--providers", type=int, default=40)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"), help="where the temp dir goes")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/...)")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.records is None:
        args.records = "100000,300000" if args.quick else "1000000,10000000"
    if args.new is None:
        args.new = 10_000 if args.quick else 100_000
    if not 0 < args.providers <= args.agencies:
        parser.error("--providers must be between 1 and --agencies")
    if args.batch <= 0 or args.new <= 0:
        parser.error("--batch and --new must be positive")
    try:
        args.sizes = [int(n) for n in args.records.split(",")]
    except ValueError:
        parser.error(f"--records {args.records}: not numbers separated by commas")
    # Each size's measurements append --new records, and the next size fills on from there.
    if args.sizes[0] <= 0 or any(b <= a + args.new for a, b in itertools.pairwise(args.sizes)):
        parser.error(
            f"--records {args.records}: sizes must be positive, and each more than the one "
            f"before plus --new ({args.new:,})"
        )
    return args


if __name__ == "__main__":
    sys.exit(main(parse(sys.argv[1:])))
