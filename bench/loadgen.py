"""The load generator: separate processes (multiprocessing, spawn), so that it is not the
proxy's bottleneck; grpc.aio clients sending raw bytes over mTLS, and for the broker's HTTP
entry httpx clients (HTTP/2) sending JSON with the same agency certificate.

Each process keeps one channel (one HTTP/2 connection) per target for the whole run. For a
measurement the parent gives every process its share of the concurrency; each warms up,
says so, and the parent reads the CPU clocks and starts them all at once. Each process
stops starting calls when its time is up and reports once its calls in flight are done,
so every call counted ran inside the CPU window.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import ssl
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as PipeEnd
from typing import Any

import grpc
import grpc.aio
import httpx

from bench.person_contract import METHOD as PERSON_ECHO
from bench.person_contract import PERSON_JSON, REST_PATH, person_body, person_bytes
from bench.targets import Endpoint, Target
from tests.support.echo import BIDI, SERVER_STREAM, UNARY

CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    kind: str  # unary | unary_record | server_stream | bidi_pingpong | bidi_pipelined
    payload_bytes: int
    messages: int = 1  # per call (server streaming) or in flight (pipelined bidi)

    @property
    def one_stream(self) -> bool:
        """A single bidi stream: one unit is one message, and there is no concurrency."""
        return self.kind.startswith("bidi")

    @property
    def unit(self) -> str:
        return "msg" if self.one_stream else "call"


WORKLOADS = (
    Workload("unary_100B", "unary, 100 B each way", "unary", 100),
    Workload("unary_64KiB", "unary, 64 KiB each way", "unary", 64 * 1024),
    Workload(
        "unary_json",
        f"unary, a person record each way: {len(person_bytes())} B of protobuf over gRPC, "
        f"{len(person_body())} B of JSON over HTTP",
        "unary_record",
        len(person_bytes()),
    ),
    Workload(
        "server_stream",
        "server streaming, 100 messages of 1 KiB per call",
        "server_stream",
        1020,  # the echo puts a 4-byte counter before each copy: 1 KiB messages
        100,
    ),
    Workload(
        "bidi_pingpong",
        "bidi, ONE stream, ping-pong (one 100 B message in flight at a time)",
        "bidi_pingpong",
        100,
    ),
    Workload(
        "bidi_pipelined",
        "bidi, ONE stream, pipelined (up to 64 messages of 100 B in flight)",
        "bidi_pipelined",
        100,
        64,
    ),
)


@dataclass(frozen=True)
class Order:
    endpoint: Endpoint
    workload: Workload
    concurrency: int
    seconds: float
    warmup_s: float


@dataclass
class Outcome:
    """What one generator process did in one measurement."""

    units: int = 0  # calls; messages for a single bidi stream
    messages: int = 0  # response messages received
    errors: int = 0
    error: str = ""
    elapsed_s: float = 0.0
    latencies_s: array[float] = field(default_factory=lambda: array("d"))


# --- In a generator process -------------------------------------------------------------------

Call = Callable[[], Awaitable[int]]  # one call; returns the messages received
# Hypercorn, the gateway's HTTP server, ends a connection after 1,000 requests by default
# (keep_alive_max_requests), and httpx fails the requests in flight on it: each generator
# moves to a new connection before then. One TLS handshake per 900 calls is in the figures.
HTTP_REQUESTS_PER_CONNECTION = 900


class HttpConnection:
    """One HTTP/2 connection at a time, as a gRPC channel has, with the agency's
    certificate; the broker's name is verified as the gRPC clients verify it."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.context = ssl.create_default_context(cafile=str(endpoint.ca))
        self.context.load_cert_chain(endpoint.cert, endpoint.key)
        self.extensions = {"sni_hostname": endpoint.server_name}
        self._client = self._new_client()
        self._sent = 0
        self._in_flight: dict[httpx.AsyncClient, int] = {self._client: 0}
        self._retired: set[httpx.AsyncClient] = set()
        self._closing: set[asyncio.Task[None]] = set()

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"https://{self.endpoint.address}",
            verify=self.context,
            http2=True,
            limits=httpx.Limits(max_connections=1),
            timeout=CALL_TIMEOUT_S,
        )

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        if self._sent >= HTTP_REQUESTS_PER_CONNECTION:
            self._retired.add(self._client)
            self._client, self._sent = self._new_client(), 0
            self._in_flight[self._client] = 0
        client = self._client
        self._sent += 1
        self._in_flight[client] += 1
        try:
            return await client.post(url, content=body, headers=headers, extensions=self.extensions)
        finally:
            self._in_flight[client] -= 1
            if client in self._retired and not self._in_flight[client]:
                self._retired.discard(client)
                del self._in_flight[client]
                task = asyncio.create_task(client.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._in_flight), *self._closing)


Connection = grpc.aio.Channel | HttpConnection  # a target's, for the whole run


def _connection(endpoint: Endpoint) -> Connection:
    return _channel(endpoint) if endpoint.protocol == "grpc" else HttpConnection(endpoint)


