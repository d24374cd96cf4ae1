"""The broker process under load and under faults: every RPC kind, real processes, loopback.

Sizes come from ``tests.support.load.PROFILE``; ``TABADOL_SOAK=1`` selects ten times the
calls (`make soak`). Nothing here asserts on durations: failing fast is shown by the status
(UNAVAILABLE, not DEADLINE_EXCEEDED under a 10 s deadline), and every wait is bounded.

Flat resources (the load test). Sampled once warmed up (every kind called on every
connection, so gRPC's buffers, the identity cache, the metric label children and the ledger
writer exist) and again at the end, each time with the same connections open and idle, for
the broker process and any it started:

- resident memory grows by less than 25%. A warmed-up broker holds about 80 MiB and grows by
  3-4 MiB over the first ten thousand calls, then stays flat: caches filling up to their
  caps, and allocator high-water marks (neither CPython nor glibc hands freed memory back
  promptly). A leak grows with the calls instead. 25% (about 20 MiB) clears that noise
  several times over, and still catches a leak of about 13 KiB per call in the default run
  and 1.3 KiB per call (a leaked record or exchange) in the soak run, which is the one that
  hunts slow leaks.
- open descriptors grow by at most 8. Both samples see the same connections, listeners,
  provider channel and ledger files (in practice the count is identical); a descriptor
  leaked per call or per stream would add hundreds. The slack is for anything gRPC or
  SQLite opens lazily, once.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import pytest

from tabadol.pki import CertificateAuthority
from tests.conftest import DEFAULT_GRANTS, RunningProvider
from tests.support.echo import SERVICE, UNARY
from tests.support.load import (
    KINDS,
    PROFILE,
    BrokerProcess,
    Phases,
    Tally,
    attempt,
    close_all,
    consumer_channels,
    keep_calling,
    ledger_verify,
    rounds,
    spread,
    start_echo_process,
    start_tracked_echo,
    unused_port,
    write_broker_config,
)

pytestmark = pytest.mark.timeout(PROFILE.test_timeout_s)

GRANT_CRA = f"""
[[grant]]
consumer = "cra"
service = "{SERVICE}"
methods = ["Unary"]
"""


async def start_broker_process(
    directory: Path,
    pki: CertificateAuthority,
    contracts: Path,
    endpoints: list[str],
    *,
    grants: str = DEFAULT_GRANTS,
    extra_broker: str = "",
) -> BrokerProcess:
    metrics_port = unused_port()
    config = write_broker_config(
        directory,
        pki_dir=pki.dir,
        contracts=contracts,
        endpoints=endpoints,
        grants=grants,
        metrics_port=metrics_port,
        extra_broker=extra_broker,
    )
    return await BrokerProcess.start(config, metrics_port)


def as_post(pki: CertificateAuthority) -> Path:
    return pki.dir / "agencies" / "post"


async def test_every_rpc_kind_under_concurrent_load_without_errors_and_with_flat_memory_and_fds(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    profile = PROFILE
    broker = await start_broker_process(tmp_path, pki, echo_contracts, [echo_provider.address])
    channels = consumer_channels(broker.address, as_post(pki), profile.workers)
    try:
        warmup = Tally()
        await rounds(channels, profile.warmup_rounds, warmup, profile)
        assert warmup.failures == 0, warmup.summary()
        await broker.wait_for_metric("tabadol_calls_in_flight", 0)
        before = broker.resources()

        load = Tally()
        await rounds(channels, profile.rounds, load, profile)
        await broker.wait_for_metric("tabadol_calls_in_flight", 0)
        after = broker.resources()
    finally:
        await close_all(channels)
        await broker.stop()

    assert load.failures == 0, load.summary()
    assert load.ok == profile.workers * profile.rounds * len(KINDS)
    assert len(load.request_ids) == load.ok  # one exchange per call, none conflated
    assert after.rss < before.rss * (1 + profile.rss_growth), f"{before} -> {after}"
    assert after.fds <= before.fds + profile.fd_slack, f"{before} -> {after}"


async def test_killed_provider_fails_calls_fast_and_they_recover_when_it_returns_on_its_port(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    profile = PROFILE
    echo_credentials = pki.dir / "agencies" / "echo"
    provider, port = await start_echo_process(echo_credentials)
    broker = await start_broker_process(tmp_path, pki, echo_contracts, [f"127.0.0.1:{port}"])
    channels = consumer_channels(broker.address, as_post(pki), profile.workers)
    phases, stop = Phases(), asyncio.Event()
    load = asyncio.ensure_future(keep_calling(channels, stop, phases, profile))
    try:
        up = phases.current
        await up.wait_for_ok(profile.workers * len(KINDS), timeout=30)

        down = phases.next()
        provider.kill()  # SIGKILL
        await provider.proc.wait()
        # A worker has at most one call in flight when the provider dies; past twice the
        # workers, every worker has had calls fail that started with the provider gone.
        await down.wait_until(lambda: down.failures >= 2 * profile.workers, timeout=30)

        provider, restarted_on = await start_echo_process(echo_credentials, port)
        assert restarted_on == port
        recovering = phases.next()
        # The broker's channel reconnects on its own back-off: retry until every kind works.
        await recovering.wait_until(
            lambda: all(recovering.ok_by_method[m] for m in KINDS), timeout=30
        )
        stop.set()
        await load

        after = Tally()
        await rounds(channels, 2, after, profile)
        assert broker.process.proc.returncode is None  # the same broker throughout
        assert await broker.terminate() == 0
    finally:
        stop.set()
        await asyncio.wait_for(load, 30)
        await close_all(channels)
        await broker.stop()
        await provider.stop()

    assert up.failures == 0, up.summary()
    # Fast: a call that hung would end DEADLINE_EXCEEDED (10 s), not UNAVAILABLE.
    assert "UNAVAILABLE" in down.failed, down.summary()
    assert set(down.failed) == {"UNAVAILABLE"}, down.summary()
    assert set(recovering.failed) <= {"UNAVAILABLE"}, recovering.summary()
    assert after.failures == 0, after.summary()
    assert after.ok == profile.workers * 2 * len(KINDS)
    # What the broker itself answered: every call OK or UNAVAILABLE.
    statuses = broker.ledger_statuses()
    assert set(statuses) == {"OK", "UNAVAILABLE"}, statuses


async def test_hung_provider_gives_deadline_exceeded_and_leaves_nothing_in_flight_on_either_side(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    profile = PROFILE
    provider, echo = await start_tracked_echo(pki.dir / "agencies" / "echo")
    broker = await start_broker_process(tmp_path, pki, echo_contracts, [provider.address])
    channels = consumer_channels(broker.address, as_post(pki), profile.workers)
    hang = (("x-test-sleep", "60"),)
    try:
        hung = Tally()
        await asyncio.gather(
            *(
                attempt(channel, method, hung, profile, metadata=hang, timeout=0.3)
                for channel, method in spread(channels, profile.hung_calls)
            )
        )
        assert hung.ok == 0, hung.summary()
        assert set(hung.failed) == {"DEADLINE_EXCEEDED"}, hung.summary()

        # The broker let go of every call...
        await broker.wait_for_metric("tabadol_calls_in_flight", 0)
        # ...and so did the provider: every call that reached it was cancelled there, not
        # left sleeping out its 60 s.
        assert echo.calls, "no call reached the provider before its deadline"
        await echo.wait_until_idle(timeout=30)

        afterwards = Tally()
        await rounds(channels, 1, afterwards, profile)
        assert afterwards.failures == 0, afterwards.summary()
        assert await broker.terminate() == 0
    finally:
        await close_all(channels)
        await broker.stop()
        await provider.stop(0)

    # What the broker answered: never OK, nor anything but the deadline, to a hung call. (It
    # records CANCELLED when the consumer's cancel at its deadline beats the broker's own
    # timer; calls whose deadline passed before the broker's handler ran are not recorded.)
    statuses = broker.ledger_statuses()
    assert set(statuses) <= {"DEADLINE_EXCEEDED", "CANCELLED", "OK"}, statuses
    assert statuses["OK"] == afterwards.ok


async def test_a_service_with_one_dead_endpoint_answers_every_call_from_the_live_one(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    # Failover: with plain round robin, every other call would fail.
    profile = PROFILE
    dead = f"127.0.0.1:{unused_port()}"
    broker = await start_broker_process(
        tmp_path, pki, echo_contracts, [dead, echo_provider.address]
    )
    channels = consumer_channels(broker.address, as_post(pki), profile.workers)
    try:
        tally = Tally()
        await rounds(channels, profile.failover_rounds, tally, profile)
    finally:
        await close_all(channels)
        await broker.stop()

    assert tally.failures == 0, tally.summary()
    assert tally.ok == profile.workers * profile.failover_rounds * len(KINDS)


async def test_sigterm_under_load_finishes_started_calls_refuses_new_ones_and_ledgers_them_all(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    profile = PROFILE
    broker = await start_broker_process(
        tmp_path, pki, echo_contracts, [echo_provider.address],
        # All of post's slow calls in flight at once: the soak profile's 320 are over the
        # default per-agency limit.
        extra_broker=f"shutdown_grace_seconds = 10\nconsumer_concurrency = {2 * profile.slow_calls}",
    )  # fmt: skip
    channels = consumer_channels(broker.address, as_post(pki), profile.workers)
    [fresh] = consumer_channels(broker.address, as_post(pki), 1)  # first used after SIGTERM
    echo = echo_provider.echo
    run = uuid.uuid4().hex
    slow_metadata = (("x-test-sleep", "1"), ("x-test-run", run))

    def arrived() -> int:
        return sum(1 for s in echo.calls if s.metadata.get("x-test-run") == run)

    try:
        slow = Tally()
        calls = [
            asyncio.ensure_future(
                attempt(channel, method, slow, profile, metadata=slow_metadata, timeout=60)
            )
            for channel, method in spread(channels, profile.slow_calls)
        ]

        async def all_arrived() -> None:
            while arrived() < profile.slow_calls:
                echo.call_started.clear()
                await echo.call_started.wait()

        await asyncio.wait_for(all_arrived(), 30)
        broker.process.proc.send_signal(signal.SIGTERM)
        await broker.wait_for_log("stopping: draining")

        # Draining: new calls, on the connections in use and on a new one, are turned away.
        late = Tally()
        await asyncio.gather(
            *(attempt(channel, UNARY, late, profile) for channel in [*channels, fresh])
        )
        await asyncio.gather(*calls)
        assert await broker.process.exit_status(30) == 0
    finally:
        await close_all([*channels, fresh])
        await broker.stop()

    assert slow.failures == 0, slow.summary()  # none cut off by the stop
    assert slow.ok == profile.slow_calls
    assert late.ok == 0, f"calls that came after SIGTERM were served: {late.summary()}"
    # Not CANCELLED, which consumers do not retry: gRPC's server cancels calls that arrive on
    # an open connection once it is stopping (grpc/grpc#41785).
    assert set(late.failed) == {"UNAVAILABLE"}, late.summary()
    assert broker.count_log("broker stopped") == 1

    code, out = await ledger_verify(broker.config)
    assert code == 0, out
    assert out.strip().endswith("chain and seals intact"), out
    assert slow.request_ids <= {record.request_id for record in broker.ledger_records()}


async def test_sighup_reloads_under_load_drop_no_call(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    profile = PROFILE
    broker = await start_broker_process(tmp_path, pki, echo_contracts, [echo_provider.address])
    channels = consumer_channels(broker.address, as_post(pki), profile.workers)
    [cra] = consumer_channels(broker.address, pki.dir / "agencies" / "cra", 1)
    tally, stop = Tally(), asyncio.Event()
    load = asyncio.ensure_future(keep_calling(channels, stop, tally, profile))
    cra_outcomes: list[set[str]] = []
    try:
        for i in range(profile.reloads):
            await tally.wait_for_ok(tally.ok + profile.calls_between_reloads, timeout=60)
            # Alternately grant cra and take its grant away; post keeps its grant throughout.
            grants = DEFAULT_GRANTS + (GRANT_CRA if i % 2 == 0 else "")
            write_broker_config(
                tmp_path, pki_dir=pki.dir, contracts=echo_contracts,
                endpoints=[echo_provider.address], grants=grants,
                metrics_port=broker.metrics_port,
            )  # fmt: skip
            mark = len(broker.lines)
            broker.process.proc.send_signal(signal.SIGHUP)
            await broker.wait_for_log("configuration reloaded", after=mark)
            cra_tally = Tally()
            await attempt(cra, UNARY, cra_tally, profile)
            cra_outcomes.append({"OK"} if cra_tally.ok else set(cra_tally.failed))
        await tally.wait_for_ok(tally.ok + profile.calls_between_reloads, timeout=60)
    finally:
        stop.set()
        await asyncio.wait_for(load, 30)
        await close_all([*channels, cra])
        await broker.stop()

    assert tally.failures == 0, tally.summary()
    assert broker.count_log("configuration reloaded") == profile.reloads
    assert broker.count_log("reload (refused|failed)") == 0
    # Each reload took effect: cra's grant came and went.
    expected = [{"OK"} if i % 2 == 0 else {"PERMISSION_DENIED"} for i in range(profile.reloads)]
    assert cra_outcomes == expected
