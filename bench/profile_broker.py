"""Where the broker's CPU per call goes, under the unary 100 B load of bench/run.py.

    .venv/bin/pip install py-spy      # not a project dependency
    BENCH_SECONDS=10 .venv/bin/python bench/profile_broker.py [--target bare]
    BENCH_SECONDS=10 .venv/bin/python bench/profile_broker.py --target broker-connect

Printed and written to bench/results/broker-profile.md (or bare-profile.md: the bare
pass-through, profiled the same way for comparison; broker-connect-profile.md and
broker-rest-profile.md: the broker's HTTP entry under the person record's JSON load of
``unary_json``): the CPU per call by area.
Each thread's CPU comes from /proc/<pid>/task/*/stat (gRPC's C-core threads included, which
py-spy cannot see); the span exporter, ledger writer and gRPC poller threads do one thing
each, and the event loop thread's CPU is divided as py-spy's samples of it are (tracing,
ledger, metrics, gRPC, the request path, asyncio), followed by its top functions. py-spy runs
--nonblocking, so the broker is never paused. Time in gRPC's Cython code has no Python
frame: it lands on the Python frame that called it (often asyncio's Handle._run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import targets  # noqa: E402
from bench.loadgen import WORKLOADS, Generators  # noqa: E402
from bench.report import JSON_WORKLOAD  # noqa: E402
from bench.run import RESULTS, default_seconds  # noqa: E402

RATE = 200  # samples per second
WARMUP_S = 1.0
MAIN = "MainThread"
# Where an event-loop sample's time goes: the first area any frame of its stack is in
# (py-spy names frames "function (dir/file.py:line)"). Features first, so that gRPC work done
# for a feature counts for the feature, and gRPC work done to forward counts as gRPC.
AREAS = [
    ("tracing: spans on the request path", r"broker/tracing\.py|trace/__init__\.py|attributes/|propagat|sampling\.py|opentelemetry"),
    ("ledger: building and handing over the record", r"\(ledger/|ledger_record"),
    ("metrics: counters and histograms", r"prometheus_client|broker/metrics\.py"),
    ("gRPC: grpc.aio Python and the Cython it calls", r"grpc/|aio/_|cygrpc"),
    ("gateway: JSON to and from messages (json_format, http_rules)", r"json_format|http_rules\.py|\(json/"),
    ("request path: identity, policy, route, forward, accounting", r"\(broker/|\(tabadol/|^(?!<module> |main \().*\(bare_proxy\.py"),
]  # fmt: skip
# The layers around them: the innermost frame in one of them decides (the gateway's
# application runs inside Hypercorn's task, and calls Hypercorn to send its answer).
LAYERS = [
    ("gateway: the ASGI application (routing, headers, body)", r"\(gateway/"),
    ("gateway: HTTP server (Hypercorn, h2, hpack, hyperframe, h11)", r"hypercorn/|\(h2/|\(hpack/|\(hyperframe/|\(h11/"),
    ("gateway: TLS (asyncio's SSL protocol)", r"sslproto\.py|\(ssl\.py"),
    ("event loop: asyncio, and gRPC's Cython coroutines it runs", r"asyncio/|selectors\.py"),
]  # fmt: skip
# The other threads do one thing each.
THREADS = [
    ("tracing: span export thread (OTLP encoding and sending)", r"OtelBatchSpan"),
    ("ledger: writer thread (hash chain, seal, SQLite commit)", r"tabadol-ledger"),
    ("metrics: /metrics HTTPS server threads", r"tabadol-metrics|process_request_thread"),
    ("gRPC: grpc.aio completion-queue poller thread", r"_poll_wrapper"),
]


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """Thread id -> (kernel thread name, user + system clock ticks so far)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[int(task.name)] = (
            (task / "comm").read_text().strip(),
            int(fields[11]) + int(fields[12]),
        )
    return out


