"""The broker process: a grpc.aio server, its provider channels, reload and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio
from cryptography import x509

from tabadol import config as config_module
from tabadol.access.desk import AccessDesk
from tabadol.access.service import AccessService
from tabadol.admission import Identities
from tabadol.broker import platform
from tabadol.broker.credentials import BrokerCredentials
from tabadol.broker.metrics import BrokerMetrics
from tabadol.broker.provider_trust import ProviderTrust
from tabadol.broker.proxy import Accounting, Drain, Proxy
from tabadol.broker.registry_follower import RegistryFollower
from tabadol.broker.supervisor import follow_supervisor, worker_slot
from tabadol.broker.tracing import NO_TRACING, BrokerTracing, broker_tracing
from tabadol.broker.upstream import Route, Target, Upstream
from tabadol.client.call_status import keep_call_status
from tabadol.client.tracing import ExporterCredentials
from tabadol.config import BrokerConfig, GatewaySection, grant_id
from tabadol.errors import ConfigError, TabadolError
from tabadol.ledger import LedgerWriter
from tabadol.ledger.digests import payload_digest_key
from tabadol.ledger.journal import journal_path
from tabadol.ledger.seal import Sealer
from tabadol.ledger.signers import signer_check
from tabadol.ledger.store import LedgerMissing, LedgerWriteError, open_ledger
from tabadol.ledger.timestamper import Timestamper, read_tsa_certificate
from tabadol.ledger.verify import anchor_path
from tabadol.ledger.writer import RecordsLost
from tabadol.limits import (
    ANY_OTHER,
    UNDECLARED_BURST,
    UNDECLARED_RATE,
    LimitRule,
    Limits,
    RetryBudget,
)
from tabadol.platform.v1 import access_pb2_grpc
from tabadol.policy import GrantRule, Policy, purpose_header
from tabadol.protocol import KEEPALIVE_DIAL, KEEPALIVE_LISTEN
from tabadol.refusals import RefusalLog
from tabadol.registry.store import open_registry
from tabadol.reloading import reload_refusals
from tabadol.revocation import CrlRefused, RevocationList
from tabadol.samplers import TracingConfigError
from tabadol.spiffe import agency_dns_name, ops_dns_name
from tabadol.state_files import read_regular, replace_file

if TYPE_CHECKING:
    from tabadol.gateway.server import GatewayServer

log = logging.getLogger("tabadol.broker")

UpstreamKey = tuple[str, str]  # (provider agency, endpoint)


def _message_options(max_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ]


class _Dispatch(grpc.GenericRpcHandler):
    """Looks up the current configuration's handler; a reload swaps ``proxy`` in one step."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        return self.proxy.handler_for(handler_call_details.method)


