"""The broker process: a grpc.aio server, its provider channels, reload and shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio

from tabadol import config as config_module
from tabadol.broker.credentials import BrokerCredentials
from tabadol.broker.proxy import Identities, Proxy, Route
from tabadol.broker.tracing import BrokerTracing
from tabadol.client.tracing import SpanPipelineStats, TracingConfigError, tracer_provider
from tabadol.config import BrokerConfig
from tabadol.contracts import MethodContract, RpcKind
from tabadol.errors import ConfigError
from tabadol.policy import GrantRule, Policy
from tabadol.spiffe import agency_dns_name

log = logging.getLogger("tabadol.broker")


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
        self.config = cfg
        self.credentials = self._load_credentials(cfg)
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.tracing, self.span_stats = _tracing(cfg)
        self._dispatch = _Dispatch(self._build_proxy(cfg, self.credentials))
        self._server_cert_update: grpc.ServerCertificateConfiguration | None = None
        self._server = grpc.aio.server(options=_message_options(cfg.broker.max_message_bytes))
        self._server.add_generic_rpc_handlers((self._dispatch,))
        self.port = 0

    @staticmethod
    def _load_credentials(cfg: BrokerConfig) -> BrokerCredentials:
        return BrokerCredentials.load(cfg.broker.pki_dir, cfg.broker.trust_domain, cfg.path)

    def _server_credentials(self) -> grpc.ServerCredentials:
        def fetch_update() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC before each new handshake; a reload leaves the new identity here.
            update, self._server_cert_update = self._server_cert_update, None
            return update

        return grpc.dynamic_ssl_server_credentials(
            _certificate_configuration(self.credentials),
            cast(
                Callable[[], grpc.ServerCertificateConfiguration], fetch_update
            ),  # None = no change
            require_client_authentication=True,
        )

    async def start(self) -> None:
        listen = self.config.broker.listen
        try:
            self.port = self._server.add_secure_port(listen, self._server_credentials())
        except RuntimeError as e:
            await self._server.stop(None)
            raise ConfigError(
                f"{self.config.path}: [broker] listen: cannot bind {listen}: {e}"
            ) from e
        await self._server.start()

    def _channel(self, provider: str, endpoint: str, creds: BrokerCredentials) -> grpc.aio.Channel:
        key = (provider, endpoint)
        channel = self._channels.get(key)
        if channel is None:
            channel_creds = grpc.ssl_channel_credentials(
                creds.ca_pem, creds.key_pem, creds.cert_pem
            )
            options = [
                *_message_options(self.config.broker.max_message_bytes),
                # TLS checks that the endpoint holds *this* agency's certificate.
                (
                    "grpc.ssl_target_name_override",
                    agency_dns_name(self.config.broker.trust_domain, provider),
                ),
            ]
            channel = grpc.aio.secure_channel(endpoint, channel_creds, options=options)
            self._channels[key] = channel
        return channel

    def _build_proxy(self, cfg: BrokerConfig, creds: BrokerCredentials) -> Proxy:
        routes: dict[str, Route] = {}
        for svc in cfg.services.values():
            channels = [self._channel(svc.provider, e, creds) for e in svc.endpoints]
            for method in cfg.contracts.services[svc.name].methods.values():
                stubs = tuple(_bytes_stub(ch, method) for ch in channels)
                routes[method.path] = Route(method, svc.provider, tuple(svc.endpoints), stubs)
        policy = Policy.from_grants(
            (GrantRule(g.consumer, g.service, tuple(g.methods)) for g in cfg.grants), cfg.contracts
        )
        return Proxy(
            contracts=cfg.contracts,
            policy=policy,
            identities=Identities(cfg.broker.trust_domain, creds.revoked),
            routes=routes,
            agencies=frozenset(cfg.agencies),
            tracing=self.tracing,
        )

    def reload(self, cfg: BrokerConfig) -> None:
        """Switch to a new, already validated configuration; in-flight calls finish on the old."""
        for setting in ("listen", "trust_domain", "max_message_bytes"):
            if getattr(cfg.broker, setting) != getattr(self.config.broker, setting):
                raise ConfigError(
                    f"{cfg.path}: [broker] {setting} cannot change on reload; restart the broker"
                )
        if cfg.tracing != self.config.tracing:
            raise ConfigError(f"{cfg.path}: [tracing] cannot change on reload; restart the broker")
        creds = self._load_credentials(cfg)
        previous = self._channels
        if _identity(creds) != _identity(self.credentials):
            self._channels = {}  # a new broker identity: dial the providers afresh
            self._server_cert_update = _certificate_configuration(creds)
        proxy = self._build_proxy(cfg, creds)
        in_use = {(s.provider, e) for s in cfg.services.values() for e in s.endpoints}
        self._channels = {k: ch for k, ch in self._channels.items() if k in in_use}
        self.config, self.credentials, self._dispatch.proxy = cfg, creds, proxy
        grace = cfg.broker.shutdown_grace_seconds
        for key, channel in previous.items():
            if self._channels.get(key) is not channel:
                task = asyncio.get_running_loop().create_task(channel.close(grace))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace``, close channels."""
        await self._server.stop(
            self.config.broker.shutdown_grace_seconds if grace is None else grace
        )
        await asyncio.gather(*(ch.close() for ch in self._channels.values()))
        self._channels.clear()
        if self.tracing is not None:
            # Flush what is queued; bounded by the exporter's own timeout.
            await asyncio.to_thread(self.tracing.provider.shutdown)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _tracing(cfg: BrokerConfig) -> tuple[BrokerTracing | None, SpanPipelineStats | None]:
    settings = cfg.tracing
    if not settings.enabled:
        return None, None
    try:
        built = tracer_provider(
            "tabadol-broker",
            service_name=settings.service_name,
            sampler=settings.sampler,
            sampler_arg=settings.sampler_arg,
            exporter=settings.exporter,
            otlp_endpoint=settings.otlp_endpoint,
        )
    except TracingConfigError as e:
        raise ConfigError(f"{cfg.path}: [tracing] (or OTEL_* variables): {e}") from e
    if built is None:  # OTEL_SDK_DISABLED
        return None, None
    provider, stats = built
    return BrokerTracing(provider), stats


