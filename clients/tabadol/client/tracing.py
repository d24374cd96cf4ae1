"""OpenTelemetry tracing set-up, configured the standard way (``OTEL_*`` variables).

Explicit arguments win over the environment; the environment wins over the defaults:
service name ``OTEL_SERVICE_NAME``, sampler ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``
(default ``parentbased_always_on``), exporter ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``
or ``none``), OTLP endpoint and friends ``OTEL_EXPORTER_OTLP_*`` (default localhost:4317),
batching ``OTEL_BSP_*``. ``OTEL_SDK_DISABLED=true`` turns tracing off.

The exchange's collector (``tabadol ops``) takes spans only over mTLS from the broker and
agencies: given ``credentials`` (an agency's credentials directory, say), spans go to an
``https://`` endpoint (default https://localhost:4317) with that certificate, and the
collector must prove it is ``ops.<trust domain>`` of the same CA. The standard
``OTEL_EXPORTER_OTLP_CERTIFICATE`` / ``_CLIENT_KEY`` / ``_CLIENT_CERTIFICATE`` variables, when
set, win over ``credentials``; an ``http://`` endpoint exports in plaintext, for a collector
of your own.

Export runs on the SDK's batch processor thread with a bounded queue: a slow or dead
collector never blocks a call; spans that do not fit are dropped and counted.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from tabadol.client.credentials import AgencyCredentials
from tabadol.samplers import (
    DEFAULT_SAMPLER,
    check_exporter,
    parse_sampler,
)
from tabadol.spiffe import ops_dns_name

DEFAULT_TLS_ENDPOINT = "https://localhost:4317"
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# The SDK reads these itself when set, and then they decide the exporter's TLS.
_CERTIFICATE_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE")
# The SDK's own switch for counting what its processors drop and its exporters fail.
_INTERNAL_METRICS = "OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED"


def make_sampler(name: str, arg: str | None) -> Sampler:
    """The sampler the OpenTelemetry spec names ``name`` (as in ``OTEL_TRACES_SAMPLER``)."""
    name, ratio = parse_sampler(name, arg)
    root: Sampler = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
    }[name.removeprefix("parentbased_")]
    return ParentBased(root) if name.startswith("parentbased_") else root


class RenewableExporter(SpanExporter):
    """An OTLP exporter whose certificate can be renewed while the process runs.

    The collector refuses a revoked certificate, and renewing the broker's certificate
    revokes the old one: without this, a broker reloaded onto its new certificate would go
    on exporting with the old one, and lose its spans until restarted.
    """

    def __init__(
        self,
        build: Callable[[ExporterCredentials], SpanExporter | None],
        credentials: ExporterCredentials,
    ) -> None:
        self._build = build
        inner = build(credentials)
        assert inner is not None
        self._inner: SpanExporter = inner

    def renew(self, credentials: ExporterCredentials) -> None:
        """Export with ``credentials`` from the next batch on."""
        fresh = self._build(credentials)
        if fresh is None:
            return
        old, self._inner = self._inner, fresh
        old.shutdown()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._inner.export(spans)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self._inner.shutdown()


class SpanPipelineStats:
    """What the SDK's processor and exporter report about themselves (exported, dropped),
    and the exporter, when its credentials can be renewed (``renew_credentials``)."""

    def __init__(
        self, reader: InMemoryMetricReader, exporter: RenewableExporter | None = None
    ) -> None:
        self._reader = reader
        self._exporter = exporter

    def renew_credentials(self, credentials: ExporterCredentials) -> None:
        """After a certificate renewal: export with the new one (no-op without mTLS)."""
        if self._exporter is not None:
            self._exporter.renew(credentials)

    def _sum(self, metric_name: str, errors: bool) -> int:
        data = self._reader.get_metrics_data()
        total = 0
        for resource_metrics in data.resource_metrics if data else ():
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != metric_name:
                        continue
                    for point in metric.data.data_points:
                        if ("error.type" in (point.attributes or {})) == errors:
                            total += int(getattr(point, "value", 0))
        return total

    def dropped(self) -> int:
        """Spans the batch processor dropped because its queue was full."""
        return self._sum("otel.sdk.processor.span.processed", errors=True)

    def exported(self) -> int:
        return self._sum("otel.sdk.exporter.span.exported", errors=False)

    def export_failed(self) -> int:
        """Spans the exporter gave up on (collector down or refusing)."""
        return self._sum("otel.sdk.exporter.span.exported", errors=True)


@dataclass(frozen=True)
class ExporterCredentials:
    """The sender's certificate and key for mTLS to the collector, the CA its certificate
    must chain to, and the name it must carry (``ops.<trust domain>``; None: the host's)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)  # never in a log line or a traceback
    server_name: str | None = None

    @classmethod
    def of(
        cls, credentials: ExporterCredentials | AgencyCredentials | str | Path
    ) -> ExporterCredentials:
        """From an agency's credentials (or their directory), or as given."""
        if isinstance(credentials, ExporterCredentials):
            return credentials
        if not isinstance(credentials, AgencyCredentials):
            credentials = AgencyCredentials.load(credentials)
        return cls(
            credentials.ca_pem,
            credentials.cert_pem,
            credentials.key_pem,
            ops_dns_name(credentials.trust_domain),
        )


def _exporter(
    name: str,
    otlp_endpoint: str | None,
    meter_provider: MeterProvider | None,
    credentials: ExporterCredentials | None = None,
    env: Mapping[str, str] = os.environ,
    otlp_class: Callable[..., SpanExporter] | None = None,
) -> SpanExporter | None:
    """The exporter ``name`` (otlp, console, none); ``otlp_class`` stands in for the SDK's
    OTLPSpanExporter (a subclass taking the same arguments)."""
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    check_exporter(name)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    otlp = otlp_class or OTLPSpanExporter
    endpoint = otlp_endpoint or next((env[v] for v in _ENDPOINT_VARIABLES if env.get(v)), None)
    plaintext = endpoint is not None and endpoint.startswith("http://")
    if credentials is None or plaintext or any(env.get(v) for v in _CERTIFICATE_VARIABLES):
        insecure = True if otlp_endpoint and otlp_endpoint.startswith("http://") else None
        return otlp(endpoint=otlp_endpoint, insecure=insecure, meter_provider=meter_provider)
    options = (
        (("grpc.ssl_target_name_override", credentials.server_name),)
        if credentials.server_name
        else None
    )
    return otlp(
        endpoint=endpoint or DEFAULT_TLS_ENDPOINT,
        insecure=False,
        credentials=grpc.ssl_channel_credentials(
            credentials.ca_pem, credentials.key_pem, credentials.cert_pem
        ),
        channel_options=options,
        meter_provider=meter_provider,
    )


def tracer_provider(
    default_service_name: str,
    *,
    service_name: str | None = None,
    sampler: str | None = None,
    sampler_arg: str | None = None,
    exporter: str | None = None,
    otlp_endpoint: str | None = None,
    resource_attributes: Mapping[str, str] | None = None,
    credentials: ExporterCredentials | AgencyCredentials | str | Path | None = None,
    env: Mapping[str, str] = os.environ,
) -> tuple[TracerProvider, SpanPipelineStats] | None:
    """A TracerProvider exporting in the background, or None when tracing is disabled.

    ``credentials``: the sender's own, for mTLS to the exchange's collector; an agency passes
    its credentials directory."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    name = service_name or env.get("OTEL_SERVICE_NAME") or default_service_name
    resource = Resource.create(
        {
            "service.name": name,
            "service.instance.id": uuid.uuid4().hex,
            **(resource_attributes or {}),
        }
    )
    chosen = make_sampler(
        sampler or env.get("OTEL_TRACES_SAMPLER") or DEFAULT_SAMPLER,
        sampler_arg if sampler_arg is not None else env.get("OTEL_TRACES_SAMPLER_ARG"),
    )
    provider = TracerProvider(resource=resource, sampler=chosen)
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    exporter_name = (exporter or env.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower()
    own = None if credentials is None else ExporterCredentials.of(credentials)

    def build(creds: ExporterCredentials | None) -> SpanExporter | None:
        return _exporter(exporter_name, otlp_endpoint, meter_provider, creds, env)

    renewable: RenewableExporter | None = None
    with _internal_metrics():
        span_exporter: SpanExporter | None
        if own is not None and exporter_name == "otlp":
            span_exporter = renewable = RenewableExporter(build, own)
        else:
            span_exporter = build(own)
        if span_exporter is not None:
            provider.add_span_processor(
                BatchSpanProcessor(span_exporter, meter_provider=meter_provider)
            )
    return provider, SpanPipelineStats(reader, renewable)


@contextmanager
def _internal_metrics() -> Iterator[None]:
    """The SDK's switch on while the processor and exporter are built, which read it then.

    Only for them: tracers built later stay without their per-span counters, which cost
    every span some work, and the process's environment stays as it was.
    """
    before = os.environ.get(_INTERNAL_METRICS)
    os.environ[_INTERNAL_METRICS] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ[_INTERNAL_METRICS]
        else:
            os.environ[_INTERNAL_METRICS] = before