class Broker:
    """A running broker. Build with a validated config, then ``await start()``."""

    def __init__(self, cfg: BrokerConfig) -> None:
        # Relay the status a provider sent, not grpc.aio's INTERNAL when a write races it.
        keep_call_status()
        # With a registry database, its current version's entries (or the one this node kept).
        self.registry = RegistryFollower.for_config(cfg)
        if self.registry is not None:
            cfg = self.registry.first(cfg)
        self.config = cfg
        # The newest CRL this broker ever accepted: an older one is refused even across
        # restarts (a rollback would un-revoke).
        held = held_crl(cfg)
        self.credentials = self._load_credentials(cfg, held=held)
        keep_crl(cfg, self.credentials.crl, held)  # beside the ledger, before it is written
        self._closing: set[asyncio.Task[None]] = set()
        self._refusals = RefusalLog(log)
        self.tracing = _tracing(cfg, self.credentials)
        self.metrics = BrokerMetrics()
        self.metrics.configure(cfg.agencies)
        # Limits and the retry budget outlive reloads: calls in flight still count.
        self.limits = Limits(time.monotonic)
        self.limits.configure(_limit_rules(cfg))
        self.retries = RetryBudget(cfg.broker.retry_budget_ratio)
        self.drain = Drain()
        self.timestamper = _timestamper(cfg)  # RFC 3161 timestamps of seals, off the call path
        self.ledger = _ledger(cfg, self.credentials)
        self.instance = cfg.broker.instance or f"{socket.gethostname()}:{os.getpid()}"
        self._metrics_task: asyncio.Task[None] | None = None
        self._crl_warned = -_CRL_WARN_EVERY_S
        self.provider_trust = ProviderTrust(cfg.broker.trust_domain)
        self._trust_task: asyncio.Task[None] | None = None
        self._upstreams = self._plan_upstreams(cfg, self.credentials, {})
        self._dispatch = _Dispatch(self._build_proxy(cfg, self.credentials, self._upstreams))
        self._server_cert_update: grpc.ServerCertificateConfiguration | None = None
        self._server = grpc.aio.server(
            options=[
                *_message_options(cfg.broker.max_message_bytes),
                *KEEPALIVE_LISTEN,
                ("grpc.max_concurrent_streams", cfg.broker.max_concurrent_streams),
            ]
        )
        # Each agency's OpenAPI document, for Discovery and the HTTP entry alike.
        self.openapi = platform.OpenAPIDocuments(lambda: self.gateway_url)
        # The broker's own services first: the proxy answers every other path.
        self.health = platform.register(
            self._server,
            lambda: self._dispatch.proxy,
            cfg.broker.health_check_seconds,
            revocations=lambda: self.credentials.crl,
            openapi=self.openapi,
        )
        access_pb2_grpc.add_AccessServicer_to_server(
            AccessService(lambda: self._dispatch.proxy, self._access_desk, self.applied),
            self._server,
        )
        self._server.add_generic_rpc_handlers((self._dispatch,))
        self._desk: AccessDesk | None = None
        self._reloaded: asyncio.Event | None = None
        self.port = 0
        self.gateway: GatewayServer | None = None  # the HTTP entry, with [gateway]

    def _access_desk(self) -> AccessDesk:
        """The Access service's desk: on the registry database, through a connection of its
        own (a change waiting for the registry's lock holds up no follower read); on the
        configuration file, reads only."""
        if self._desk is None:
            url = self.config.registry.url
            store = open_registry(url) if url is not None else None
            self._desk = AccessDesk(store, lambda: self.config)
        return self._desk

    @property
    def gateway_port(self) -> int:
        """The HTTP entry's bound port; 0 without one."""
        return self.gateway.port if self.gateway is not None else 0

    @property
    def gateway_url(self) -> str | None:
        """How agencies reach the HTTP entry: ``[gateway] public_url``, else the address it
        listens on; None without one."""
        settings = self.config.gateway
        if settings is None or self.gateway is None:
            return None
        if settings.public_url:
            return settings.public_url
        host = settings.listen.rpartition(":")[0]
        return f"https://{host}:{self.gateway_port}"

    async def applied(self, version: int, timeout: float) -> bool:
        """Wait, at most ``timeout`` seconds, until this node runs registry ``version`` or a
        later one; whether it does."""
        deadline = time.monotonic() + timeout
        while (self.config.registry_version or 0) < version:
            if self._reloaded is None:
                self._reloaded = asyncio.Event()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):  # not wait_for: see registry_follower
                    await self._reloaded.wait()
        return True

    def _end_ungranted(self) -> None:
        """End the calls in flight that their grant no longer admits: revoked by a new
        registry version, or expired (checked every second)."""
        if not self.drain.calls:
            return
        ended = self.drain.calls.end_ungranted(self._dispatch.proxy.rules.policy, time.time())
        if ended:
            log.warning("ended %d call(s) in flight whose grant was revoked or expired", ended)

    def refresh_metrics(self) -> None:
        """The ledger's and the span pipeline's counts, into the metrics (every second)."""
        self._end_ungranted()
        self._watch_crl()
        self.metrics.refresh(
            backlog=self.ledger.backlog,
            accepting=self.ledger.accepting and self.ledger.problem is None,
            written=self.ledger.written,
            dropped=self.tracing.dropped(),
            export_failed=self.tracing.export_failed(),
            in_flight=self.drain.in_flight,
        )
        if self.timestamper is not None:
            self.metrics.ledger_untimestamped.set(self.timestamper.backlog)

    def _watch_crl(self) -> None:
        """Warn well before the CRL goes stale, and loudly once it has (once an hour)."""
        crl = self.credentials.crl
        if crl is None:
            return
        left = crl.seconds_left(dt.datetime.now(dt.UTC))
        self.metrics.crl_seconds_left.set(left)
        if left <= 0 and self.config.broker.stale_crl == "refuse" and self.drain.calls:
            # Fail closed for the calls in flight too: none of their certificates is vouched for.
            ended = self.drain.calls.end_all(
                "the exchange's certificate revocation list went stale during the call"
            )
            if ended:
                log.error("ended %d call(s) in flight: the CRL went stale", ended)
        warn_from = self.config.broker.crl_warn_hours * 3600
        if left > warn_from or time.monotonic() - self._crl_warned < _CRL_WARN_EVERY_S:
            return
        self._crl_warned = time.monotonic()
        pki = self.config.broker.pki_dir
        if left > 0:
            log.warning(
                "the CRL in %s goes stale in %.1f hours (%s UTC): run `tabadol pki crl` and "
                "SIGHUP the broker before then%s",
                pki,
                left / 3600,
                f"{crl.next_update:%Y-%m-%d %H:%M}",
                ", or every call will be refused"
                if self.config.broker.stale_crl == "refuse"
                else "",
            )
        elif self.config.broker.stale_crl == "refuse":
            log.error(
                "the CRL in %s went stale at %s UTC: every call is refused until a fresh one "
                "is loaded (`tabadol pki crl`, then SIGHUP)",
                pki,
                f"{crl.next_update:%Y-%m-%d %H:%M}",
            )
        else:
            log.error(
                "the CRL in %s went stale at %s UTC; serving on with it ([broker] stale_crl = "
                '"serve"): revocations since then are not enforced',
                pki,
                f"{crl.next_update:%Y-%m-%d %H:%M}",
            )

    async def _check_providers_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.broker.health_check_seconds)
            try:
                await self.provider_trust.check(self._upstreams.values(), self.credentials)
            except Exception:
                log.exception("checking the providers' certificates failed; trying again")

    async def _refresh_metrics_forever(self) -> None:
        while True:
            try:
                self.refresh_metrics()
            except Exception:
                log.exception("refreshing the metrics failed; trying again")
            await asyncio.sleep(1.0)

    @staticmethod
    def _load_credentials(
        cfg: BrokerConfig, held: RevocationList | None = None
    ) -> BrokerCredentials:
        return BrokerCredentials.load(
            cfg.broker.pki_dir, cfg.broker.trust_domain, cfg.path, held=held
        )

    def _server_credentials(self) -> grpc.ServerCredentials:
        def fetch_update() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC before each new handshake; a reload leaves the new identity here.
            update, self._server_cert_update = self._server_cert_update, None
            return update

        return grpc.dynamic_ssl_server_credentials(
            _certificate_configuration(self.credentials),
            cast(Callable[[], grpc.ServerCertificateConfiguration], fetch_update),  # None: same
            require_client_authentication=True,
        )

    async def start(self) -> None:
        listen = self.config.broker.listen
        try:
            self.port = self._server.add_secure_port(listen, self._server_credentials())
        except RuntimeError as e:
            await self._abandon()
            raise ConfigError(
                f"{self.config.path}: [broker] listen: cannot bind {listen}: {e}"
            ) from e
        # Revocation on the provider leg: no call goes to an endpoint not yet judged.
        await self.provider_trust.check(self._upstreams.values(), self.credentials)
        await self._server.start()
        if self.config.gateway is not None:
            await self._start_gateway(self.config.gateway)
        await self.health.start()
        self._metrics_task = asyncio.create_task(self._refresh_metrics_forever())
        if self.timestamper is not None:
            self.timestamper.start()
        self._trust_task = asyncio.create_task(self._check_providers_forever())
        if self.config.broker.metrics_listen is not None and worker_slot() is None:
            try:
                self.metrics.serve(
                    self.config.broker.metrics_listen,
                    lambda: self.credentials,  # certificate and revocations follow reloads
                    self.config.broker.trust_domain,
                )
            except ConfigError as e:
                await self._abandon()
                raise ConfigError(f"{self.config.path}: {e}") from e
            except OSError as e:
                await self._abandon()
                raise ConfigError(
                    f"{self.config.path}: [broker] metrics_listen: cannot listen on "
                    f"{self.config.broker.metrics_listen}: {e.strerror}"
                ) from e
        if self.registry is not None:
            await self.registry.start(self)

    async def _start_gateway(self, settings: GatewaySection) -> None:
        """The HTTP entry: Connect and REST/JSON into the same request path."""
        from tabadol.gateway.app import GatewayApp  # only with [gateway]
        from tabadol.gateway.server import GatewayServer, tls_context

        app = GatewayApp(
            lambda: self._dispatch.proxy,
            max_body_bytes=lambda: settings.max_body_bytes or self.config.broker.max_message_bytes,
            max_json_depth=lambda: settings.max_json_depth,
            openapi=self.openapi,
        )
        try:
            self.gateway = GatewayServer(
                app,
                settings.listen,
                tls_context(self.credentials),
                self.config.broker.max_concurrent_streams,
            )
            await self.gateway.start(reuse_port=worker_slot() is not None)
        except ConfigError as e:
            await self._abandon()
            raise ConfigError(f"{self.config.path}: {e}") from e

    async def _abandon(self) -> None:
        """Undo a start that failed half-way, so the process can report it and exit."""
        if self.gateway is not None:
            await self.gateway.stop(0)
        await self._server.stop(None)
        await asyncio.to_thread(self.ledger.close)

    def _plan_upstreams(
        self,
        cfg: BrokerConfig,
        creds: BrokerCredentials,
        current: Mapping[UpstreamKey, Upstream],
    ) -> dict[UpstreamKey, Upstream]:
        """The provider endpoints ``cfg`` needs: kept from ``current`` where unchanged, else new.

        Nothing is closed here, so a configuration that fails later changes nothing.
        """
        channel_creds = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
        planned: dict[UpstreamKey, Upstream] = {}
        for svc in cfg.services.values():
            for endpoint in svc.endpoints:
                key = (svc.provider, endpoint)
                if key in planned:
                    continue
                if key in current:
                    planned[key] = current[key]
                    continue
                options = [
                    *_message_options(cfg.broker.max_message_bytes),
                    *KEEPALIVE_DIAL,
                    # TLS checks that the endpoint holds *this* agency's certificate.
                    (
                        "grpc.ssl_target_name_override",
                        agency_dns_name(cfg.broker.trust_domain, svc.provider),
                    ),
                ]
                channel = grpc.aio.secure_channel(endpoint, channel_creds, options=options)
                planned[key] = Upstream(svc.provider, endpoint, channel, self._closing)
            for endpoint in svc.endpoints:
                planned[
                    (svc.provider, endpoint)
                ].health.eject_after = cfg.broker.eject_after_failures
        return planned

    def _build_proxy(
        self,
        cfg: BrokerConfig,
        creds: BrokerCredentials,
        upstreams: Mapping[UpstreamKey, Upstream],
    ) -> Proxy:
        routes: dict[str, Route] = {}
        for svc in cfg.services.values():
            targets = [upstreams[(svc.provider, e)] for e in svc.endpoints]
            for method in cfg.contracts.services[svc.name].methods.values():
                stubs = tuple(Target(upstream, upstream.stub(method)) for upstream in targets)
                routes[method.path] = Route(
                    method,
                    svc.provider,
                    stubs,
                    max_message_bytes=svc.max_message_bytes,
                    max_stream_seconds=svc.max_stream_seconds or cfg.broker.max_stream_seconds,
                    stream_idle_seconds=svc.stream_idle_seconds or cfg.broker.stream_idle_seconds,
                )
        policy = Policy.from_grants(
            (
                GrantRule(
                    g.consumer,
                    g.service,
                    tuple(g.methods),
                    grant_id(g),
                    purpose_header(g.purpose_reference, g.purpose),
                    g.expires_at.timestamp() if g.expires_at is not None else None,
                )
                for g in cfg.grants
            ),
            cfg.contracts,
        )
        return Proxy(
            contracts=cfg.contracts,
            identities=Identities(
                cfg.broker.trust_domain,
                creds.revoked,
                stale_at=(
                    creds.crl.next_update.timestamp()
                    if creds.crl is not None and cfg.broker.stale_crl == "refuse"
                    else None
                ),
            ),
            policy=policy,
            routes=routes,
            config=cfg,
            accounting=Accounting(
                instance=self.instance,
                metrics=self.metrics,
                tracing=self.tracing,
                ledger=self.ledger,
                payload_digests=cfg.ledger.payload_digests,
                limits=self.limits,
                retries=self.retries,
                drain=self.drain,
                registry=self.registry.freshness if self.registry is not None else None,
            ),
            refusals=self._refusals,
        )

    def reload(self, cfg: BrokerConfig) -> None:
        """Switch to a new, already validated configuration; in-flight calls finish on the old.

        Provider channels that the new configuration no longer uses close once their last
        call has ended, however long that takes.
        """
        refusals = reload_refusals(self.config, cfg)
        if refusals:
            raise ConfigError("\n".join(refusals))
        # The CRL only moves forward: an older one put back is refused with the whole reload.
        creds = self._load_credentials(cfg, held=self.credentials.crl)
        identity_changed = _identity(creds) != _identity(self.credentials)
        # A new broker identity means dialing every provider afresh with it.
        upstreams = self._plan_upstreams(cfg, creds, {} if identity_changed else self._upstreams)
        for key, upstream in upstreams.items():
            # What an endpoint presents does not depend on who dials it: a channel made anew
            # for a new broker identity starts from the last judgement, with no gap in service.
            before = self._upstreams.get(key)
            if before is not None and upstream is not before:
                upstream.presented = before.presented
        proxy = self._build_proxy(cfg, creds, upstreams)
        exporter_creds = _exporter_credentials(cfg, creds) if identity_changed else None
        keep_crl(cfg, creds.crl, self.credentials.crl)  # not kept: the reload is refused
        # Everything is built: commit in one step.
        retired = [u for key, u in self._upstreams.items() if upstreams.get(key) is not u]
        self.config, self.credentials, self._upstreams = cfg, creds, upstreams
        self._crl_warned = -_CRL_WARN_EVERY_S  # a new CRL: say at once if it is due soon
        # The new CRL applies at once to what each endpoint last presented; endpoints new to
        # this configuration are checked now, and get no calls until they pass.
        self.provider_trust.rejudge(upstreams.values(), creds)
        unchecked = [u for u in upstreams.values() if u.presented is None]
        if unchecked:
            task = asyncio.get_running_loop().create_task(
                self.provider_trust.check(unchecked, creds)
            )
            self._closing.add(task)  # awaited at stop, like channel closes
            task.add_done_callback(self._closing.discard)
        self._dispatch.proxy = proxy
        if self._reloaded is not None:  # wake whoever waits for a registry version
            self._reloaded.set()
            self._reloaded = None
        # Identity was checked when each call started: the calls a newly revoked certificate
        # still holds open end now, not when they would have.
        ended = self.drain.calls.end_revoked(creds.revoked)
        if ended:
            log.warning("ended %d call(s) in flight whose certificate the new CRL revokes", ended)
        self._end_ungranted()
        self.metrics.configure(cfg.agencies)
        self.limits.configure(_limit_rules(cfg))
        self.retries.ratio = cfg.broker.retry_budget_ratio
        if identity_changed:
            self._server_cert_update = _certificate_configuration(creds)
            if self.gateway is not None:
                self.gateway.reload(creds)
            if exporter_creds is not None:
                # The old certificate is revoked as superseded: the collector would refuse it.
                self.tracing.renew_credentials(exporter_creds)
            self.ledger.use_sealer(Sealer(creds.key_pem, creds.cert_pem))
        for upstream in retired:
            upstream.retire()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace``, close channels."""
        if grace is None:
            grace = self.config.broker.shutdown_grace_seconds
        # Drain: refuse new calls (UNAVAILABLE, safe to retry elsewhere), report NOT_SERVING so
        # load balancers move away, let the calls in flight finish within the grace period,
        # and only then stop the server, cutting whatever is left.
        ends = time.monotonic() + grace
        self.drain.active = True
        if self.registry is not None:
            await self.registry.stop()  # no registry version applies mid-shutdown
        await self.health.stop()
        for task in (self._metrics_task, self._trust_task):
            if task is not None:
                task.cancel()
        if not await self.drain.wait_idle(grace):
            log.warning(
                "%d calls still in flight after the %.0f s grace period; cutting them",
                self.drain.in_flight,
                grace,
            )
        # A call is done for the broker a moment before gRPC has sent its answer: a short
        # window lets those answers go out (stop returns as soon as every call has ended).
        # Not the whole rest of the grace period: health Watch and reflection streams never
        # end by themselves.
        last_answers = min(_LAST_ANSWERS_S, max(0.0, ends - time.monotonic()))
        if self.gateway is not None:
            await self.gateway.stop(last_answers)
        await self._server.stop(last_answers)
        for upstream in self._upstreams.values():
            upstream.retire()
        await asyncio.gather(*list(self._closing))
        # Calls the server cut off at the end of the grace period may not have released
        # their endpoint yet; the process is ending, so close what is left regardless.
        await asyncio.gather(*(u.channel.close() for u in self._upstreams.values() if u.in_flight))
        if self._desk is not None:
            await asyncio.to_thread(self._desk.close)
        # Every record of every call is written (or journaled) before the process goes;
        # RecordsLost, raised once the rest has stopped, says how many could not be.
        if self.timestamper is not None:
            await asyncio.to_thread(self.timestamper.close)
        try:
            await asyncio.to_thread(self.ledger.close)
        finally:
            self.metrics.stop()
            # Flush what is queued; bounded by the exporter's own timeout.
            await asyncio.to_thread(self.tracing.shutdown)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


_LAST_ANSWERS_S = 1.0
_CRL_WARN_EVERY_S = 3600.0


def _held_crl_path(cfg: BrokerConfig) -> Path:
    """Beside the ledger: the broker's own state, not the PKI directory a rollback writes."""
    return cfg.ledger.path.with_name(cfg.ledger.path.name + ".crl")