def _identity(creds: BrokerCredentials) -> tuple[bytes, bytes, bytes]:
    return creds.ca_pem, creds.cert_pem, creds.key_pem


def _certificate_configuration(creds: BrokerCredentials) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem
    )


def _bytes_stub(channel: grpc.aio.Channel, method: MethodContract) -> Any:
    """A multicallable with no serializers: payloads cross as the bytes they arrived as."""
    match method.kind:
        case RpcKind.UNARY:
            return channel.unary_unary(method.path)
        case RpcKind.SERVER_STREAMING:
            return channel.unary_stream(method.path)
        case RpcKind.CLIENT_STREAMING:
            return channel.stream_unary(method.path)
        case RpcKind.BIDI_STREAMING:
            return channel.stream_stream(method.path)


def _warn_if_crl_stale(broker: Broker) -> None:
    if broker.credentials.crl_is_stale():
        log.warning(
            "the CRL in %s was due for renewal at %s; run `tabadol pki crl` and SIGHUP the broker",
            broker.config.broker.pki_dir,
            broker.credentials.crl_next_update,
        )


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
    _warn_if_crl_stale(broker)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def reload() -> None:
        try:
            new = config_module.load(config_path)
            broker.reload(new)
        except ConfigError as e:
            log.error(
                "configuration reload refused; the previous configuration keeps serving:\n%s", e
            )
            return
        _warn_if_crl_stale(broker)
        log.info(
            "configuration reloaded from %s: %d agencies, %d services, %d grants, %d revoked certificates",
            new.path,
            len(new.agencies),
            len(new.services),
            len(new.grants),
            len(broker.credentials.revoked),
        )

    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info(
        "stopping: draining in-flight calls for up to %.0fs", cfg.broker.shutdown_grace_seconds
    )
    await broker.stop()
    log.info("broker stopped")