def _channel(endpoint: Endpoint) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        endpoint.ca.read_bytes(), endpoint.key.read_bytes(), endpoint.cert.read_bytes()
    )
    return grpc.aio.secure_channel(
        endpoint.address,
        creds,
        options=[
            ("grpc.ssl_target_name_override", endpoint.server_name),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ],
    )


def _one_call(connection: Connection, endpoint: Endpoint, workload: Workload) -> Call:
    """A coroutine function making one call of ``workload``; returns the messages received."""
    if isinstance(connection, HttpConnection):
        return _one_http_call(connection, endpoint, workload)
    channel = connection
    if workload.kind == "unary_record":
        record: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(PERSON_ECHO)
        encoded = person_bytes()

        async def call_record() -> int:
            if await record(encoded, timeout=CALL_TIMEOUT_S) != encoded:
                raise ValueError("the echo differs from the request")
            return 1

        return call_record
    payload = b"x" * workload.payload_bytes
    if workload.kind == "unary":
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)

        async def call_unary() -> int:
            if await unary(payload, timeout=CALL_TIMEOUT_S) != payload:
                raise ValueError("the echo differs from the request")
            return 1

        return call_unary

    stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(SERVER_STREAM)
    count = (("x-test-count", str(workload.messages)),)

    async def call_stream() -> int:
        call = stream(payload, metadata=count, timeout=CALL_TIMEOUT_S)
        received = 0
        while await call.read() is not grpc.aio.EOF:
            received += 1
        if received != workload.messages:
            raise ValueError(f"{received} messages instead of {workload.messages}")
        return received

    return call_stream


def _one_http_call(client: HttpConnection, endpoint: Endpoint, workload: Workload) -> Call:
    """The person record as JSON, over Connect (``POST /pkg.Service/Method``, with a
    timeout as the gRPC calls have) or its REST route; the answer must be the same record."""
    if workload.kind != "unary_record":
        raise ValueError(f"the HTTP entry is measured on unary_json only, not {workload.key}")
    body = person_body()
    if endpoint.protocol == "connect":
        url = PERSON_ECHO
        headers = {
            "content-type": "application/json",
            "connect-protocol-version": "1",
            "connect-timeout-ms": str(int(CALL_TIMEOUT_S * 1000)),
        }
    else:
        url, headers = REST_PATH, {"content-type": "application/json"}

    async def call_json() -> int:
        answer = await client.post(url, body, headers)
        if answer.status_code != 200:
            raise ValueError(f"HTTP {answer.status_code}: {answer.text[:200]}")
        if json.loads(answer.content) != PERSON_JSON:
            raise ValueError("the echo differs from the request")
        return 1

    return call_json


async def _calls(connection: Connection, order: Order, seconds: float) -> Outcome:
    """``order.concurrency`` loops of calls, each timed, until ``seconds`` have passed."""
    outcome = Outcome()
    one = _one_call(connection, order.endpoint, order.workload)
    clock = time.perf_counter
    deadline = clock() + seconds

    async def loop() -> None:
        while (started := clock()) < deadline:
            try:
                # Not `outcome.messages += await one()`: that reads the count before the
                # await, and the other loops' messages received meanwhile would be lost.
                received = await one()
            except (grpc.aio.AioRpcError, httpx.HTTPError, ValueError) as e:
                outcome.errors += 1
                outcome.error = outcome.error or _describe(e)
                await asyncio.sleep(0.01)  # a failing target must not turn into a spin
                continue
            outcome.latencies_s.append(clock() - started)
            outcome.units += 1
            outcome.messages += received

    begun = clock()
    await asyncio.gather(*(loop() for _ in range(order.concurrency)))
    outcome.elapsed_s = clock() - begun
    return outcome


async def _one_stream(channel: grpc.aio.Channel, order: Order, seconds: float) -> Outcome:
    """One bidi stream: each message's round trip is timed (echoes come back in order)."""
    outcome = Outcome()
    workload = order.workload
    payload = b"x" * workload.payload_bytes
    clock = time.perf_counter
    stub: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(BIDI)
    call = stub(timeout=seconds + CALL_TIMEOUT_S)
    writer: asyncio.Task[None] | None = None
    begun = clock()
    deadline = begun + seconds
    try:
        if workload.kind == "bidi_pingpong":
            while (started := clock()) < deadline:
                await call.write(payload)
                if await call.read() != payload:
                    raise ValueError("the echo differs from the message")
                outcome.latencies_s.append(clock() - started)
                outcome.units += 1
            await call.done_writing()
            if await call.read() is not grpc.aio.EOF:
                raise ValueError("an echo came back that was never sent")
        else:
            window = asyncio.Semaphore(workload.messages)
            sent: deque[float] = deque()

            async def write() -> None:
                while clock() < deadline:
                    await window.acquire()
                    sent.append(clock())
                    await call.write(payload)
                await call.done_writing()

            writer = asyncio.create_task(write())
            while (message := await call.read()) is not grpc.aio.EOF:
                if message != payload:
                    raise ValueError("the echo differs from the message")
                outcome.latencies_s.append(clock() - sent.popleft())
                outcome.units += 1
                window.release()
            await writer
    except (grpc.aio.AioRpcError, ValueError) as e:
        call.cancel()
        if writer is not None:
            writer.cancel()
        outcome.errors += 1
        outcome.error = _describe(e)
    outcome.messages = outcome.units
    outcome.elapsed_s = clock() - begun
    return outcome