def held_crl(cfg: BrokerConfig) -> RevocationList | None:
    """The newest CRL this broker accepted before (checked against the CA); None on a first
    start. ConfigError when it is missing, damaged or not a plain file: without it an older
    crl.pem would be taken, so the broker does not start."""
    path = _held_crl_path(cfg)
    recover = (
        f"restore it, or, once you have checked that {cfg.broker.pki_dir / 'crl.pem'} is the "
        "newest the CA published, copy it there"
    )
    try:
        data = read_regular(path)
    except FileNotFoundError:
        if not _ledger_has_run(cfg):
            return None  # a first start: the broker keeps it now
        raise ConfigError(
            f"{cfg.path}: {path} is missing but this ledger has run before: {recover}"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"{cfg.path}: cannot read the CRL this broker kept, {path}: "
            f"{e.strerror or e}; {recover}"
        ) from e
    try:
        ca = x509.load_pem_x509_certificate((cfg.broker.pki_dir / "ca.crt").read_bytes())
    except (OSError, ValueError):
        return None  # the credentials' own check names ca.crt's problem
    try:
        return RevocationList.from_bytes(data, ca)
    except CrlRefused as e:
        raise ConfigError(
            f"{cfg.path}: {path} is not a CRL of this exchange's CA ({e}): {recover}"
        ) from e


