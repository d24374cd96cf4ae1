"""Which broker nodes a consumer dials, and the gRPC service config that spreads calls over them.

Pure: addresses in, a gRPC target and a service-config document out. The channel itself is
made by :func:`tabadol.client.connect`; balancing, health checking and retries are gRPC's own.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor, descriptor_pb2

# gRPC target URIs a caller may give as they are (grpc/grpc doc/naming.md).
_URI_SCHEME = re.compile(r"(dns|ipv4|ipv6|unix|unix-abstract|vsock):")
# Schemes whose one target may stand for several nodes: they get balanced.
_SEVERAL_SCHEMES = ("dns:", "ipv4:", "ipv6:")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
_METHOD_PATH = re.compile(r"/?([A-Za-z_][\w.]*)/([A-Za-z_]\w*)")

# An attempt that meets UNAVAILABLE goes to the next node; three attempts cover three nodes.
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 3,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# A node that fails is retried after 0.25 s, backing off to 2 s: a node that comes back
# takes calls again within about two seconds. (gRPC's defaults are 1 s up to 120 s.)
RECONNECT_BACKOFF: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class BrokerAddressError(ValueError):
    """A broker address list that cannot be dialed; the message names the address."""


@dataclass(frozen=True)
class BrokerTarget:
    """What gRPC dials, and whether it may be several nodes (then calls are balanced)."""

    uri: str
    several: bool


@dataclass(frozen=True)
class _Address:
    host: str  # without the brackets of an IPv6 literal
    port: int
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None  # None: a DNS name

    def __str__(self) -> str:
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        return f"{host}:{self.port}"


def broker_target(addresses: str | Sequence[str]) -> BrokerTarget:
    """The gRPC target for one broker address or a list of them.

    One address is dialed as today: an IP address is one node; a DNS name goes to gRPC's
    dns resolver and may stand for several nodes; a gRPC URI (``dns:``, ``ipv4:``,
    ``ipv6:``, ``unix:`` ...) is used as it is. Several addresses must all be IP addresses
    of one family, and become one ``ipv4:a:p,b:p`` (or ``ipv6:``) target: DNS names are
    refused there, since only gRPC's resolver should follow what they resolve to (give one
    DNS name with several addresses instead).
    """
    given = [addresses] if isinstance(addresses, str) else list(addresses)
    if not given:
        raise BrokerAddressError("no broker address given: the list is empty")
    if len(given) == 1:
        only = given[0]
        if not isinstance(only, str):
            raise BrokerAddressError(f"broker address {only!r} is not a string")
        if _URI_SCHEME.match(only):
            return BrokerTarget(only, only.startswith(_SEVERAL_SCHEMES))
        address = _parse(only)
        if address.ip is None:
            return BrokerTarget(f"dns:///{address}", True)
        return BrokerTarget(only, False)
    parsed = [_parse_listed(a) for a in given]
    seen: set[tuple[str, int]] = set()
    for text, address in zip(given, parsed, strict=True):
        if address.ip is None:
            raise BrokerAddressError(
                f"broker address {text!r}: in a list of several, each must be an IP address; "
                "give the nodes' IP addresses, or one DNS name that resolves to all of them"
            )
        key = (str(address.ip), address.port)
        if key in seen:
            raise BrokerAddressError(f"broker address {text!r} is listed twice")
        seen.add(key)
    families = {type(a.ip) for a in parsed}
    if len(families) > 1:
        raise BrokerAddressError(
            "broker addresses mix IPv4 and IPv6 ("
            + ", ".join(given)
            + "): gRPC dials one family per list; list the nodes in one family"
        )
    scheme = "ipv6" if families == {ipaddress.IPv6Address} else "ipv4"
    return BrokerTarget(f"{scheme}:" + ",".join(str(a) for a in parsed), True)


def _parse_listed(text: object) -> _Address:
    if not isinstance(text, str):
        raise BrokerAddressError(f"broker address {text!r} is not a string")
    if _URI_SCHEME.match(text):
        raise BrokerAddressError(
            f"broker address {text!r}: a gRPC URI cannot be one of several addresses; "
            "give host:port entries"
        )
    return _parse(text)


def _parse(text: str) -> _Address:
    """``host:port``, ``[ipv6]:port``; BrokerAddressError naming ``text`` otherwise."""
    if text != text.strip() or not text:
        raise BrokerAddressError(f"broker address {text!r} is empty or has spaces around it")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise BrokerAddressError(f"broker address {text!r} is not host:port")
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BrokerAddressError(f"broker address {text!r}: port {port_text!r} is not 1-65535")
    port = int(port_text)
    if host.startswith("[") and host.endswith("]"):
        try:
            return _Address(host[1:-1], port, ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise BrokerAddressError(
                f"broker address {text!r}: {host} is not an IPv6 address"
            ) from None
    if ":" in host:
        raise BrokerAddressError(
            f"broker address {text!r}: an IPv6 address goes in brackets, [addr]:port"
        )
    try:
        return _Address(host, port, ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _HOST_NAME.fullmatch(host) or host.replace(".", "").isdigit():
        raise BrokerAddressError(f"broker address {text!r}: {host!r} is not a host name")
    return _Address(host, port, None)


def method_name(path: str) -> tuple[str, str]:
    """(service, method) of ``/pkg.Service/Method`` or ``pkg.Service/Method``."""
    match = _METHOD_PATH.fullmatch(path)
    if match is None:
        raise ValueError(f"idempotent method {path!r} is not /package.Service/Method")
    return match[1], match[2]


def idempotent_unary_methods(files: Iterable[descriptor.FileDescriptor]) -> frozenset[str]:
    """``/pkg.Service/Method`` of every unary method these contracts mark
    ``idempotency_level = IDEMPOTENT`` or ``NO_SIDE_EFFECTS``: a repeat is harmless."""
    harmless = (
        descriptor_pb2.MethodOptions.IDEMPOTENT,
        descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    )
    found: set[str] = set()
    for file in files:
        for service in file.services_by_name.values():
            for method in service.methods:
                if method.client_streaming or method.server_streaming:
                    continue  # gRPC could retry only until the first answer: not worth it
                if method.GetOptions().idempotency_level in harmless:
                    found.add(f"/{service.full_name}/{method.name}")
    return frozenset(found)


def service_config(idempotent_methods: Iterable[str]) -> str:
    """The service config for several nodes: round robin over the nodes that pass the
    standard health check, and retries on UNAVAILABLE for the idempotent methods only."""
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
    }
    names = sorted({method_name(m) for m in idempotent_methods})
    if names:
        config["methodConfig"] = [
            {
                "name": [{"service": s, "method": m} for s, m in names],
                "retryPolicy": RETRY_POLICY,
            }
        ]
    return json.dumps(config, separators=(",", ":"))
