"""How many spans per second the trace viewer ingests over OTLP/gRPC into SQLite.

    .venv/bin/python bench/ingest.py [--spans 100000] [--batch 512] [--senders 2]

Senders are separate processes using the OpenTelemetry SDK's own OTLP exporter with
broker-like spans (a server and a client span per call, the broker's attributes), over mTLS
with the broker's certificate as the broker does, so the figure is what a broker at full load
would ask of the viewer.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

from tabadol.spiffe import ops_dns_name

TRUST_DOMAIN = "tabadol.example"


def send(
    endpoint: str, pki: Path, spans: int, batch: int, ready: Any, go: Any, elapsed: Any
) -> None:
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.trace import SpanKind

    provider = TracerProvider(resource=Resource.create({"service.name": "tabadol-broker"}))
    tracer = provider.get_tracer("bench")
    exporter = OTLPSpanExporter(
        endpoint=f"https://{endpoint}",
        credentials=grpc.ssl_channel_credentials(
            *((pki / name).read_bytes() for name in ("ca.crt", "broker.key", "broker.crt"))
        ),
        channel_options=(("grpc.ssl_target_name_override", ops_dns_name(TRUST_DOMAIN)),),
    )
    finished = []
    for i in range(spans // 2):
        server = tracer.start_span(
            "tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson",
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "tabadol.agencies.nocr.v1.PersonRegistry",
                "rpc.method": "InquirePerson",
                "rpc.grpc.status_code": 0,
                "tabadol.consumer": "post",
                "tabadol.provider": "nocr",
                "tabadol.request_id": f"{i:032x}",
                "tabadol.request.bytes": 40,
                "tabadol.response.bytes": 180,
            },
        )
        from opentelemetry import trace

        client = tracer.start_span(
            "tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson",
            kind=SpanKind.CLIENT,
            context=trace.set_span_in_context(server),
            attributes={"rpc.system": "grpc", "tabadol.endpoint": "127.0.0.1:9101"},
        )
        client.end()
        server.end()
        finished += [client, server]
    # Spans are made before the clock starts: the figure is the viewer's, not the SDK's.
    ready.release()
    go.wait()
    started = time.perf_counter()
    for i in range(0, len(finished), batch):
        assert exporter.export(finished[i : i + batch]) is SpanExportResult.SUCCESS
    elapsed.value = time.perf_counter() - started
    exporter.shutdown()


async def main(args: argparse.Namespace) -> None:
    from tabadol.ops.server import OpsServer
    from tabadol.ops.trust import OpsTrust
    from tabadol.pki import CertificateAuthority

    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.init(Path(tmp) / "pki", TRUST_DOMAIN)
        ca.issue_broker()  # what the senders present, as the broker does
        ca.issue_ops()
        trust = OpsTrust.load(ca.dir, TRUST_DOMAIN)
        ops = OpsServer(
            Path(tmp) / "traces.db", trust=trust, http="127.0.0.1:0", otlp="127.0.0.1:0"
        )
        await ops.start()
        per_sender = args.spans // args.senders
        ctx = multiprocessing.get_context("spawn")
        ready, go = ctx.Semaphore(0), ctx.Event()
        times = [ctx.Value("d", 0.0) for _ in range(args.senders)]
        procs = [
            ctx.Process(
                target=send,
                args=(ops.otlp_address, ca.dir, per_sender, args.batch, ready, go, t),
            )
            for t in times
        ]
        for p in procs:
            p.start()
        for _ in procs:
            await asyncio.to_thread(ready.acquire)
        go.set()
        for p in procs:
            await asyncio.to_thread(p.join)
        elapsed = max(t.value for t in times)
        stored = ops.collector.received
        await ops.stop()
    print(
        f"ingested {stored} spans in {elapsed:.2f} s: {stored / elapsed:,.0f} spans/s "
        f"({args.senders} sender processes on the same cores, batches of {args.batch})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--senders", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
