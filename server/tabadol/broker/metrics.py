"""Prometheus metrics of the broker, served at ``/metrics`` on ``[broker] metrics_listen``
over HTTPS, to operators and auditors only (``metrics_server``).

Label values come only from the configuration and the contracts (agency ids, services,
methods, gRPC code names), so the number of series stays bounded whatever callers send.

With ``tabadol broker --workers N`` every worker writes its values to a shared directory
(prometheus-client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR) and the supervisor serves
one scrape for the whole broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tabadol.ledger.record import LedgerRecord
from tabadol.status import Code

if TYPE_CHECKING:
    from tabadol.broker.credentials import BrokerCredentials
    from tabadol.broker.metrics_server import MetricsServer

UNREGISTERED = "unregistered"  # a valid certificate of an agency the configuration lacks
UNAUTHENTICATED = "unauthenticated"  # the caller's identity was refused
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = Counter(
            "tabadol_calls",
            "Calls through the broker, by consumer, provider, service, method and gRPC code.",
            ["consumer", "provider", "service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tabadol_call_duration_seconds",
            "Call duration as the broker saw it, from arrival to final status.",
            ["consumer", "provider", "service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tabadol_calls_in_flight",
            "Calls the broker is handling now (counted every second).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.ledger_backlog = Gauge(
            "tabadol_ledger_backlog_records",
            "Ledger records waiting to be written.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.ledger_untimestamped = Gauge(
            "tabadol_ledger_seals_untimestamped",
            "Seals of this node's chain waiting for an RFC 3161 timestamp from the TSA.",
            registry=self.registry,
            multiprocess_mode="livemax",  # every worker counts the same chain
        )
        self.ledger_accepting = Gauge(
            "tabadol_ledger_accepting",
            "1 while the ledger accepts records; 0 when failing or full (calls are refused).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.crl_seconds_left = Gauge(
            "tabadol_crl_seconds_to_stale",
            "Seconds until the CRL in force goes stale (negative once it has): alert well "
            'before 0, when calls are refused unless [broker] stale_crl = "serve".',
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.registry_version = Gauge(
            "tabadol_registry_version",
            "The registry database version this broker applies (0 with a file registry).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.registry_age = Gauge(
            "tabadol_registry_age_seconds",
            "Seconds since the registry version in force was last confirmed current in the "
            "registry database (grows while it is unreachable, or while this broker cannot "
            "apply its current version): alert well before [registry] max_age_seconds, when "
            'calls are refused unless [registry] stale = "serve".',
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.registry_refused = Gauge(
            "tabadol_registry_refused_version",
            "The registry database version this broker refused to apply (its log says why; "
            "0 when none): while it is the database's current one, the age above grows.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.ledger_written = Counter(
            "tabadol_ledger_records_written",
            "Ledger records committed.",
            registry=self.registry,
        )
        self.spans_dropped = Counter(
            "tabadol_spans_dropped",
            "Spans dropped because the export queue was full (collector slow or down).",
            registry=self.registry,
        )
        self.spans_export_failed = Counter(
            "tabadol_spans_export_failed",
            "Spans the exporter gave up on (the collector down or refusing them).",
            registry=self.registry,
        )
        self._seen = {"written": 0, "dropped": 0, "export_failed": 0}
        self.refused = Counter(
            "tabadol_calls_refused",
            "Calls refused before routing: unknown method, ledger not writable, registry "
            "stale (registry_stale), or the "
            "refusals of a flooding unidentified or undeclared caller left out of the ledger "
            "(flood_unrecorded), or a platform service (discovery, reflection, health) refusing "
            "an unidentified (platform_unauthenticated) or undeclared (platform_undeclared) "
            "caller.",
            ["reason"],
            registry=self.registry,
        )
        self._agencies: frozenset[str] = frozenset()
        self._children: dict[tuple[str, str, str, str, int], tuple[Any, Any]] = {}
        self._server: MetricsServer | None = None
        self.port = 0

    def configure(self, agencies: Iterable[str]) -> None:
        """The agencies that may appear as label values (on start and every reload)."""
        self._agencies = frozenset(agencies)

    def observe(self, record: LedgerRecord) -> None:
        """Count a finished call. Label children are looked up once per combination."""
        consumer = record.consumer
        if consumer not in self._agencies:
            consumer = UNREGISTERED if consumer else UNAUTHENTICATED
        key = (consumer, record.provider, record.service, record.method, record.status_code)
        children = self._children.get(key)
        if children is None:
            labels = (consumer, record.provider, record.service, record.method)
            code = Code(record.status_code).name
            children = (self.calls.labels(*labels, code), self.latency.labels(*labels))
            self._children[key] = children
        children[0].inc()
        children[1].observe(record.duration_ns / 1e9)

    def refresh(
        self,
        backlog: int,
        accepting: bool,
        written: int,
        dropped: int,
        export_failed: int,
        in_flight: int,
    ) -> None:
        """Carry the calls in flight, the ledger's and the span pipeline's own counts into
        the metrics (every second: not a lock on every call's way in and out)."""
        self.in_flight.set(in_flight)
        self.ledger_backlog.set(backlog)
        self.ledger_accepting.set(1 if accepting else 0)
        for name, counter, now in (
            ("written", self.ledger_written, written),
            ("dropped", self.spans_dropped, dropped),
            ("export_failed", self.spans_export_failed, export_failed),
        ):
            if now > self._seen[name]:
                counter.inc(now - self._seen[name])
                self._seen[name] = now

    def serve(
        self, listen: str, credentials: Callable[[], BrokerCredentials], trust_domain: str
    ) -> None:
        """Serve ``/metrics`` over HTTPS to operators and auditors (``credentials`` returns
        the broker's current ones: its certificate, CA and revocations follow reloads)."""
        # Imported here: metrics_server imports proxy, which imports this module.
        from tabadol.broker.metrics_server import MetricsServer

        server = MetricsServer(listen, self.registry, credentials, trust_domain)
        server.start()
        self._server, self.port = server, server.port

    def stop(self) -> None:
        """Stop serving ``/metrics``; returns at once (the server stops in its own thread)."""
        if self._server is not None:
            self._server.stop()
            self._server = None
