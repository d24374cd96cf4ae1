"""Load and faults for the broker as a process: profiles, a driver for every RPC kind, a
broker subprocess that can be measured, and an echo provider bound to a chosen port.

``python -m tests.support.load CREDENTIALS_DIR [PORT]`` runs the echo provider on
127.0.0.1:PORT (0 or absent: any free port) and prints ``listening on PORT``, so that a test
can kill it and start it again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tabadol.client import ProviderServer, connect
from tabadol.config import load as load_config
from tabadol.ledger.record import LedgerRecord
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.metadata import Metadata
from tabadol.protocol import REQUEST_ID_KEY
from tests.conftest import DEFAULT_GRANTS, LARGE_MESSAGES, broker_toml
from tests.support.echo import BIDI, CLIENT_STREAM, SERVER_STREAM, UNARY, EchoProvider
from tests.support.metrics import scrape_async
from tests.support.processes import TABADOL, Process

KINDS = (UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI)

STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True)
class LoadProfile:
    """How hard the load and fault tests push. The default keeps `make test` quick."""

    name: str
    workers: int  # concurrent consumers, each on its own connection to the broker
    warmup_rounds: int  # per worker, before the first measurement; a round = one call per kind
    rounds: int  # per worker, measured
    stream_messages: int  # messages each way in a streaming call
    payload_bytes: int  # per message
    hung_calls: int  # concurrent calls to a provider that never answers
    slow_calls: int  # calls in flight when the broker is told to stop
    failover_rounds: int  # rounds per worker against a service with one dead endpoint
    calls_between_reloads: int  # calls that must complete between two SIGHUPs
    reloads: int
    test_timeout_s: float  # pytest-timeout for each test: bounded whatever goes wrong
    deadline_s: float = 10.0  # every call's deadline unless a test says otherwise
    # The broker's resident memory (whole process tree) may grow this much from the warmed-up
    # sample to the end, and its open descriptors this many (see test_load_faults.py).
    rss_growth: float = 0.25
    fd_slack: int = 8


DEFAULT = LoadProfile(
    name="default",
    workers=16,
    warmup_rounds=3,
    rounds=25,
    stream_messages=8,
    payload_bytes=512,
    hung_calls=200,
    slow_calls=64,
    failover_rounds=10,
    calls_between_reloads=50,
    reloads=5,
    test_timeout_s=60,
)

# `make soak`: ten times the calls, and correspondingly longer.
SOAK = LoadProfile(
    name="soak",
    workers=16,
    warmup_rounds=3,
    rounds=250,
    stream_messages=8,
    payload_bytes=512,
    hung_calls=1000,
    slow_calls=320,
    failover_rounds=100,
    calls_between_reloads=500,
    reloads=5,
    test_timeout_s=600,
)


def selected_profile() -> LoadProfile:
    return SOAK if os.environ.get("TABADOL_SOAK") == "1" else DEFAULT


PROFILE = selected_profile()


def unused_port() -> int:
    """A loopback port nothing listens on (the kernel just handed it out and it was closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- Calls ------------------------------------------------------------------------------


async def call_once(
    channel: grpc.aio.Channel,
    method: str,
    *,
    messages: int,
    payload_bytes: int,
    metadata: Metadata = (),
    timeout: float | None,
) -> str:
    """One call of ``method`` (any echo kind); checks every byte of the echo.

    Returns the request id the broker sent back; raises ``AioRpcError`` with the status.
    """
    payload = os.urandom(payload_bytes)
    md = metadata
    call: Any
    if method == UNARY:
        call = channel.unary_unary(method)(payload, metadata=md, timeout=timeout)
        assert await call == payload, f"{method}: echo differs"
    elif method == SERVER_STREAM:
        md += (("x-test-count", str(messages)),)
        call = channel.unary_stream(method)(payload, metadata=md, timeout=timeout)
        got = [m async for m in call]
        assert got == [i.to_bytes(4, "big") + payload for i in range(messages)], (
            f"{method}: stream differs"
        )
    elif method == CLIENT_STREAM:
        call = channel.stream_unary(method)(
            iter([payload] * messages), metadata=md, timeout=timeout
        )
        expected = f"{messages}:{hashlib.sha256(payload * messages).hexdigest()}".encode()
        assert await call == expected, f"{method}: digest differs"
    elif method == BIDI:
        call = channel.stream_stream(method)(
            iter([payload] * messages), metadata=md, timeout=timeout
        )
        got = [m async for m in call]
        assert got == [payload] * messages, f"{method}: stream differs"
    else:
        raise ValueError(f"not an echo method: {method}")
    request_id: str = dict(await call.trailing_metadata() or ())[REQUEST_ID_KEY]
    return request_id


@dataclass
class Tally:
    """What a load run got back: successes, failures by status, and the request ids."""

    ok: int = 0
    ok_by_method: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)  # status code name -> count
    examples: dict[str, str] = field(default_factory=dict)  # status -> one "method: details"
    request_ids: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    def succeeded(self, method: str, request_id: str) -> None:
        self.ok += 1
        self.ok_by_method[method] += 1
        self.request_ids.add(request_id)
        self.changed.set()

    def failure(self, method: str, code: str, details: str) -> None:
        self.failed[code] += 1
        self.examples.setdefault(code, f"{method}: {details}")
        self.changed.set()

    def summary(self) -> str:
        return f"{self.ok} ok, failed {dict(self.failed)}, e.g. {self.examples}"

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Until ``condition`` holds after some call ended; fails after ``timeout`` seconds."""

        async def watch() -> None:
            while not condition():
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(watch(), timeout)
        except TimeoutError:
            raise AssertionError(f"gave up waiting after {timeout}s: {self.summary()}") from None

    async def wait_for_ok(self, count: int, timeout: float) -> None:
        """Until ``count`` calls in all have succeeded, or one has failed."""
        await self.wait_until(lambda: self.ok >= count or self.failures > 0, timeout)


class Phases:
    """Tallies in sequence: a call counts in the phase during which it ended."""

    def __init__(self) -> None:
        self.current = Tally()

    def next(self) -> Tally:
        self.current = Tally()
        return self.current

    def succeeded(self, method: str, request_id: str) -> None:
        self.current.succeeded(method, request_id)

    def failure(self, method: str, code: str, details: str) -> None:
        self.current.failure(method, code, details)


async def attempt(
    channel: grpc.aio.Channel,
    method: str,
    tally: Tally | Phases,
    profile: LoadProfile,
    *,
    metadata: Metadata = (),
    timeout: float | None = None,
) -> bool:
    """One call, its outcome counted in ``tally`` rather than raised."""
    try:
        request_id = await call_once(
            channel,
            method,
            messages=profile.stream_messages,
            payload_bytes=profile.payload_bytes,
            metadata=metadata,
            timeout=profile.deadline_s if timeout is None else timeout,
        )
    except grpc.aio.AioRpcError as e:
        code, details = e.code(), e.details() or ""
        tally.failure(method, code.name, details)
        return False
    except AssertionError as e:  # the call succeeded but the echo was wrong
        tally.failure(method, "WRONG_ECHO", str(e))
        return False
    tally.succeeded(method, request_id)
    return True


async def rounds(
    channels: Sequence[grpc.aio.Channel], count: int, tally: Tally, profile: LoadProfile
) -> None:
    """Every channel concurrently: ``count`` rounds of one call of each kind."""

    async def worker(channel: grpc.aio.Channel) -> None:
        for _ in range(count):
            for method in KINDS:
                await attempt(channel, method, tally, profile)

    await asyncio.gather(*(worker(c) for c in channels))


async def keep_calling(
    channels: Sequence[grpc.aio.Channel],
    stop: asyncio.Event,
    tally: Tally | Phases,
    profile: LoadProfile,
    *,
    pause_after_failure: float = 0.02,
) -> None:
    """Every channel concurrently, every kind in turn, until ``stop`` is set.

    After a failed call a worker pauses briefly, so a broker that fails fast is not
    flooded with thousands of calls a second (this bounds the count, it synchronises nothing).
    """

    async def worker(channel: grpc.aio.Channel) -> None:
        while not stop.is_set():
            for method in KINDS:
                if not await attempt(channel, method, tally, profile):
                    await asyncio.sleep(pause_after_failure)

    await asyncio.gather(*(worker(c) for c in channels))


def spread(channels: Sequence[grpc.aio.Channel], count: int) -> list[tuple[grpc.aio.Channel, str]]:
    """``count`` calls' channels and methods: round robin over the channels and the kinds."""
    return [(channels[i % len(channels)], KINDS[i % len(KINDS)]) for i in range(count)]


