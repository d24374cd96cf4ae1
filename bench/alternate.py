"""The broker's CPU against the bare pass-through's, measured in turns.

    BENCH_SECONDS=5 .venv/bin/python bench/alternate.py [--rounds 8] [--workload unary_100B]

``make bench`` measures each target once, one after the other, and on a shared machine the
load drifts between the two: the broker/bare ratio of one run moves by more than the
targets' margins. Here both run side by side and are measured alternately, bare then broker,
then broker then bare, round after round (32 in flight); each round's ratio comes from two
measurements seconds apart: CPU per call, or per message on a streaming workload. Prints
every round and the median with its range.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import targets  # noqa: E402
from bench.loadgen import WORKLOADS, Generators  # noqa: E402
from bench.report import cpu_per_message  # noqa: E402
from bench.run import default_seconds  # noqa: E402


async def main(rounds: int, seconds: float, concurrency: int, key: str) -> list[float]:
    workload = next(w for w in WORKLOADS if w.key == key)
    with tempfile.TemporaryDirectory(prefix="tabadol-alternate-") as tmp_name:
        platform = targets.Platform.create(Path(tmp_name))
        async with AsyncExitStack() as stack:
            provider, address = await targets.start_provider(platform)
            stack.push_async_callback(provider.stop)
            collector, otlp = await targets.start_collector(platform)
            stack.push_async_callback(collector.stop)
            bare_process, bare = await targets.start_bare(platform, address)
            stack.push_async_callback(bare_process.stop)
            broker_process, broker = await targets.start_broker(platform, address, otlp)
            stack.push_async_callback(broker_process.stop)
            generators = Generators(2)
            stack.push_async_callback(generators.close)
            unit = "message" if workload.kind == "server_stream" else workload.unit
            ratios = []
            for turn in range(rounds):
                cpu = {}
                for target in (bare, broker) if turn % 2 == 0 else (broker, bare):
                    measured = await generators.measure(
                        target, workload, concurrency, seconds, min(0.5, max(0.2, seconds / 4)),
                        lambda: targets.cpu_seconds(provider.proc.pid),
                    )  # fmt: skip
                    per_unit = (
                        cpu_per_message(measured)
                        if workload.kind == "server_stream"
                        else measured.proxy_cpu_us
                    )
                    if measured.errors or not per_unit:
                        raise SystemExit(f"{target.name}: {measured.errors} failed calls")
                    cpu[target.name] = per_unit
                ratios.append(cpu["broker"] / cpu["bare"])
                print(
                    f"round {turn + 1}: bare {cpu['bare']:,.1f} µs, broker {cpu['broker']:,.1f} "
                    f"µs per {unit}: {ratios[-1]:.2f}x",
                    flush=True,
                )
    print(
        f"broker / bare, CPU per {unit} ({workload.title}, {concurrency} in flight): median "
        f"{statistics.median(ratios):.2f}x, range {min(ratios):.2f} to {max(ratios):.2f}x "
        f"over {rounds} rounds of {seconds:g} s"
    )
    return ratios


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--workload", default="unary_100B", choices=[w.key for w in WORKLOADS if not w.one_stream]
    )
    args = parser.parse_args()
    if args.rounds <= 0 or args.concurrency <= 0:
        raise SystemExit("--rounds and --concurrency must be more than 0")
    asyncio.run(main(args.rounds, default_seconds(), args.concurrency, args.workload))