def _ledger_has_run(cfg: BrokerConfig) -> bool:
    """Whether this node has written its ledger before (its chain has writer sessions)."""
    try:
        store = open_ledger(cfg.ledger, readonly=True)
    except LedgerMissing:
        return False
    except LedgerWriteError as e:
        raise ConfigError(f"{cfg.path}: [ledger] {_where(cfg)}: {e}") from e
    try:
        mine = store.chain_for(cfg.broker.instance or "")
        return any(store.chain_for(s.instance) == mine for s in store.sessions())
    finally:
        store.close()


def keep_crl(cfg: BrokerConfig, crl: RevocationList | None, held: RevocationList | None) -> None:
    """Remember the newest CRL accepted, so that no restart can go back to an older one;
    ConfigError if it cannot be kept (the next start would refuse to go on without it)."""
    if crl is None or (held is not None and held.number >= crl.number):
        return
    path = _held_crl_path(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, crl.der, 0o600)
    except OSError as e:
        raise ConfigError(
            f"{cfg.path}: cannot keep the CRL in {path} ({e.strerror or e}): without it a "
            "restart could accept an older one"
        ) from e


def _exporter_credentials(cfg: BrokerConfig, creds: BrokerCredentials) -> ExporterCredentials:
    """The broker's identity as loaded (not read again: one identity on every leg)."""
    return ExporterCredentials(
        creds.ca_pem, creds.cert_pem, creds.key_pem, ops_dns_name(cfg.broker.trust_domain)
    )


