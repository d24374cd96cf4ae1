"""Which metadata crosses the broker. Pure functions over (key, value) pairs."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tabadol.protocol import (
    CONSUMER_KEY,
    GRANT_KEY,
    PLATFORM_PREFIX,
    PURPOSE_KEY,
    REQUEST_ID_KEY,
    RETRY_AFTER_KEY,
)

__all__ = ["CONSUMER_KEY", "PLATFORM_PREFIX", "REQUEST_ID_KEY", "RETRY_AFTER_KEY", "Metadata"]

Metadata = tuple[tuple[str, str | bytes], ...]

# Connection-level HTTP headers describe one hop, never the exchange.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "host",
        "content-type",
        "content-length",
        "user-agent",
    }
)
# W3C trace context: the broker replaces it with its own span's when it traces.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
# The one reserved key a provider may legitimately send end to end: the rich error status.
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def _crosses(key: str) -> bool:
    return not (key in HOP_BY_HOP or key.startswith((":", "grpc-")))


def request_metadata(
    incoming: Iterable[tuple[str, str | bytes]],
    consumer: str,
    request_id: str,
    trace_headers: Metadata = (),
    grant: str = "",
    purpose: str = "",
) -> Metadata:
    """What the provider receives: the caller's metadata without hop-by-hop, reserved and
    caller-supplied ``x-tabadol-*`` keys, plus the broker's own: the consumer, the request
    id, and the grant that admitted the call with its purpose (percent-encoded UTF-8).

    With ``trace_headers`` (the broker's own span context) the caller's trace context is
    replaced, so the provider's span is the child of the broker's.
    """
    replace_trace = bool(trace_headers)
    kept = tuple(
        (k, v)
        for k, v in incoming
        if _crosses(k)
        and not k.startswith(PLATFORM_PREFIX)
        and not (replace_trace and k in TRACE_HEADERS)
    )
    own: Metadata = ((CONSUMER_KEY, consumer), (REQUEST_ID_KEY, request_id))
    if grant:
        own += ((GRANT_KEY, grant),)
    if purpose:
        own += ((PURPOSE_KEY, purpose),)
    return (*kept, *trace_headers, *own)


def response_metadata(incoming: Iterable[tuple[str, str | bytes]] | None) -> Metadata:
    """What the consumer receives from the provider's initial or trailing metadata."""
    if not incoming:
        return ()
    return tuple(
        (k, v)
        for k, v in incoming
        if (_crosses(k) and not k.startswith(PLATFORM_PREFIX)) or k == STATUS_DETAILS_KEY
    )


def trace_id_of(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The trace id of a well-formed W3C ``traceparent`` header, or "".

    Only the standard form is taken (32 lower-case hex digits, not all zero, in a valid
    header): whatever else a consumer sends never reaches the ledger.
    """
    for key, value in metadata:
        if key == "traceparent" and isinstance(value, str):
            match = _TRACEPARENT.fullmatch(value)
            if (
                match is None
                or match["version"] == "ff"
                or (match["version"] == "00" and match["rest"])
                or match["trace_id"] == "0" * 32
                or match["parent_id"] == "0" * 16
            ):
                return ""
            return match["trace_id"]
    return ""


# version-trace_id-parent_id-flags; versions after 00 may add fields after a dash.
_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<parent_id>[0-9a-f]{16})"
    r"-[0-9a-f]{2}(?P<rest>-.*)?",
    re.ASCII | re.DOTALL,
)