def _describe(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}" if isinstance(error, httpx.HTTPError) else str(error)


async def _run(connection: Connection, order: Order, seconds: float) -> Outcome:
    if order.workload.one_stream:
        if not isinstance(connection, grpc.aio.Channel):
            raise ValueError(f"{order.workload.key} is a gRPC stream; the HTTP entry has none")
        return await _one_stream(connection, order, seconds)
    return await _calls(connection, order, seconds)


async def _serve(conn: PipeEnd) -> None:
    connections: dict[Endpoint, Connection] = {}
    try:
        while (order := await asyncio.to_thread(conn.recv)) is not None:
            connection = connections.get(order.endpoint)
            if connection is None:
                connection = connections[order.endpoint] = _connection(order.endpoint)
            await _run(connection, order, order.warmup_s)
            conn.send("ready")
            await asyncio.to_thread(conn.recv)  # go
            conn.send(await _run(connection, order, order.seconds))
    finally:
        await asyncio.gather(*(c.close() for c in connections.values()))


def generator_main(conn: PipeEnd) -> None:
    """A generator process: runs orders from ``conn`` until it receives None."""
    asyncio.run(_serve(conn))


# --- In the parent ----------------------------------------------------------------------------


@dataclass
class Measurement:
    """One target under one workload at one concurrency, with the CPU it cost."""

    target: str
    workload: str
    concurrency: int
    seconds: float
    units: int
    messages: int
    errors: int
    error: str
    per_s: float  # calls/s, or messages/s on a single stream
    messages_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    proxy_cpu_us: float | None  # per unit: µs of the proxy's processes' CPU
    provider_cpu_us: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def split(concurrency: int, processes: int) -> list[int]:
    """``concurrency`` calls spread as evenly as possible over ``processes``."""
    return [concurrency // processes + (i < concurrency % processes) for i in range(processes)]


class Generators:
    """The load generator processes, started once and reused for every measurement."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.count = count
        self._pipes: list[PipeEnd] = []
        self._processes = []
        for _ in range(count):
            parent, child = context.Pipe()
            process = context.Process(target=generator_main, args=(child,), daemon=True)
            process.start()
            child.close()
            self._pipes.append(parent)
            self._processes.append(process)

    async def measure(
        self,
        target: Target,
        workload: Workload,
        concurrency: int,
        seconds: float,
        warmup_s: float,
        provider_cpu: Callable[[], float],
    ) -> Measurement:
        shares = [1] if workload.one_stream else split(concurrency, self.count)
        pipes = [pipe for pipe, share in zip(self._pipes, shares, strict=False) if share]
        for pipe, share in zip(pipes, shares, strict=False):
            pipe.send(Order(target.endpoint, workload, share, seconds, warmup_s))
        await asyncio.gather(*(self._expect(pipe, "ready") for pipe in pipes))
        proxy_before, provider_before = target.cpu_seconds(), provider_cpu()
        for pipe in pipes:
            pipe.send("go")
        outcomes: list[Outcome] = await asyncio.gather(*(self._receive(pipe) for pipe in pipes))
        proxy_used = target.cpu_seconds() - proxy_before
        provider_used = provider_cpu() - provider_before
        units = sum(o.units for o in outcomes)
        elapsed = max(o.elapsed_s for o in outcomes)
        latencies = sorted(x for o in outcomes for x in o.latencies_s)
        return Measurement(
            target=target.name,
            workload=workload.key,
            concurrency=1 if workload.one_stream else concurrency,
            seconds=elapsed,
            units=units,
            messages=sum(o.messages for o in outcomes),
            errors=sum(o.errors for o in outcomes),
            error=next((o.error for o in outcomes if o.error), ""),
            per_s=units / elapsed if elapsed else 0.0,
            messages_per_s=sum(o.messages for o in outcomes) / elapsed if elapsed else 0.0,
            p50_ms=percentile(latencies, 0.50) * 1e3 if latencies else None,
            p99_ms=percentile(latencies, 0.99) * 1e3 if latencies else None,
            proxy_cpu_us=proxy_used / units * 1e6 if units and target.pids else None,
            provider_cpu_us=provider_used / units * 1e6 if units else None,
        )

    @staticmethod
    async def _receive(pipe: PipeEnd) -> Any:
        return await asyncio.to_thread(pipe.recv)

    async def _expect(self, pipe: PipeEnd, what: str) -> None:
        got = await self._receive(pipe)
        if got != what:
            raise RuntimeError(f"load generator said {got!r}, expected {what!r}")

    async def close(self) -> None:
        for pipe in self._pipes:
            pipe.send(None)
        for process in self._processes:
            await asyncio.to_thread(process.join, 10)
            if process.exitcode is None:
                process.kill()