def consumer_channels(address: str, credentials: Path, count: int) -> list[grpc.aio.Channel]:
    """``count`` channels as one agency, each on its own connection, as separate clients."""
    # Channels with the same target and arguments would share one connection otherwise.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    return [
        connect(address, credentials, options=[*LARGE_MESSAGES, *own_connection])
        for _ in range(count)
    ]


async def close_all(channels: Iterable[grpc.aio.Channel]) -> None:
    await asyncio.gather(*(c.close() for c in channels))


# --- The broker as a process --------------------------------------------------------------


def write_broker_config(
    directory: Path,
    *,
    pki_dir: Path,
    contracts: Path,
    endpoints: list[str],
    grants: str = DEFAULT_GRANTS,
    metrics_port: int,
    extra_broker: str = "",
    ledger: str = 'path = "ledger.db"',
) -> Path:
    """``broker.toml`` in ``directory``, with /metrics on ``metrics_port``."""
    text = broker_toml(
        pki_dir=pki_dir,
        contracts=contracts,
        endpoints=endpoints,
        grants=grants,
        extra_broker=extra_broker,
    )
    # The broker does not log its metrics port, so a process broker needs a known one.
    text = text.replace(
        'metrics_listen = "127.0.0.1:0"', f'metrics_listen = "127.0.0.1:{metrics_port}"'
    )
    path = directory / "broker.toml"
    path.write_text(f"{text}\n[ledger]\n{ledger}\n")
    return path


