"""From a registry commit to its enforcement on every broker node: three ``tabadol broker``
processes sharing one registry database (and one ledger database, a chain each), a probe
per node calling in a tight loop, and a grant revoked and restored, commit after commit.

A change's latency on a node runs from just before the commit starts (as ``tabadol registry
import`` commits: the registry store's ``commit``) to the first probe answer with the new
outcome (PERMISSION_DENIED after a revocation, OK after a restore); the probe's own round
trip is its resolution.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench.loadgen import percentile
from bench.targets import Platform, logged_metrics_port
from tabadol import config as config_module
from tabadol.client import connect
from tabadol.registry.entries import Entries, digest, entries_data
from tabadol.registry.store import Registry, open_registry
from tests.conftest import DEFAULT_GRANTS, TRUST_DOMAIN
from tests.support.echo import SERVICE, UNARY
from tests.support.load import BrokerProcess, ledger_verify
from tests.support.registry import registry_toml

PROBE_AGENCY = "post"  # DEFAULT_GRANTS lets it call every method; REVOKED takes that away
REVOKED = f'[[grant]]\nconsumer = "nocr"\nservice = "{SERVICE}"\nmethods = ["Unary"]\n'
OK, DENIED = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
ENFORCE_TIMEOUT_S = 10.0  # a (change, node) not enforced by then counts as missed


def node_config(directory: Path, platform: Platform, url: str, instance: str) -> Path:
    """A node whose registry and ledger are both in the database at ``url``; the registry's
    polling and age settings are the defaults."""
    directory.mkdir()
    path = directory / "broker.toml"
    path.write_text(
        f"""[broker]
listen = "127.0.0.1:0"
trust_domain = "{TRUST_DOMAIN}"
pki_dir = "{platform.pki}"
contracts = ["{platform.contracts}"]
metrics_listen = "127.0.0.1:0"
instance = "{instance}"

[tracing]
exporter = "none"

[registry]
url = "{url}"

