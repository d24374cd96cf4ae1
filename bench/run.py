"""Tabadol's benchmark: the broker with every feature on, against calling the provider
directly, nginx, and a bare Python pass-through, all on loopback over mTLS; and the
broker's HTTP entry (Connect JSON, REST) against its own gRPC path and the pass-through.

    BENCH_SECONDS=5 .venv/bin/python bench/run.py      # or: make bench
    BENCH_SECONDS=2 .venv/bin/python bench/run.py --targets bare,broker --workloads unary_100B
    BENCH_SECONDS=2 .venv/bin/python bench/run.py --targets bare,broker --workloads unary_json

Every measurement lasts BENCH_SECONDS (default 5). Prints a table per workload and the
request path's targets, and writes latest.json and latest.md: to bench/results after a full
run; a partial run (--targets or --workloads) measures only those, skips the ledger writer
and writes to --out DIR, or to a new directory under /tmp, never to bench/results unless
--out says so. Method and reading: docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import ledger_write, targets  # noqa: E402
from bench.loadgen import WORKLOADS, Generators, Measurement, Workload  # noqa: E402
from bench.report import Run  # noqa: E402
from bench.targets import Platform, Target  # noqa: E402
from tests.support.load import BrokerProcess  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PYTHON = os.path.relpath(sys.executable, ROOT)  # as the command to repeat a run shows it
LEDGER_RECORDS_PER_SECOND = 50_000  # about one BENCH_SECOND of the ledger writer's work
TARGETS = ("direct", "nginx", "bare", "broker", "broker-unsampled")  # in table order
# "broker" brings its HTTP entry's rows too (broker-connect, broker-rest): the same process.


def default_seconds() -> float:
    text = os.environ.get("BENCH_SECONDS", "5")
    try:
        seconds = float(text)
    except ValueError:
        raise SystemExit(f"BENCH_SECONDS={text!r} is not a number of seconds") from None
    if seconds <= 0:
        raise SystemExit(f"BENCH_SECONDS={text!r} must be more than 0")
    return seconds


def chosen(text: str | None, known: Sequence[str], what: str) -> list[str]:
    """The names in a comma-separated ``--targets``/``--workloads`` value, in ``known``'s
    order; all of ``known`` when not given."""
    if text is None:
        return list(known)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise SystemExit(
            f"--{what} {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'names none'}; "
            f"choose from {','.join(known)}"
        )
    return [name for name in known if name in names]


def command(args: argparse.Namespace) -> str:
    """The command that repeats this run, as the report shows it."""
    words = [f"BENCH_SECONDS={args.seconds:g}", shlex.quote(PYTHON), "bench/run.py"]
    if args.concurrency != 32:
        words.append(f"--concurrency {args.concurrency}")
    if args.generators != 2:
        words.append(f"--generators {args.generators}")
    if args.targets is not None:
        words.append(f"--targets {','.join(chosen(args.targets, TARGETS, 'targets'))}")
    if args.workloads is not None:
        keys = [w.key for w in WORKLOADS]
        words.append(f"--workloads {','.join(chosen(args.workloads, keys, 'workloads'))}")
    return " ".join(words)


def progress(m: Measurement) -> None:
    latency = f"p50 {m.p50_ms:.2f} ms, p99 {m.p99_ms:.2f} ms" if m.p50_ms is not None else ""
    cpu = f", proxy CPU {m.proxy_cpu_us:,.0f} µs" if m.proxy_cpu_us is not None else ""
    errors = f", {m.errors} ERRORS (e.g. {m.error})" if m.errors else ""
    print(
        f"  {m.workload:<15} {m.target:<17} c={m.concurrency:<3} {m.per_s:>9,.0f}/s  "
        f"{latency}{cpu}{errors}",
        file=sys.stderr,
        flush=True,
    )


async def start_nginx(
    stack: AsyncExitStack, run: Run, platform: Platform, provider: str, install: bool
) -> tuple[Target | None, targets.NginxProcess | None]:
    """nginx in front of the provider, or None (and why, in ``run.skipped``)."""
    nginx, how = await asyncio.to_thread(targets.find_nginx, install)
    if nginx is None:
        run.skipped["nginx"] = how
        print(f"nginx: SKIPPED ({how}); the nginx column stays empty", flush=True)
        return None, None
    try:
        process, target, _ = await targets.start_nginx(platform, provider, nginx)
    except RuntimeError as e:
        run.skipped["nginx"] = f"nginx would not start: {e}"
        print(f"nginx: SKIPPED (it would not start: {e})", flush=True)
        return None, None
    stack.push_async_callback(process.stop)
    return target, process


async def start_targets(
    stack: AsyncExitStack,
    run: Run,
    platform: Platform,
    provider: str,
    otlp: str,
    install: bool,
    names: Sequence[str] = TARGETS,
) -> tuple[list[Target], BrokerProcess | None, targets.NginxProcess | None]:
    """The targets ``names``, each in its own process(es); stopped when ``stack`` closes."""
    started = [targets.direct(platform, provider)] if "direct" in names else []
    nginx_process: targets.NginxProcess | None = None
    if "nginx" in names:
        nginx, nginx_process = await start_nginx(stack, run, platform, provider, install)
        started += [nginx] if nginx is not None else []
    if "bare" in names:
        bare_process, bare = await targets.start_bare(platform, provider)
        stack.push_async_callback(bare_process.stop)
        started.append(bare)
    broker_process: BrokerProcess | None = None
    if "broker" in names:
        broker_process, broker = await targets.start_broker(platform, provider, otlp, gateway=True)
        stack.push_async_callback(broker_process.stop)
        started += [broker, *targets.http_targets(platform, broker_process, broker)]
    if "broker-unsampled" in names:
        unsampled_process, unsampled = await targets.start_broker(
            platform, provider, otlp, name="broker-unsampled", sampler="always_off"
        )
        stack.push_async_callback(unsampled_process.stop)
        started.append(unsampled)
    run.targets = {t.name: t.description for t in started}
    return started, broker_process, nginx_process


async def measure_all(run: Run, all_targets: list[Target], provider_pid: int) -> None:
    """Workload by workload, every target in turn, so slow drift hits all of them alike."""
    warmup = min(0.5, max(0.2, run.seconds / 4))
    generators = Generators(run.generators)
    try:
        for workload in run.workloads:
            for target in all_targets:
                if target.endpoint.protocol != "grpc":  # the HTTP entry: JSON unary only
                    levels = [1, run.concurrency] if workload.kind == "unary_record" else []
                elif target.name == "broker-unsampled":  # only for the tracing comparison
                    levels = [1, run.concurrency] if workload.key == "unary_100B" else []
                else:
                    levels = [1] if workload.one_stream else [1, run.concurrency]
                for concurrency in levels:
                    measurement = await generators.measure(
                        target, workload, concurrency, run.seconds, warmup,
                        lambda: targets.cpu_seconds(provider_pid),
                    )  # fmt: skip
                    run.measurements.append(measurement)
                    progress(measurement)
    finally:
        await generators.close()


def tracing_cost(run: Run) -> dict[str, float]:
    """The broker's CPU per unary call and latency at concurrency 1, sampled vs always_off."""
    key = WORKLOADS[0].key
    on, off = (
        run.get("broker", key, run.concurrency),
        run.get("broker-unsampled", key, run.concurrency),
    )
    on1, off1 = run.get("broker", key, 1), run.get("broker-unsampled", key, 1)
    if not (on and off and on1 and off1 and on.proxy_cpu_us and off.proxy_cpu_us):
        return {}
    return {
        "sampled_cpu_us": on.proxy_cpu_us,
        "unsampled_cpu_us": off.proxy_cpu_us,
        "ratio": on.proxy_cpu_us / off.proxy_cpu_us,
        "sampled_p50_ms_c1": on1.p50_ms or 0.0,
        "sampled_p99_ms_c1": on1.p99_ms or 0.0,
        "unsampled_p50_ms_c1": off1.p50_ms or 0.0,
        "unsampled_p99_ms_c1": off1.p99_ms or 0.0,
    }