def _tracing(cfg: BrokerConfig, creds: BrokerCredentials) -> BrokerTracing:
    """The broker's tracing (NO_TRACING when off); it exports over mTLS with the broker's own
    certificate, to a collector that must prove it is ``ops.<trust domain>``
    (docs/tracing.md)."""
    try:
        return broker_tracing(cfg.tracing, _exporter_credentials(cfg, creds)) or NO_TRACING
    except TracingConfigError as e:
        raise ConfigError(f"{cfg.path}: [tracing] (or OTEL_* variables): {e}") from e


def _limit_rules(cfg: BrokerConfig) -> list[LimitRule]:
    """The [[limit]] entries, and for every agency without a concurrency limit over all its
    services, the broker's default one (so no agency holds unbounded calls in flight).
    Agencies the registry does not declare, whose every call is refused, get the default
    concurrency and a refusal rate (ANY_OTHER): a flood of refusals costs the flooder."""
    default = cfg.broker.consumer_concurrency
    overall = {lim.consumer for lim in cfg.limits if lim.service is None}
    rules = [
        LimitRule(
            lim.consumer,
            lim.service,
            lim.rate,
            lim.burst,
            lim.concurrency if lim.concurrency is not None or lim.service else default,
        )
        for lim in cfg.limits
    ]
    rules += [
        LimitRule(agency, None, None, None, default)
        for agency in cfg.agencies
        if agency not in overall
    ]
    rules.append(LimitRule(ANY_OTHER, None, UNDECLARED_RATE, UNDECLARED_BURST, default))
    return rules