def parse(raw: str) -> tuple[dict[int, str], dict[str, Counter[tuple[str, ...]]]]:
    """py-spy's raw output with --threads: ``thread (TID): NAME;frame;frame count`` per
    line, root first. Returns the thread names by id, and by name their stacks' samples."""
    names: dict[int, str] = {}
    threads: dict[str, Counter[tuple[str, ...]]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        match = re.fullmatch(r"thread \((\d+)\): (.*)", thread)
        if not (match and count.isdigit()):
            continue
        names[int(match[1])] = match[2]
        threads.setdefault(match[2], Counter())[tuple(frames)] += int(count)
    return names, threads


def area_of(stack: tuple[str, ...]) -> str:
    for name, pattern in AREAS:
        if any(re.search(pattern, frame) for frame in stack):
            return name
    for frame in reversed(stack):
        for name, pattern in LAYERS:
            if re.search(pattern, frame):
                return name
    return "other"


def short(frame: str) -> str:
    """``function (dir/file.py:123)`` -> ``function (dir/file.py)``: lines vary per site."""
    return re.sub(r":\d+\)$", ")", frame)


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|--:|", *(f"| {k} | {v} |" for k, v in rows), ""]


def where_it_goes(
    before: dict[int, tuple[str, int]],
    after: dict[int, tuple[str, int]],
    names: dict[int, str],
    main_stacks: Counter[tuple[str, ...]],
    cpu_us_per_call: float,
    process_comm: str,
) -> list[str]:
    """The proxy's CPU per call by area: the other threads from /proc, the event loop's
    thread divided as py-spy's samples of it are."""
    ticks: Counter[str] = Counter()
    for tid, (comm, now) in after.items():
        used = now - before.get(tid, (comm, 0))[1]
        name = names.get(tid, comm)
        if name == MAIN:
            ticks[MAIN] += used
            continue
        area = next((a for a, pattern in THREADS if re.search(pattern, name)), None)
        if area is None:
            # Python's threads keep the process's name; gRPC's C core names its own.
            python_thread = comm == process_comm
            area = "other" if python_thread else "gRPC: C-core threads (TLS, HTTP/2, I/O)"
        ticks[area] += used
    total = sum(ticks.values()) or 1
    us: dict[str, float] = {}
    main_us = cpu_us_per_call * ticks.pop(MAIN) / total
    samples = sum(main_stacks.values()) or 1
    for stack, count in main_stacks.items():
        key = f"{area_of(stack)} (event loop thread)"
        us[key] = us.get(key, 0.0) + main_us * count / samples
    for area, n in ticks.items():
        us[area] = us.get(area, 0.0) + cpu_us_per_call * n / total
    rows = [
        (k, f"{v:,.0f} µs ({v / cpu_us_per_call:.0%})")
        for k, v in sorted(us.items(), key=lambda kv: -kv[1])
        if v >= 0.5
    ]
    return _table(("where (thread)", "CPU per call"), rows)


def top_functions(stacks: Counter[tuple[str, ...]], top: int) -> list[str]:
    total = sum(stacks.values()) or 1
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for stack, count in stacks.items():
        for frame in {short(f) for f in stack}:
            inclusive[frame] += count
        own[short(stack[-1]) if stack else "(no Python frame)"] += count

    def share(counts: Counter[str]) -> list[tuple[str, str]]:
        return [(f"`{k}`", f"{v / total:.1%}") for k, v in counts.most_common(top)]

    return [
        *_table(("event loop thread: function, inclusive", "samples"), share(inclusive)),
        *_table(
            ("event loop thread: function, self (where the sample landed)", "samples"), share(own)
        ),
    ]


async def main(args: argparse.Namespace) -> str:
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if py_spy is None:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    http = args.target in ("broker-connect", "broker-rest")
    key = args.workload or (JSON_WORKLOAD if http else WORKLOADS[0].key)
    if http and key != JSON_WORKLOAD:
        raise SystemExit(f"--target {args.target} is measured on {JSON_WORKLOAD} only, not {key}")
    workload = next(w for w in WORKLOADS if w.key == key)
    with tempfile.TemporaryDirectory(prefix="tabadol-profile-") as tmp_name:
        tmp = Path(tmp_name)
        platform = targets.Platform.create(tmp)
        async with AsyncExitStack() as stack:
            provider, provider_address = await targets.start_provider(platform)
            stack.push_async_callback(provider.stop)
            collector, otlp = await targets.start_collector(platform)
            stack.push_async_callback(collector.stop)
            if args.target == "bare":  # the floor, profiled the same way, for comparison
                bare, target = await targets.start_bare(platform, provider_address)
                stack.push_async_callback(bare.stop)
            else:
                broker, target = await targets.start_broker(
                    platform, provider_address, otlp, gateway=http
                )
                stack.push_async_callback(broker.stop)
                if http:  # the same process, called over its HTTP entry
                    entries = targets.http_targets(platform, broker, target)
                    target = next(t for t in entries if t.name == args.target)
            pid = target.pids[0]
            generators = Generators(2)
            stack.push_async_callback(generators.close)
            raw = tmp / "profile.txt"
            before = thread_ticks(pid)
            spy = await asyncio.create_subprocess_exec(
                py_spy, "record", "--pid", str(pid), "--format", "raw",
                "--output", str(raw), "--rate", str(RATE), "--threads", "--nonblocking",
                "--duration", str(round(args.seconds + WARMUP_S)),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            measurement = await generators.measure(
                target, workload, args.concurrency, args.seconds, WARMUP_S,
                lambda: targets.cpu_seconds(provider.proc.pid),
            )  # fmt: skip
            after = thread_ticks(pid)
            _, err = await spy.communicate()
            if spy.returncode != 0 or not raw.exists():
                raise SystemExit(f"py-spy failed ({spy.returncode}): {err.decode().strip()}")
            names, threads = parse(raw.read_text())
    cpu = measurement.proxy_cpu_us or 0.0
    main_stacks = threads.get(MAIN, Counter())
    return "\n".join(
        [
            f"{target.name}: {target.description}; {workload.title}, concurrency "
            f"{args.concurrency}: {measurement.per_s:,.0f} calls/s, {cpu:,.0f} µs of its CPU "
            f"per call. Threads' "
            f"CPU from /proc; the event loop thread's divided by py-spy's {RATE} Hz samples "
            f"of it ({sum(main_stacks.values()):,} samples over {args.seconds + WARMUP_S:g} s).",
            "",
            *where_it_goes(before, after, names, main_stacks, cpu, after[pid][0]),
            *top_functions(main_stacks, args.top),
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=None, help="default: $BENCH_SECONDS")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--top", type=int, default=20, help="functions listed")
    parser.add_argument(
        "--target", choices=["broker", "bare", "broker-connect", "broker-rest"], default="broker"
    )
    parser.add_argument(
        "--workload",
        choices=[w.key for w in WORKLOADS if not w.one_stream],
        help=f"default: unary_100B, or {JSON_WORKLOAD} for the HTTP entry",
    )
    parser.add_argument("--out", type=Path, help="default: bench/results/TARGET-profile.md")
    arguments = parser.parse_args()
    if arguments.seconds is None:
        arguments.seconds = default_seconds()
    text = asyncio.run(main(arguments))
    print(text)
    out = arguments.out or RESULTS / f"{arguments.target}-profile.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Where the CPU goes: {arguments.target}\n\n{text}\n")
    print(f"wrote {out}")
