"""Prometheus metrics: what happened, with labels only from configuration and contracts."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tabadol.broker import Broker
from tabadol.client import connect
from tabadol.pki import CertificateAuthority
from tests.conftest import RunningProvider, plain_channel, start_broker
from tests.support.echo import SERVICE, UNARY
from tests.support.metrics import scrape


def samples_of(broker: Broker) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = scrape(f"https://127.0.0.1:{broker.metrics.port}/metrics", broker.config.broker.pki_dir)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


async def test_calls_errors_latency_and_refusals_are_counted_with_bounded_labels(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    pki.issue_agency("ghost", force=True)  # a genuine certificate, unknown to the configuration
    broker = await start_broker(tmp_path, pki.dir, echo_contracts, [echo_provider.address])
    try:
        address = f"127.0.0.1:{broker.port}"
        async with connect(address, pki.dir / "agencies" / "post") as post:
            for _ in range(3):
                await post.unary_unary(UNARY)(b"ok", timeout=10)
            with pytest.raises(grpc.aio.AioRpcError):
                await post.unary_unary(UNARY)(
                    b"", metadata=(("x-test-status", "NOT_FOUND"),), timeout=10
                )
        async with connect(address, pki.dir / "agencies" / "ghost") as ghost:
            with pytest.raises(grpc.aio.AioRpcError):
                await ghost.unary_unary(UNARY)(b"", timeout=10)
        async with plain_channel(broker, pki, "post") as hostile:
            for i in range(5):  # random paths must not become label values
                with pytest.raises(grpc.aio.AioRpcError):
                    await hostile.unary_unary(f"/random.Service{i}/M{i}")(b"", timeout=10)

        broker.refresh_metrics()  # as it does every second
        samples = samples_of(broker)
        call = dict(consumer="post", provider="echo", service=SERVICE, method="Unary")
        assert samples[("tabadol_calls_total", labels(**call, code="OK"))] == 3
        assert samples[("tabadol_calls_total", labels(**call, code="NOT_FOUND"))] == 1
        ghost_call = dict(call, consumer="unregistered")
        assert samples[("tabadol_calls_total", labels(**ghost_call, code="PERMISSION_DENIED"))] == 1
        assert samples[("tabadol_call_duration_seconds_count", labels(**call))] == 4
        assert samples[("tabadol_calls_refused_total", labels(reason="unknown_method"))] == 5
        assert samples[("tabadol_calls_in_flight", frozenset())] == 0
        assert ("tabadol_ledger_backlog_records", frozenset()) in samples
        assert samples[("tabadol_ledger_accepting", frozenset())] == 1
        assert not any("random.Service" in str(key) for key in samples)
    finally:
        await broker.stop()
