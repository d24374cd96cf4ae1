"""The broker's CPU per call with tracing off, exporting to a live collector, recording
spans but exporting none, with the collector down, and with every call sampled out. CPU time is read from the OS for the broker process alone.

    .venv/bin/python bench/tracing_cost.py [--calls 3000] [--concurrency 16]

The broker runs as `tabadol broker` in its own process; the provider and the load are
other processes, so their work is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tabadol.client import connect  # noqa: E402
from tabadol.pki import CertificateAuthority  # noqa: E402
from tests.conftest import DEFAULT_GRANTS, broker_toml  # noqa: E402
from tests.support.echo import UNARY, write_echo_contracts  # noqa: E402
from tests.support.processes import TABADOL, Process  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def run_case(
    name: str, tracing: str, tmp: Path, pki: CertificateAuthority, contracts: Path,
    provider: str, calls: int, concurrency: int,
) -> float:  # fmt: skip
    config = tmp / f"{name}.toml"
    config.write_text(
        broker_toml(
            pki_dir=pki.dir, contracts=contracts, endpoints=[provider],
            grants=DEFAULT_GRANTS, tracing=tracing,
        )
    )  # fmt: skip
    broker = await Process.start(str(TABADOL), "broker", "--config", str(config))
    try:
        port = (await broker.wait_for(r"broker listening on 127\.0\.0\.1:(\d+)"))[1]
        async with connect(f"127.0.0.1:{port}", pki.dir / "agencies" / "post") as channel:
            stub = channel.unary_unary(UNARY)
            await asyncio.gather(*(stub(b"warm", timeout=10) for _ in range(200)))
            before = cpu_seconds(broker.proc.pid)
            queue = iter(range(calls))

            async def worker() -> None:
                for _ in queue:
                    await stub(b"x" * 64, timeout=10)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            used = cpu_seconds(broker.proc.pid) - before
        return used / calls
    finally:
        await broker.stop()


async def main(args: argparse.Namespace) -> None:
    from tabadol.ops.server import OpsServer
    from tabadol.ops.trust import OpsTrust

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pki = CertificateAuthority.init(tmp / "pki", "tabadol.example")
        pki.issue_broker()
        pki.issue_ops()
        for agency in ("echo", "post"):
            pki.issue_agency(agency)
        contracts = write_echo_contracts(tmp / "echo.pb")
        provider = await Process.start(
            sys.executable, "-m", "tests.support.echo_process", str(pki.dir / "agencies" / "echo"),
            read="stdout",
        )  # fmt: skip
        # The broker exports over mTLS with its own certificate, as in production.
        trust = OpsTrust.load(pki.dir, pki.trust_domain)
        ops = OpsServer(tmp / "traces.db", trust=trust, http="127.0.0.1:0", otlp="127.0.0.1:0")
        await ops.start()
        try:
            port = int((await provider.wait_for(r"listening on (\d+)"))[1])
            endpoint = f"127.0.0.1:{port}"
            cases = [
                ("tracing off", "enabled = false"),
                ("collector up", f'otlp_endpoint = "https://{ops.otlp_address}"'),
                ("not exported", 'exporter = "none"'),
                ("collector down", 'otlp_endpoint = "https://127.0.0.1:1"'),
                (
                    "sampled out",
                    f'otlp_endpoint = "https://{ops.otlp_address}"\nsampler = "always_off"',
                ),
            ]
            results = {}
            for name, tracing in cases:
                results[name] = await run_case(
                    name.replace(" ", "-"), tracing, tmp, pki, contracts, endpoint,
                    args.calls, args.concurrency,
                )  # fmt: skip
            # A refused export would make "collector up" look cheap: say what arrived.
            stored = ops.collector.received
        finally:
            await ops.stop()
            await provider.stop()
    base = results["tracing off"]
    print(f"broker CPU per unary call ({args.calls} calls, concurrency {args.concurrency}):")
    for name, value in results.items():
        print(f"  {name:<15} {value * 1e6:8.1f} µs   x{value / base:.2f} of tracing off")
    print(f"the collector stored {stored} spans over mTLS")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    asyncio.run(main(parser.parse_args()))