[ledger]
url = "{url}"
path = "ledger.db"
mode = "batched"
"""
    )
    return path


def checked_entries(config: Path, registry_file: Path) -> Entries:
    """A registry file's entries, validated against the node's contracts as ``tabadol
    registry import`` validates them before it commits."""
    entries = config_module.read_registry_file(registry_file)
    config_module.apply_entries(config_module.load(config), entries, registry_file)
    return entries_data(entries)


@dataclass
class Probe:
    """One node's probe: the outcome of its latest call, and when each change of outcome
    was seen (monotonic seconds)."""

    node: str
    channel: grpc.aio.Channel
    status: grpc.StatusCode | None = None
    flips: list[tuple[float, grpc.StatusCode]] = field(default_factory=list)
    calls: int = 0
    other: Counter[str] = field(default_factory=Counter)  # neither OK nor PERMISSION_DENIED
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    busy_s: float = 0.0  # how long it probed: busy_s / calls is its round trip

    async def run(self, stop: asyncio.Event) -> None:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(UNARY)
        began = time.monotonic()
        while not stop.is_set():
            try:
                await call(b"probe", timeout=5)
                code = OK
            except grpc.aio.AioRpcError as e:
                code = e.code()
            seen = time.monotonic()
            self.calls += 1
            if code not in (OK, DENIED):
                self.other[code.name] += 1
            elif code != self.status:
                self.status = code
                self.flips.append((seen, code))
                self.changed.set()
        self.busy_s = time.monotonic() - began

    async def until(self, status: grpc.StatusCode, timeout: float) -> float | None:
        """When the probe first saw ``status`` (it must not be showing it yet), or None."""
        try:
            async with asyncio.timeout(timeout):
                while self.status != status:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            return None
        return self.flips[-1][0]


@dataclass
class RegistryRun:
    nodes: int = 0
    changes: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # every (change, node) pair
    per_node: dict[str, dict[str, Any]] = field(default_factory=dict)
    missed: int = 0  # (change, node) pairs not enforced within ENFORCE_TIMEOUT_S
    commit_ms: list[float] = field(default_factory=list)  # the commit's own duration
    after_commit_ms: list[float] = field(default_factory=list)  # from the commit's return
    extra_flips: int = 0  # outcome changes beyond the committed ones (flapping)
    other_statuses: dict[str, int] = field(default_factory=dict)
    versions_applied: dict[str, float] = field(default_factory=dict)  # /metrics at the end
    last_version: int = 0
    ledger_verify: str = ""
    ledger_verify_ok: bool = False

    def summary(self) -> dict[str, Any]:
        ordered, after = sorted(self.latencies_ms), sorted(self.after_commit_ms)
        return {
            "pairs": len(ordered),
            "p50_ms": percentile(ordered, 0.50) if ordered else None,
            "p99_ms": percentile(ordered, 0.99) if ordered else None,
            "max_ms": ordered[-1] if ordered else None,
            "commit_p50_ms": statistics.median(self.commit_ms) if self.commit_ms else None,
            "commit_max_ms": max(self.commit_ms, default=None),
            "after_commit_p50_ms": percentile(after, 0.50) if after else None,
            "after_commit_p99_ms": percentile(after, 0.99) if after else None,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "summary": self.summary()}


async def measure(
    platform: Platform, url: str, provider: str, changes: int, nodes: int = 3, seed: int = 11
) -> RegistryRun:
    """``nodes`` brokers on one registry database; ``changes`` commits, alternately revoking
    and restoring PROBE_AGENCY's grant."""
    run = RegistryRun(nodes=nodes, changes=changes)
    names = [f"node-{i + 1}" for i in range(nodes)]
    configs = [node_config(platform.dir / n, platform, url, n) for n in names]
    versions: list[Entries] = []
    for label, grants in (("granted", DEFAULT_GRANTS), ("revoked", REVOKED)):
        file = platform.dir / f"registry-{label}.toml"
        file.write_text(registry_toml([provider], grants))
        versions.append(checked_entries(configs[0], file))
    granted, revoked = versions
    store = await asyncio.to_thread(open_registry, url)
    brokers: list[BrokerProcess] = []
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(store.commit, granted, "bench", "first", digest(granted))
        for config in configs:
            brokers.append(await BrokerProcess.start(config, metrics_port=0))
        for broker in brokers:
            broker.metrics_port = await logged_metrics_port(broker)
        credentials = platform.pki / "agencies" / PROBE_AGENCY
        probes = [
            Probe(n, connect(b.address, credentials)) for n, b in zip(names, brokers, strict=True)
        ]
        tasks = [asyncio.create_task(p.run(stop)) for p in probes]
        for probe in probes:
            if await probe.until(OK, 30) is None:
                raise RuntimeError(f"{probe.node} never answered the probe OK: {probe.other}")
        await _changes(run, store, probes, granted, revoked, random.Random(seed))
        stop.set()
        await asyncio.gather(*tasks)
        for probe in probes:
            await probe.channel.close()
            run.per_node[probe.node].update(
                probe_calls=probe.calls, probe_call_ms=probe.busy_s / max(1, probe.calls) * 1e3
            )
            run.extra_flips += len(probe.flips) - 1 - changes
            run.other_statuses.update(probe.other)
        for n, broker in zip(names, brokers, strict=True):
            # The gauge follows the version in force within a second (the follower's loop).
            with contextlib.suppress(AssertionError):
                await broker.wait_for_metric("tabadol_registry_version", run.last_version, 10)
            run.versions_applied[n] = await broker.metric("tabadol_registry_version")
        for broker in brokers:
            await broker.terminate()
        code, out = await ledger_verify(configs[0])
        run.ledger_verify, run.ledger_verify_ok = out.strip(), code == 0
    finally:
        stop.set()
        for broker in brokers:
            await broker.stop()
        await asyncio.to_thread(store.close)
    return run


async def _changes(
    run: RegistryRun,
    store: Registry,
    probes: Sequence[Probe],
    granted: Entries,
    revoked: Entries,
    rng: random.Random,
) -> None:
    per_node: dict[str, list[float]] = {p.node: [] for p in probes}
    for change in range(run.changes):
        # An uneven pause, so commits land anywhere in the nodes' polling cycles.
        await asyncio.sleep(0.2 + rng.random() * 0.3)
        entries, expected = (revoked, DENIED) if change % 2 == 0 else (granted, OK)
        started = time.monotonic()
        version = await asyncio.to_thread(
            store.commit, entries, "bench", f"change {change + 1}", digest(entries)
        )
        committed = time.monotonic()
        run.commit_ms.append((committed - started) * 1e3)
        run.last_version = version.number
        seen = await asyncio.gather(*(p.until(expected, ENFORCE_TIMEOUT_S) for p in probes))
        for probe, at in zip(probes, seen, strict=True):
            if at is None:
                run.missed += 1
                continue
            latency = (at - started) * 1e3
            run.latencies_ms.append(latency)
            run.after_commit_ms.append((at - committed) * 1e3)
            per_node[probe.node].append(latency)
    for node, latencies in per_node.items():
        ordered = sorted(latencies)
        run.per_node[node] = {
            "p50_ms": percentile(ordered, 0.5) if ordered else None,
            "max_ms": ordered[-1] if ordered else None,
        }