def partial(args: argparse.Namespace) -> bool:
    return args.targets is not None or args.workloads is not None


def workloads(args: argparse.Namespace) -> list[Workload]:
    keys = chosen(args.workloads, [w.key for w in WORKLOADS], "workloads")
    return [w for w in WORKLOADS if w.key in keys]


async def main(args: argparse.Namespace) -> Run:
    names = chosen(args.targets, TARGETS, "targets")
    run = Run(
        command=command(args),
        seconds=args.seconds,
        concurrency=args.concurrency,
        generators=args.generators,
        workloads=workloads(args),
        targets={},
    )
    brokers = any(name.startswith("broker") for name in names)
    with tempfile.TemporaryDirectory(prefix="tabadol-bench-") as tmp_name:
        tmp = Path(tmp_name)
        platform = Platform.create(tmp)
        async with AsyncExitStack() as stack:
            provider, provider_address = await targets.start_provider(platform)
            stack.push_async_callback(provider.stop)
            otlp = ""
            if brokers:
                collector, otlp = await targets.start_collector(platform)
                stack.push_async_callback(collector.stop)
            all_targets, broker, nginx = await start_targets(
                stack, run, platform, provider_address, otlp, not args.no_install, names
            )
            print(
                f"measuring {len(all_targets)} targets, {args.seconds:g} s each "
                f"(provider {provider_address}, trace collector {otlp})",
                file=sys.stderr,
                flush=True,
            )
            await measure_all(run, all_targets, provider.proc.pid)
            if broker is not None:
                run.broker_counters = await targets.broker_counters(broker)
                run.broker_counters["spans_stored"] = stored = targets.spans_stored(platform)
                if not stored:
                    run.notes.append(
                        "the collector stored no spans: it refused the broker's exports"
                    )
            if nginx is not None and (said := nginx.log().strip()):
                run.notes.append(f"nginx logged (warn and above):\n{said}")
        run.tracing = tracing_cost(run)
    if partial(args):
        run.notes.append(
            f"A partial run: {', '.join(run.targets) or 'no target'} over "
            f"{', '.join(w.key for w in run.workloads)}; the ledger writer was not measured."
        )
    else:
        records = max(10_000, int(LEDGER_RECORDS_PER_SECOND * args.seconds))
        run.ledger = ledger_write.measure(records, batch_ms=100)
    return run


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="per measurement (default: $BENCH_SECONDS or 5)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight under load")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--no-install", action="store_true", help="skip nginx if it is missing (no apt-get)"
    )
    parser.add_argument(
        "--targets",
        metavar="NAMES",
        help=f"measure only these, comma-separated, from {','.join(TARGETS)} (a partial run)",
    )
    parser.add_argument(
        "--workloads",
        metavar="KEYS",
        help=f"measure only these, comma-separated, from {','.join(w.key for w in WORKLOADS)} "
        "(a partial run)",
    )
    parser.add_argument(
        "--out",
        "--results",
        dest="out",
        metavar="DIR",
        type=Path,
        default=None,
        help=f"where latest.json and latest.md go (default: {os.path.relpath(RESULTS, ROOT)} "
        "after a full run, a new directory under /tmp after a partial one)",
    )
    return parser


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked before anything starts; ``out`` is where the results go."""
    args = argument_parser().parse_args(argv)
    if args.seconds is None:
        args.seconds = default_seconds()
    for option, value in (
        ("--seconds", args.seconds),
        ("--concurrency", args.concurrency),
        ("--generators", args.generators),
    ):
        if value <= 0:
            raise SystemExit(f"{option} {value:g} must be more than 0")
    chosen(args.targets, TARGETS, "targets")  # a misspelt name fails here, not after minutes
    workloads(args)
    if args.out is None:
        # A partial run must not replace the committed results of a full one.
        args.out = (
            Path(tempfile.mkdtemp(prefix="tabadol-bench-partial-")) if partial(args) else RESULTS
        )
    return args


if __name__ == "__main__":
    chosen_arguments = arguments()
    result = asyncio.run(main(chosen_arguments))
    print()
    print(result.text())
    result.write(chosen_arguments.out)
    print(f"wrote {chosen_arguments.out / 'latest.json'} and {chosen_arguments.out / 'latest.md'}")
