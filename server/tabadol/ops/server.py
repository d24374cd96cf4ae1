"""``tabadol ops``: the OTLP collector endpoint, the web console and retention, in one process.

Both ports serve with the ops certificate from the platform PKI: the collector requires a
client certificate (otlp.py); the console asks for one and lets nothing through without an
identity (gate.py), the certificate or a session opened by a one-time login link.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc.aio
import uvicorn
from cryptography import x509
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from tabadol.access.desk import AccessDesk
from tabadol.config import BrokerConfig
from tabadol.errors import TabadolError
from tabadol.identity import Role
from tabadol.ops.access import is_loopback, served_names
from tabadol.ops.app import create_app
from tabadol.ops.dashboard import Accounts
from tabadol.ops.defaults import DEFAULT_HTTP, DEFAULT_OTLP
from tabadol.ops.gate import ConsoleAccess
from tabadol.ops.otlp import (
    DEFAULT_MAX_REQUEST_BYTES,
    TraceCollector,
    add_otlp_port,
    server_options,
)
from tabadol.ops.sessions import Sessions
from tabadol.ops.store import StoreLimits, open_span_store, shown
from tabadol.ops.tls import ClientCertH11Protocol, server_context
from tabadol.ops.trust import OpsTrust

log = logging.getLogger("tabadol.ops")

RETENTION_INTERVAL_SECONDS = 60.0


def _split(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TabadolError(f"{what} address {address!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def certificate_names(cert_pem: bytes) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = list(san.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


class _EmbeddedUvicorn(uvicorn.Server):
    """Uvicorn without its own signal handling: the process that embeds it owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class OpsServer:
    """The ops console and span collector. ``await start()``; then ``http_url`` and
    ``otlp_address`` are bound. Both need ``trust``: there is no unauthenticated mode."""

    def __init__(
        self,
        db: str | Path,
        *,
        trust: OpsTrust,
        http: str = DEFAULT_HTTP,
        otlp: str = DEFAULT_OTLP,
        limits: StoreLimits | None = None,
        allowed_hosts: Iterable[str] = (),
        otlp_max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.trust = trust
        self.store = open_span_store(db, limits)
        self.collector = TraceCollector(self.store, trust)
        self._http = _split(http, "--http")
        self._otlp = otlp
        self._grpc = grpc.aio.server(options=server_options(otlp_max_request_bytes))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self.collector, self._grpc
        )
        self.sessions = Sessions()
        hosts = served_names(self._http[0], certificate_names(trust.cert_pem), allowed_hosts)
        self.access = ConsoleAccess(trust, self.sessions, hosts)
        self.app = create_app(self.store, self.access)
        self._uvicorn: uvicorn.Server | None = None
        self._web: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self.http_url = ""
        self.otlp_address = ""

    async def start(self) -> None:
        otlp_port = add_otlp_port(self._grpc, self._otlp, self.trust)
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
        context = server_context(self.trust)
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            http=ClientCertH11Protocol,
            ssl_context_factory=lambda _config, _default: context,
        )
        self._uvicorn = _EmbeddedUvicorn(config)
        self._web = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._web.done():
                self._web.result()  # raises what stopped it
            await asyncio.sleep(0.01)  # uvicorn offers no started event to await
        self.http_url = f"https://{host if ':' not in host else f'[{host}]'}:{bound}"
        self._retention = asyncio.create_task(self._retention_loop())

    def login_link(self, role: Role = "operator", name: str = "demo") -> str:
        """A one-time link that opens a session as ``role`` ``name`` in a browser without a
        certificate. Only for a console bound to loopback: anyone who can read the link can
        use it, so it must not work from another machine."""
        host = self._http[0]
        if not is_loopback(host):
            raise TabadolError(
                f"--http {host}: login links are only for a console bound to a loopback "
                "address; log in with a client certificate from the platform PKI instead"
            )
        if not self.http_url:
            raise TabadolError("the console is not started: no link to give yet")
        token = self.sessions.issue_token(role, name)
        return f"{self.http_url}/login?{urllib.parse.urlencode({'token': token})}"

    def show_exchange(self, cfg: BrokerConfig) -> None:
        """Everything a broker configuration gives the console: its ledger's views and the
        Access page on its registry."""
        self.show_ledger(accounts_of(cfg))
        self.manage_access(access_desk(cfg))

    def manage_access(self, desk: AccessDesk) -> None:
        """Serve the Access page through ``desk``; the console closes it when it stops."""
        self.app.state.desk = desk

    def show_ledger(self, accounts: Accounts) -> None:
        """Serve the dashboard and quarterly reports from this configuration's ledger; from
        now on only the agencies it declares may send spans or open the console."""
        self.trust.agencies = frozenset(accounts.config.agencies)
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
            accounts.close()
        desk: AccessDesk | None = self.app.state.desk
        if desk is not None:
            desk.close()
        self.store.close()


