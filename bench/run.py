"""Tabadol's benchmark: the broker with every feature on, against calling the provider
directly, nginx, and a bare Python pass-through, all on loopback over mTLS.

    BENCH_SECONDS=5 .venv/bin/python bench/run.py      # or: make bench

Every measurement lasts BENCH_SECONDS (default 5). Prints a table per workload and writes
bench/results/latest.json and latest.md. Method and reading: docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import ledger_write, targets  # noqa: E402
from bench.loadgen import WORKLOADS, Generators, Measurement  # noqa: E402
from bench.report import Run  # noqa: E402
from bench.targets import Platform, Target  # noqa: E402
from tests.support.load import BrokerProcess  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PYTHON = os.path.relpath(sys.executable, ROOT)  # as the command to repeat a run shows it
LEDGER_RECORDS_PER_SECOND = 50_000  # about one BENCH_SECOND of the ledger writer's work


def default_seconds() -> float:
    text = os.environ.get("BENCH_SECONDS", "5")
    try:
        seconds = float(text)
    except ValueError:
        raise SystemExit(f"BENCH_SECONDS={text!r} is not a number of seconds") from None
    if seconds <= 0:
        raise SystemExit(f"BENCH_SECONDS={text!r} must be more than 0")
    return seconds


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


async def start_targets(
    stack: AsyncExitStack, run: Run, platform: Platform, provider: str, otlp: str, install: bool
) -> tuple[list[Target], BrokerProcess, targets.NginxProcess | None]:
    """Every target, each in its own process(es); stopped when ``stack`` closes."""
    started = [targets.direct(platform, provider)]
    nginx_process: targets.NginxProcess | None = None
    nginx, how = await asyncio.to_thread(targets.find_nginx, install)
    if nginx is None:
        run.skipped["nginx"] = how
        print(f"nginx: SKIPPED ({how}); the nginx column stays empty", flush=True)
    else:
        try:
            nginx_process, target, _ = await targets.start_nginx(platform, provider, nginx)
        except RuntimeError as e:
            run.skipped["nginx"] = f"nginx would not start: {e}"
            print(f"nginx: SKIPPED (it would not start: {e})", flush=True)
        else:
            stack.push_async_callback(nginx_process.stop)
            started.append(target)
    bare_process, bare = await targets.start_bare(platform, provider)
    stack.push_async_callback(bare_process.stop)
    broker_process, broker = await targets.start_broker(platform, provider, otlp)
    stack.push_async_callback(broker_process.stop)
    unsampled_process, unsampled = await targets.start_broker(
        platform, provider, otlp, name="broker-unsampled", sampler="always_off"
    )
    stack.push_async_callback(unsampled_process.stop)
    started += [bare, broker, unsampled]
    run.targets = {t.name: t.description for t in started}
    return started, broker_process, nginx_process


async def measure_all(run: Run, all_targets: list[Target], provider_pid: int) -> None:
    """Workload by workload, every target in turn, so slow drift hits all of them alike."""
    warmup = min(0.5, max(0.2, run.seconds / 4))
    generators = Generators(run.generators)
    try:
        for workload in run.workloads:
            for target in all_targets:
                if target.name == "broker-unsampled":  # only for the tracing comparison
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


async def main(args: argparse.Namespace) -> Run:
    run = Run(
        command=f"BENCH_SECONDS={args.seconds:g} {shlex.quote(PYTHON)} bench/run.py",
        seconds=args.seconds,
        concurrency=args.concurrency,
        generators=args.generators,
        workloads=WORKLOADS,
        targets={},
    )
    with tempfile.TemporaryDirectory(prefix="tabadol-bench-") as tmp_name:
        tmp = Path(tmp_name)
        platform = Platform.create(tmp)
        async with AsyncExitStack() as stack:
            provider, provider_address = await targets.start_provider(platform)
            stack.push_async_callback(provider.stop)
            collector, otlp = await targets.start_collector(platform)
            stack.push_async_callback(collector.stop)
            all_targets, broker, nginx = await start_targets(
                stack, run, platform, provider_address, otlp, not args.no_install
            )
            print(
                f"measuring {len(all_targets)} targets, {args.seconds:g} s each "
                f"(provider {provider_address}, trace collector {otlp})",
                file=sys.stderr,
                flush=True,
            )
            await measure_all(run, all_targets, provider.proc.pid)
            run.broker_counters = await targets.broker_counters(broker)
            run.broker_counters["spans_stored"] = stored = targets.spans_stored(platform)
            if not stored:
                run.notes.append("the collector stored no spans: it refused the broker's exports")
            if nginx is not None and (said := nginx.log().strip()):
                run.notes.append(f"nginx logged (warn and above):\n{said}")
        run.tracing = tracing_cost(run)
    records = max(10_000, int(LEDGER_RECORDS_PER_SECOND * args.seconds))
    run.ledger = ledger_write.measure(records, batch_ms=100)
    return run


if __name__ == "__main__":
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
    parser.add_argument("--results", type=Path, default=RESULTS, help="where latest.* go")
    arguments = parser.parse_args()
    if arguments.seconds is None:
        arguments.seconds = default_seconds()
    result = asyncio.run(main(arguments))
    print()
    print(result.text())
    result.write(arguments.results)
    print(f"wrote {arguments.results / 'latest.json'} and {arguments.results / 'latest.md'}")