def _ledger(cfg: BrokerConfig, creds: BrokerCredentials) -> LedgerWriter:
    settings = cfg.ledger
    key = payload_digest_key(cfg.broker.pki_dir) if settings.payload_digests else None
    try:
        store = open_ledger(settings)
    except LedgerWriteError as e:
        raise ConfigError(f"{cfg.path}: [ledger] {_where(cfg)}: {e}") from e
    # The journal's lines count only if signed by a broker certificate of this exchange's
    # CA, valid when it signed and not revoked: its signer writes their time itself, so a
    # certificate revoked for cause counts at no time; a superseded one keeps its grace.
    journal_signers = signer_check(
        ca_cert=x509.load_pem_x509_certificate(creds.ca_pem),
        trust_domain=cfg.broker.trust_domain,
        revoked_at=(
            creds.crl.signer_dated_signatures_count_until() if creds.crl is not None else {}
        ),
    )
    try:
        return LedgerWriter(
            store,
            Sealer(creds.key_pem, creds.cert_pem),
            batch_interval_s=settings.batch_interval_ms / 1000,
            buffer_records=settings.buffer_records,
            max_unwritten_s=settings.max_unwritten_seconds,
            strict=settings.mode == "strict",
            anchor=anchor_path(settings.path),
            journal=journal_path(settings.path),
            journal_signers=journal_signers,
            instance=cfg.broker.instance or f"{socket.gethostname()}:{os.getpid()}",
            digest_key=key,
        )
    except LedgerWriteError as e:
        store.close()
        raise ConfigError(f"{cfg.path}: [ledger] {_where(cfg)}: {e}") from e


