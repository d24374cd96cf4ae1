"""``tabadol ops``: the OTLP collector endpoint, the web UI and retention, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc.aio
import uvicorn
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from tabadol.errors import TabadolError
from tabadol.ops.app import create_app
from tabadol.ops.dashboard import Accounts
from tabadol.ops.otlp import TraceCollector
from tabadol.ops.store import SqliteSpanStore, StoreLimits

log = logging.getLogger("tabadol.ops")

DEFAULT_HTTP = "127.0.0.1:16686"
DEFAULT_OTLP = "127.0.0.1:4317"
RETENTION_INTERVAL_SECONDS = 60.0
# OTLP batches from a busy broker are large; the SDK's default limit is gRPC's 4 MiB.
_OTLP_MAX_MESSAGE = 64 * 1024 * 1024


def _split(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TabadolError(f"{what} address {address!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


class _EmbeddedUvicorn(uvicorn.Server):
    """Uvicorn without its own signal handling: the process that embeds it owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class OpsServer:
    """The trace viewer. ``await start()``; then ``http_url`` and ``otlp_address`` are bound."""

    def __init__(
        self,
        db: Path,
        *,
        http: str = DEFAULT_HTTP,
        otlp: str = DEFAULT_OTLP,
        limits: StoreLimits | None = None,
    ) -> None:
        self.store = SqliteSpanStore(db, limits)
        self.collector = TraceCollector(self.store)
        self._http = _split(http, "--http")
        self._otlp = otlp
        self._grpc = grpc.aio.server(
            options=[("grpc.max_receive_message_length", _OTLP_MAX_MESSAGE)]
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self.collector, self._grpc
        )
        self.app = create_app(self.store)
        self._uvicorn: uvicorn.Server | None = None
        self._web: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self.http_url = ""
        self.otlp_address = ""

    async def start(self) -> None:
        try:
            otlp_port = self._grpc.add_insecure_port(self._otlp)
        except RuntimeError as e:
            raise TabadolError(f"--otlp: cannot listen on {self._otlp}: {e}") from e
        await self._grpc.start()
        self.otlp_address = f"{_split(self._otlp, '--otlp')[0]}:{otlp_port}"

        host, port = self._http
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            await self._grpc.stop(None)
            raise TabadolError(f"--http: cannot listen on {host}:{port}: {e.strerror}") from e
        bound = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._uvicorn = _EmbeddedUvicorn(config)
        self._web = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._web.done():
                self._web.result()  # raises what stopped it
            await asyncio.sleep(0.01)  # uvicorn offers no started event to await
        self.http_url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}"
        self._retention = asyncio.create_task(self._retention_loop())

    def show_ledger(self, accounts: Accounts) -> None:
        """Serve the dashboard and quarterly reports from this configuration's ledger."""
        self.app.state.accounts = accounts

    async def _retention_loop(self) -> None:
        while True:
            try:
                removed = await asyncio.to_thread(self.store.enforce_retention, time.time_ns())
                if removed:
                    log.info("retention removed %d traces", removed)
            except Exception:
                log.exception("retention failed; will try again")
            await asyncio.sleep(RETENTION_INTERVAL_SECONDS)

    async def stop(self) -> None:
        """Stop taking spans and requests; in-flight exports get a second to finish."""
        await self._grpc.stop(1)
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        if self._web is not None:
            await self._web
        accounts: Accounts | None = self.app.state.accounts
        if accounts is not None:
            accounts.store.close()
        self.store.close()


def open_accounts(config_path: Path) -> Accounts:
    """The ledger named by a broker configuration, opened read-only."""
    from tabadol import config as config_module
    from tabadol.ledger.store import LedgerWriteError, SqliteLedgerStore

    cfg = config_module.load(config_path)
    try:
        return Accounts(cfg, SqliteLedgerStore(cfg.ledger.path, readonly=True))
    except LedgerWriteError as e:
        raise TabadolError(f"{config_path}: [ledger] path: {e}") from e


async def run(
    db: Path, http: str, otlp: str, limits: StoreLimits, config_path: Path | None = None
) -> None:
    server = OpsServer(db, http=http, otlp=otlp, limits=limits)
    if config_path is not None:
        server.show_ledger(open_accounts(config_path))
    await server.start()
    log.info(
        "trace viewer at %s; OTLP/gRPC collector on %s; spans in %s",
        server.http_url,
        server.otlp_address,
        db,
    )
    print(f"Tabadol ops: open {server.http_url}  (OTLP/gRPC on {server.otlp_address})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
