"""What both sides of the wire agree on: the platform's metadata keys and keepalive."""

from typing import Any

PLATFORM_PREFIX = "x-tabadol-"
CONSUMER_KEY = "x-tabadol-consumer"  # set by the broker from the consumer's certificate
REQUEST_ID_KEY = "x-tabadol-request-id"  # one id per exchange, to the provider and back
GRANT_KEY = "x-tabadol-grant"  # the id of the grant that admitted the call
PURPOSE_KEY = "x-tabadol-purpose"  # its purpose reference (else text), percent-encoded UTF-8
RETRY_AFTER_KEY = "x-tabadol-retry-after-ms"  # with RESOURCE_EXHAUSTED: when to try again

# Dialers ping an idle connection every 30 s while calls are open, so a peer that vanished
# without a reset is noticed; listeners accept pings that often, so they never answer with
# GOAWAY too_many_pings.
KEEPALIVE_DIAL: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]
KEEPALIVE_LISTEN: list[tuple[str, Any]] = [
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
    ("grpc.http2.max_ping_strikes", 2),
]