def _timestamper(cfg: BrokerConfig) -> Timestamper | None:
    """With ``[ledger] tsa_url``: a timestamper of this node's chain, on its own handle."""
    settings = cfg.ledger
    if settings.tsa_url is None or settings.tsa_certificate is None:
        return None
    try:
        pem = read_tsa_certificate(settings.tsa_certificate)
        store = open_ledger(settings)
    except (TabadolError, LedgerWriteError) as e:
        raise ConfigError(f"{cfg.path}: {e}") from e
    chain = store.chain_for(cfg.broker.instance or f"{socket.gethostname()}:{os.getpid()}")
    return Timestamper(store, chain, settings.tsa_url, pem)


def _where(cfg: BrokerConfig) -> str:
    return "url" if cfg.ledger.url is not None else "path"


def _identity(creds: BrokerCredentials) -> tuple[bytes, bytes, bytes]:
    return creds.ca_pem, creds.cert_pem, creds.key_pem


def _certificate_configuration(creds: BrokerCredentials) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem
    )


def reload_from_file(broker: Broker, config_path: Path) -> bool:
    """SIGHUP: load the configuration (and with it the CRL) again and switch to it, logging
    the outcome; on any error the previous configuration keeps serving (False)."""
    try:
        new = config_module.load(config_path)
        if broker.registry is not None:  # the file's settings, the registry database's entries
            new = broker.registry.over(new)
        broker.reload(new)
    except TabadolError as e:
        log.error("configuration reload refused; the previous configuration keeps serving:\n%s", e)
        return False
    except Exception:
        log.exception("configuration reload failed; the previous configuration keeps serving")
        return False
    log.info(
        "configuration reloaded from %s: %d agencies, %d services, %d grants, "
        "%d revoked certificates",
        new.path,
        len(new.agencies),
        len(new.services),
        len(new.grants),
        len(broker.credentials.revoked),
    )
    return True