def open_accounts(config_path: Path) -> Accounts:
    """The ledger named by a broker configuration, opened read-only; one the broker has not
    written yet reads as empty until it appears."""
    from tabadol.registry.current import load_current

    return accounts_of(load_current(config_path))


def accounts_of(cfg: BrokerConfig) -> Accounts:
    from tabadol.ledger.store import LedgerMissing, LedgerWriteError, open_ledger

    try:
        return Accounts(cfg, open_ledger(cfg.ledger, readonly=True))
    except LedgerMissing as e:
        log.info("%s; the dashboard shows it once the broker writes it", e)
        return Accounts(cfg)
    except LedgerWriteError as e:
        where = "url" if cfg.ledger.url is not None else "path"
        raise TabadolError(f"{cfg.path}: [ledger] {where}: {e}") from e


def access_desk(cfg: BrokerConfig) -> AccessDesk:
    """The Access page's desk on the configuration's registry: its database, which the
    brokers follow, or the configuration file itself, read but never changed."""
    from tabadol.registry.store import open_registry

    url = cfg.registry.url
    return AccessDesk(open_registry(url) if url is not None else None, lambda: cfg)


async def run(
    config_path: Path,
    db: str | Path,
    http: str,
    otlp: str,
    limits: StoreLimits,
    allowed_hosts: Iterable[str] = (),
    login_link: bool = False,
    otlp_max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> None:
    """``tabadol ops --config``: the PKI and trust domain come from the broker's [broker]."""
    from tabadol.registry.current import load_current

    cfg = load_current(config_path)  # the agencies it admits are the registry's in force
    trust = OpsTrust.load(cfg.broker.pki_dir, cfg.broker.trust_domain)
    server = OpsServer(
        db,
        trust=trust,
        http=http,
        otlp=otlp,
        limits=limits,
        allowed_hosts=allowed_hosts,
        otlp_max_request_bytes=otlp_max_request_bytes,
    )
    server.show_exchange(cfg)
    link = ""
    await server.start()
    try:
        if login_link:
            link = server.login_link()
    except TabadolError:
        await server.stop()
        raise
    log.info(
        "ops console at %s; OTLP/gRPC collector (mTLS) on %s; spans in %s",
        server.http_url,
        server.otlp_address,
        shown(db),
    )
    print(
        f"Tabadol ops: {server.http_url} (client certificate from {cfg.broker.pki_dir}); "
        f"OTLP/gRPC with mTLS on {server.otlp_address}",
        flush=True,
    )
    if link:
        print(f"Log in as an operator, once, within 15 minutes: {link}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    following = asyncio.create_task(follow_registry(server, config_path, cfg))
    await stop.wait()
    following.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await following  # its registry connection closed
    await server.stop()


async def follow_registry(server: OpsServer, config_path: Path, cfg: BrokerConfig) -> None:
    """With a registry database, the console follows its versions as the brokers do (every
    ``poll_seconds``, at least every 5 s): an agency onboarded or removed there is admitted
    or refused here too, and the dashboard names agencies as the registry does."""
    from tabadol.registry.current import load_current
    from tabadol.registry.store import open_registry

    if cfg.registry.url is None:
        return
    store = open_registry(cfg.registry.url)
    seen = cfg.registry_version
    try:
        while True:
            await asyncio.sleep(min(cfg.registry.poll_seconds, 5.0))
            try:
                head = await asyncio.to_thread(store.head)
                if head is None or head.number == seen:
                    continue
                current = await asyncio.to_thread(load_current, config_path)
            except TabadolError as e:
                log.warning("the console keeps registry version %s: %s", seen, e)
                continue
            server.trust.agencies = frozenset(current.agencies)
            accounts: Accounts | None = server.app.state.accounts
            if accounts is not None:
                accounts.config = current
            seen = current.registry_version
    finally:
        await asyncio.to_thread(store.close)