class BrokerProcess:
    """``tabadol broker --config FILE`` as a child process, its log read as it comes."""

    def __init__(self, process: Process, address: str, config: Path, metrics_port: int) -> None:
        self.process = process
        self.address = address
        self.config = config
        self.metrics_port = metrics_port

    @classmethod
    async def start(cls, config: Path, metrics_port: int) -> BrokerProcess:
        process = await Process.start(str(TABADOL), "broker", "--config", str(config))
        port = (await process.wait_for(r"broker listening on 127\.0\.0\.1:(\d+)"))[1]
        return cls(process, f"127.0.0.1:{port}", config, metrics_port)

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    @property
    def lines(self) -> list[str]:
        """Every log line so far."""
        return self.process.lines

    async def wait_for_log(self, pattern: str, *, after: int = 0, timeout: float = 30) -> int:
        """The index of the first log line from ``after`` on that matches ``pattern``."""
        return await self.process.wait_for_line(pattern, after=after, timeout=timeout)

    def count_log(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))

    def resources(self) -> Resources:
        """Resident memory and open descriptors of the broker and any processes it started."""
        root = psutil.Process(self.pid)
        tree = [root, *root.children(recursive=True)]
        return Resources(
            rss=sum(p.memory_info().rss for p in tree), fds=sum(p.num_fds() for p in tree)
        )

    async def metric(self, name: str) -> float:
        """An unlabelled sample from the broker's /metrics."""
        text = await scrape_async(
            f"https://127.0.0.1:{self.metrics_port}/metrics",
            load_config(self.config).broker.pki_dir,
        )
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return float(sample.value)
        raise AssertionError(f"/metrics has no {name}")

    async def wait_for_metric(self, name: str, value: float, timeout: float = 30) -> None:
        """Until /metrics shows ``name`` at ``value``: a bounded poll (no event crosses processes)."""
        last = None
        try:
            async with asyncio.timeout(timeout):
                while (last := await self.metric(name)) != value:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"{name} was still {last} after {timeout}s, not {value}") from None

    async def terminate(self) -> int:
        """SIGTERM, as an operator stops it: its exit status once it has drained and ended."""
        self.process.proc.send_signal(signal.SIGTERM)
        return await self.process.exit_status()

    def ledger_records(self) -> list[LedgerRecord]:
        """Every call the broker's ledger holds (read once the broker has stopped)."""
        store = SqliteLedgerStore(load_config(self.config).ledger.path, readonly=True)
        try:
            return [stored.record for stored in store.records()]
        finally:
            store.close()

    def ledger_statuses(self) -> Counter[str]:
        """How many calls the ledger recorded with each status (the status the broker sent)."""
        return Counter(STATUS_NAMES[record.status_code] for record in self.ledger_records())

    async def stop(self) -> None:
        """Kill the process if it still runs (cleanup), and stop reading its log."""
        await self.process.stop()


@dataclass(frozen=True)
class Resources:
    rss: int  # bytes
    fds: int

    def __str__(self) -> str:
        return f"RSS {self.rss / 2**20:.1f} MiB, {self.fds} fds"


async def ledger_verify(config: Path) -> tuple[int, str]:
    """``tabadol ledger verify --config``: its exit status and output."""
    check = await asyncio.create_subprocess_exec(
        str(TABADOL),
        "ledger",
        "verify",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await check.communicate()
    return check.returncode or 0, out.decode()


# --- The echo provider on a port of the test's choosing ---------------------------------------


async def start_echo_process(credentials: Path, port: int = 0) -> tuple[Process, int]:
    """The echo provider in its own process on 127.0.0.1:``port``; returns it and its port."""
    provider = await Process.start(
        sys.executable, "-m", "tests.support.load", str(credentials), str(port), read="stdout"
    )
    bound = int((await provider.wait_for(r"listening on (\d+)"))[1])
    return provider, bound


class TrackedEchoProvider(EchoProvider):
    """The echo provider, counting the handlers running now (so a test sees none linger)."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self._changed = asyncio.Event()

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._changed.set()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        with self._tracked():
            return await super().unary(request, context)

    async def server_stream(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        with self._tracked():
            async for message in super().server_stream(request, context):
                yield message

    async def client_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        with self._tracked():
            return await super().client_stream(requests, context)

    async def bidi(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        with self._tracked():
            async for message in super().bidi(requests, context):
                yield message

    async def wait_until_idle(self, timeout: float) -> None:
        """Until no handler runs; fails after ``timeout`` seconds, saying how many still do."""

        async def idle() -> None:
            while self.running:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(idle(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.running} provider handlers still running") from None


async def start_tracked_echo(credentials: Path) -> tuple[ProviderServer, TrackedEchoProvider]:
    """A tracked echo provider in this process, on a free loopback port."""
    server = ProviderServer(credentials, options=LARGE_MESSAGES)
    echo = TrackedEchoProvider()
    server.server.add_generic_rpc_handlers((echo,))
    await server.start()
    return server, echo


async def serve_echo(credentials: str, port: int) -> None:
    server = ProviderServer(credentials, listen=f"127.0.0.1:{port}", options=LARGE_MESSAGES)
    server.server.add_generic_rpc_handlers((EchoProvider(),))
    await server.start()
    print(f"listening on {server.port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve_echo(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