async def run(config_path: Path) -> None:
    """Run a broker until SIGTERM or SIGINT; SIGHUP reloads the configuration and CRL."""
    broker = Broker(config_module.load(config_path))
    await broker.start()
    cfg = broker.config
    log.info(
        "broker listening on %s (trust domain %s): %d agencies, %d services, %d grants",
        cfg.broker.listen.rsplit(":", 1)[0] + f":{broker.port}",
        cfg.broker.trust_domain,
        len(cfg.agencies),
        len(cfg.services),
        len(cfg.grants),
    )
    if broker.metrics.port:
        host = (cfg.broker.metrics_listen or "").rsplit(":", 1)[0]
        log.info("metrics at https://%s:%d/metrics", host, broker.metrics.port)
    if broker.gateway_url is not None:
        log.info("HTTP/JSON entry (Connect and REST) at %s", broker.gateway_url)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload_from_file, broker, config_path)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    follow_supervisor(stopping.set)
    await stopping.wait()
    loop.remove_signal_handler(signal.SIGHUP)  # no reload can open channels mid-shutdown
    grace = cfg.broker.shutdown_grace_seconds
    log.info("stopping: draining in-flight calls for up to %.0fs", grace)
    try:
        await broker.stop()
    except RecordsLost:
        log.error("broker stopped, and lost records of answered calls (below)")
        raise  # `tabadol broker` prints it and exits non-zero
    log.info("broker stopped")
