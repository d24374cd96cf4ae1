"""The broker's CPU against the bare pass-through's, measured in turns.

    BENCH_SECONDS=5 .venv/bin/python bench/alternate.py [--rounds 8] [--workload unary_100B]
    BENCH_SECONDS=5 .venv/bin/python bench/alternate.py --path json [--rounds 8]

``make bench`` measures each target once, one after the other, and on a shared machine the
load drifts between the two: the broker/bare ratio of one run moves by more than the
targets' margins. Here both run side by side and are measured alternately, bare then broker,
then broker then bare, round after round (32 in flight); each round's ratio comes from two
measurements seconds apart: CPU per call, or per message on a streaming workload. Prints
every round and the median with its range.

``--path json`` (or ``rest``) measures the broker's HTTP entry on the person record
(``unary_json``) in turn with its gRPC path and the bare pass-through, the order rotating
each round, and gives JSON/gRPC (the same broker process), JSON/bare and gRPC/bare.
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
from bench.loadgen import WORKLOADS, Generators, Workload  # noqa: E402
from bench.report import JSON_WORKLOAD, cpu_per_message  # noqa: E402
from bench.run import default_seconds  # noqa: E402

PATHS = {"grpc": "broker", "json": "broker-connect", "rest": "broker-rest"}


def orders(names: list[str], turn: int) -> list[str]:
    """Round ``turn``'s order: each target leads in turn, forwards then backwards."""
    rotated = names[turn % len(names) :] + names[: turn % len(names)]
    return rotated if (turn // len(names)) % 2 == 0 else rotated[::-1]


def summary(name: str, ratios: list[float], what: str) -> str:
    return (
        f"{name}, {what}: median {statistics.median(ratios):.2f}x, "
        f"range {min(ratios):.2f} to {max(ratios):.2f}x"
    )


async def main(rounds: int, seconds: float, concurrency: int, key: str, path: str) -> list[float]:
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
            broker_process, broker = await targets.start_broker(
                platform, address, otlp, gateway=path != "grpc"
            )
            stack.push_async_callback(broker_process.stop)
            measured = [bare, broker]
            if path != "grpc":
                http = {t.name: t for t in targets.http_targets(platform, broker_process, broker)}
                measured.append(http[PATHS[path]])
            generators = Generators(2)
            stack.push_async_callback(generators.close)
            if path == "grpc":
                return await pairs(generators, provider.proc.pid, bare, broker, workload,
                                   rounds, seconds, concurrency)  # fmt: skip
            return await turns(generators, provider.proc.pid, measured, workload, rounds,
                               seconds, concurrency)  # fmt: skip


async def measure(
    generators: Generators,
    provider_pid: int,
    target: targets.Target,
    workload: Workload,
    seconds: float,
    concurrency: int,
) -> float:
    """``target``'s CPU per call (per message on a server stream); SystemExit on failures."""
    measured = await generators.measure(
        target, workload, concurrency, seconds, min(0.5, max(0.2, seconds / 4)),
        lambda: targets.cpu_seconds(provider_pid),
    )  # fmt: skip
    per_unit = (
        cpu_per_message(measured) if workload.kind == "server_stream" else measured.proxy_cpu_us
    )
    if measured.errors or not per_unit:
        raise SystemExit(f"{target.name}: {measured.errors} failed calls ({measured.error})")
    return per_unit


async def pairs(
    generators: Generators,
    provider_pid: int,
    bare: targets.Target,
    broker: targets.Target,
    workload: Workload,
    rounds: int,
    seconds: float,
    concurrency: int,
) -> list[float]:
    unit = "message" if workload.kind == "server_stream" else workload.unit
    ratios = []
    for turn in range(rounds):
        cpu = {}
        for target in (bare, broker) if turn % 2 == 0 else (broker, bare):
            cpu[target.name] = await measure(
                generators, provider_pid, target, workload, seconds, concurrency
            )
        ratios.append(cpu["broker"] / cpu["bare"])
        print(
            f"round {turn + 1}: bare {cpu['bare']:,.1f} µs, broker {cpu['broker']:,.1f} "
            f"µs per {unit}: {ratios[-1]:.2f}x",
            flush=True,
        )
    what = f"CPU per {unit} ({workload.title}, {concurrency} in flight)"
    print(f"{summary('broker / bare', ratios, what)} over {rounds} rounds of {seconds:g} s")
    return ratios


async def turns(
    generators: Generators,
    provider_pid: int,
    measured: list[targets.Target],
    workload: Workload,
    rounds: int,
    seconds: float,
    concurrency: int,
) -> list[float]:
    """bare, the broker over gRPC and over its HTTP entry, each round in a rotated order;
    returns the HTTP entry's CPU per call over the gRPC path's, round by round."""
    bare, grpc, http = (t.name for t in measured)
    ratios: dict[str, list[float]] = {f"{http} / {grpc}": [], f"{http} / bare": [],
                                      f"{grpc} / bare": []}  # fmt: skip
    by_name = {t.name: t for t in measured}
    for turn in range(rounds):
        cpu = {}
        for name in orders(list(by_name), turn):
            cpu[name] = await measure(
                generators, provider_pid, by_name[name], workload, seconds, concurrency
            )
        ratios[f"{http} / {grpc}"].append(cpu[http] / cpu[grpc])
        ratios[f"{http} / bare"].append(cpu[http] / cpu[bare])
        ratios[f"{grpc} / bare"].append(cpu[grpc] / cpu[bare])
        print(
            f"round {turn + 1} ({', '.join(orders(list(by_name), turn))}): "
            + ", ".join(f"{name} {cpu[name]:,.0f} µs" for name in by_name)
            + " per call: "
            + ", ".join(f"{k} {v[-1]:.2f}x" for k, v in ratios.items()),
            flush=True,
        )
    what = f"CPU per call ({workload.title}, {concurrency} in flight)"
    for name, values in ratios.items():
        print(f"{summary(name, values, what)} over {rounds} rounds of {seconds:g} s")
    return ratios[f"{http} / {grpc}"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--workload",
        default=None,
        choices=[w.key for w in WORKLOADS if not w.one_stream],
        help=f"default: unary_100B, or {JSON_WORKLOAD} with --path json or rest",
    )
    parser.add_argument(
        "--path",
        default="grpc",
        choices=list(PATHS),
        help="grpc: broker vs bare; json (Connect JSON) or rest: the broker's HTTP entry vs "
        "its gRPC path and bare",
    )
    args = parser.parse_args()
    if args.rounds <= 0 or args.concurrency <= 0:
        raise SystemExit("--rounds and --concurrency must be more than 0")
    key = args.workload or (JSON_WORKLOAD if args.path != "grpc" else "unary_100B")
    if args.path != "grpc" and key != JSON_WORKLOAD:
        raise SystemExit(f"--path {args.path} measures the {JSON_WORKLOAD} workload, not {key}")
    asyncio.run(main(args.rounds, default_seconds(), args.concurrency, key, args.path))
