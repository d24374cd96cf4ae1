"""The broker's spans: a SERVER span per call and a CLIENT span for the provider hop.

On the call path the broker only decides (trace context in, sampling, trace context out)
and keeps a plain tuple per finished call; a background thread builds the OTLP spans from
those tuples in batches and exports them (tabadol.broker.span_export). No SDK span object
exists per call. Attributes follow the OpenTelemetry RPC conventions (docs/tracing.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from random import getrandbits
from typing import TYPE_CHECKING, NamedTuple

from tabadol.metadata import Metadata

if TYPE_CHECKING:
    from tabadol.broker.span_export import SpanExport
    from tabadol.client.tracing import ExporterCredentials
    from tabadol.config import TracingSection
    from tabadol.ledger.record import LedgerRecord


class CallTrace(NamedTuple):
    """One call's place in its trace; immutable."""

    trace_id: bytes  # 16 bytes
    parent_id: bytes  # 8 bytes; b"" when the call started the trace
    span_id: bytes  # the broker's SERVER span
    hop_id: bytes  # the provider hop's CLIENT span (child of span_id)
    sampled: bool  # recorded and exported, or only propagated
    tracestate: str  # the incoming tracestate, passed on ("" if none or invalid)
    trace_hex: str  # trace_id as 32 hex digits, for the ledger ("" when not traced)


NOT_TRACED = CallTrace(b"", b"", b"", b"", False, "", "")
# A finished call, as the call path hands it to the exporting thread.
Finished = tuple[CallTrace, "LedgerRecord", int]

# W3C trace context, as the OpenTelemetry SDK's propagator reads it.
_TRACEPARENT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)"
)
_TRACEPARENT_MAX = 512
_MEMBER = re.compile(
    r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_TRACESTATE_MAX = 8192
_TRACESTATE_MEMBERS = 32
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_LOW_64 = (1 << 64) - 1


class Incoming(NamedTuple):
    """A valid incoming trace context."""

    trace_hex: str
    parent_hex: str
    sampled: bool
    tracestate: str


def parse_trace_context(incoming: Metadata) -> Incoming | None:
    """The consumer's W3C trace context, or None when absent or invalid (a new trace).

    As the SDK's propagator: the first ``traceparent`` counts; version ``ff``, a version 00
    with more fields, or an all-zero id is invalid; ``tracestate`` headers are joined, and
    dropped whole if any member is malformed, a key repeats or there are more than 32.
    """
    header: str | bytes | None = None
    states: list[str] = []
    for key, value in incoming:
        if key == "traceparent":
            if header is None:
                header = value
        elif key == "tracestate" and isinstance(value, str):
            states.append(value)
    if header is None or not isinstance(header, str) or len(header) > _TRACEPARENT_MAX:
        return None
    match = _TRACEPARENT.fullmatch(header)
    if match is None:
        return None
    version, trace_hex, parent_hex, flags, more = match.groups()
    if (
        trace_hex == _ZERO_TRACE
        or parent_hex == _ZERO_SPAN
        or version == "ff"
        or (version == "00" and more)
    ):
        return None
    return Incoming(trace_hex, parent_hex, bool(int(flags, 16) & 1), _tracestate(states))


def _tracestate(headers: list[str]) -> str:
    """The members of the tracestate headers, joined; "" if any is invalid."""
    if not headers:
        return ""
    if sum(map(len, headers)) + len(headers) - 1 > _TRACESTATE_MAX:
        return ""
    members: list[str] = []
    keys: set[str] = set()
    for header in headers:
        for member in header.split(","):
            member = member.strip(" \t")
            if not member:
                continue
            if _MEMBER.fullmatch(member) is None:
                return ""
            key = member.partition("=")[0]
            if key in keys:
                return ""
            keys.add(key)
            members.append(member)
    return ",".join(members) if len(members) <= _TRACESTATE_MEMBERS else ""


class Sampling(NamedTuple):
    """A sampler of the spec (``OTEL_TRACES_SAMPLER``) as data: ``parentbased_*`` follow a
    valid parent's sampled flag; the root decision is always, never, or by trace id ratio
    (the SDK's: the trace id's low 64 bits below ``ratio * 2**64``)."""

    parent_based: bool
    bound: int  # sampled when the trace id's low 64 bits are below it

    @classmethod
    def of(cls, name: str, ratio: float = 1.0) -> Sampling:
        """From a sampler name as ``parse_sampler`` returns it."""
        root = name.removeprefix("parentbased_")
        bound = {"always_on": 1 << 64, "always_off": 0}.get(root, round(ratio * (1 << 64)))
        return cls(name.startswith("parentbased_"), bound)

    def sampled(self, parent: Incoming | None, trace_id_low: int) -> bool:
        if parent is not None and self.parent_based:
            return parent.sampled
        return trace_id_low < self.bound


PARENT_BASED_ALWAYS_ON = Sampling(True, 1 << 64)


class BrokerTracing:
    """The broker's tracing on the call path: ``begin``, ``provider_headers``, ``end``.

    ``export`` None: spans are decided and propagated but not exported (exporter none)."""

    def __init__(
        self, sampling: Sampling = PARENT_BASED_ALWAYS_ON, export: SpanExport | None = None
    ) -> None:
        self.sampling = sampling
        self.export = export
        self._offer = export.offer if export is not None else None

    def begin(self, incoming: Metadata) -> CallTrace:
        """The call's trace: the consumer's, continued, or a new one; sampled or not."""
        parent = parse_trace_context(incoming)
        if parent is None:
            bits = getrandbits(256)
            while not (bits >> 128 and bits >> 64 & _LOW_64 and bits & _LOW_64):
                bits = getrandbits(256)  # an all-zero id is invalid
            raw = bits.to_bytes(32, "big")
            trace_id = raw[:16]
            return CallTrace(
                trace_id,
                b"",
                raw[16:24],
                raw[24:],
                self.sampling.sampled(None, (bits >> 128) & _LOW_64),
                "",
                trace_id.hex(),
            )
        bits = getrandbits(128)
        while not (bits >> 64 and bits & _LOW_64):
            bits = getrandbits(128)
        raw = bits.to_bytes(16, "big")
        trace_hex = parent.trace_hex
        return CallTrace(
            bytes.fromhex(trace_hex),
            bytes.fromhex(parent.parent_hex),
            raw[:8],
            raw[8:],
            self.sampling.sampled(parent, int(trace_hex[16:], 16)),
            parent.tracestate,
            trace_hex,
        )

    def provider_headers(self, trace: CallTrace) -> Metadata:
        """The trace context the provider receives: the hop's span as its parent."""
        parent = f"00-{trace.trace_hex}-{trace.hop_id.hex()}-{'01' if trace.sampled else '00'}"
        if trace.tracestate:
            return (("traceparent", parent), ("tracestate", trace.tracestate))
        return (("traceparent", parent),)

    def end(self, trace: CallTrace, record: LedgerRecord, hop_started_ns: int) -> None:
        """Hand a sampled call's spans to the exporting thread; a full queue drops them,
        counted, rather than wait. ``hop_started_ns`` 0: no provider hop, one span."""
        if trace.sampled and self._offer is not None:
            self._offer((trace, record, hop_started_ns))

    def dropped(self) -> int:
        """Spans dropped because the export queue was full (collector slow or down)."""
        return self.export.dropped if self.export is not None else 0

    def exported(self) -> int:
        """Spans the collector accepted."""
        return self.export.exported if self.export is not None else 0

    def export_failed(self) -> int:
        """Spans the exporter gave up on (collector down or refusing)."""
        return self.export.failed if self.export is not None else 0

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Export what is queued now; False if that did not finish within ``timeout_s``."""
        return self.export.flush(timeout_s) if self.export is not None else True

    def shutdown(self) -> None:
        """Export what is queued (bounded by the export timeout), then stop exporting."""
        if self.export is not None:
            self.export.shutdown()

    def renew_credentials(self, credentials: ExporterCredentials) -> None:
        """After a certificate renewal: export with the new one from the next batch on."""
        if self.export is not None:
            self.export.renew_credentials(credentials)


class _NotTracing(BrokerTracing):
    """Tracing off: the consumer's trace id goes to the ledger, its trace context to the
    provider untouched."""

    def begin(self, incoming: Metadata) -> CallTrace:
        parent = parse_trace_context(incoming)
        if parent is None:
            return NOT_TRACED
        return NOT_TRACED._replace(trace_hex=parent.trace_hex)

    def provider_headers(self, trace: CallTrace) -> Metadata:
        return ()

    def end(self, trace: CallTrace, record: LedgerRecord, hop_started_ns: int) -> None:
        return None


NO_TRACING: BrokerTracing = _NotTracing()
DEFAULT_SERVICE_NAME = "tabadol-broker"


def broker_tracing(
    settings: TracingSection,
    credentials: ExporterCredentials | None,
    env: Mapping[str, str] = os.environ,
) -> BrokerTracing | None:
    """The broker's tracing from ``[tracing]`` and the ``OTEL_*`` variables, or None when
    tracing is off. ``credentials``: the broker's own, for mTLS to the collector.
    Raises TracingConfigError naming a setting that is wrong."""
    from tabadol.broker.span_export import span_export
    from tabadol.samplers import DEFAULT_SAMPLER, parse_sampler

    if not settings.enabled or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    name, ratio = parse_sampler(
        settings.sampler or env.get("OTEL_TRACES_SAMPLER") or DEFAULT_SAMPLER,
        settings.sampler_arg
        if settings.sampler_arg is not None
        else env.get("OTEL_TRACES_SAMPLER_ARG"),
    )
    export = span_export(
        settings.service_name or env.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME,
        (settings.exporter or env.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower(),
        settings.otlp_endpoint,
        credentials,
        env,
    )
    return BrokerTracing(Sampling.of(name, ratio), export)
