"""The HTTP side's wire forms: Connect's envelopes, errors and timeouts, google.rpc.Status
JSON for REST, and each protocol's HTTP status for a gRPC code. Pure: bytes in, bytes out.

Connect: https://connectrpc.com/docs/protocol. REST errors and statuses as grpc-gateway and
Envoy's transcoder give them (``runtime.HTTPStatusFromCode``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from collections.abc import Iterable, Iterator

from tabadol.status import Code

# Connect's HTTP status for each code (its specification's table).
CONNECT_STATUS = {
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}
# REST (google.rpc.Status bodies): the same table, as grpc-gateway maps it.
REST_STATUS = {Code.OK: 200, **CONNECT_STATUS}

ENVELOPE_COMPRESSED = 0x01
ENVELOPE_END_STREAM = 0x02
_HEADER = struct.Struct(">BI")


def connect_code(code: Code) -> str:
    """Connect's name of a code: ``not_found``; CANCELLED is spelled ``canceled``."""
    return "canceled" if code is Code.CANCELLED else code.name.lower()


def connect_error(code: Code, message: str) -> bytes:
    """The JSON body of a Connect error (unary) or the ``error`` of an end-of-stream."""
    return _json({"code": connect_code(code), "message": message})


def end_of_stream(code: Code, message: str, metadata: Iterable[tuple[str, str]]) -> bytes:
    """A Connect stream's last envelope: its error (none for OK) and its trailers."""
    body: dict[str, object] = {}
    if code is not Code.OK:
        body["error"] = {"code": connect_code(code), "message": message}
    trailers: dict[str, list[str]] = {}
    for key, value in metadata:
        trailers.setdefault(key, []).append(value)
    if trailers:
        body["metadata"] = trailers
    return envelope(_json(body), ENVELOPE_END_STREAM)


def rest_error(code: Code, message: str) -> bytes:
    """A google.rpc.Status in its JSON form, as grpc-gateway answers an error."""
    return _json({"code": int(code), "message": message, "details": []})


def ndjson_error(code: Code, message: str) -> bytes:
    """The last line of a newline-delimited JSON stream that ended in an error."""
    return _json({"error": {"code": int(code), "message": message, "details": []}}) + b"\n"


def envelope(data: bytes, flags: int = 0) -> bytes:
    return _HEADER.pack(flags, len(data)) + data


class EnvelopeError(ValueError):
    """The request stream is not a sequence of well-formed Connect envelopes."""


class Envelopes:
    """Connect envelopes from a request body arriving in chunks of any size."""

    def __init__(self, max_bytes: int) -> None:
        self._buffer = bytearray()
        self._max = max_bytes

    def feed(self, chunk: bytes) -> Iterator[tuple[int, bytes]]:
        """The whole envelopes (flags, data) completed by ``chunk``."""
        self._buffer += chunk
        while len(self._buffer) >= _HEADER.size:
            flags, length = _HEADER.unpack_from(self._buffer)
            if length > self._max:
                raise EnvelopeError(
                    f"a request message of {length} bytes is over the gateway's limit of "
                    f"{self._max} bytes"
                )
            end = _HEADER.size + length
            if len(self._buffer) < end:
                return
            data = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            yield flags, data

    def finish(self) -> None:
        if self._buffer:
            raise EnvelopeError(
                f"the request stream ended inside an envelope ({len(self._buffer)} bytes left)"
            )


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress a gzip body or message, refusing one that would grow past ``limit``."""
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(data, limit + 1)
    except zlib.error as e:
        raise ValueError(f"not valid gzip: {e}") from None
    if len(out) > limit or inflate.unconsumed_tail:
        raise ValueError(f"it decompresses to more than the gateway's limit of {limit} bytes")
    if not inflate.eof:
        raise ValueError("not valid gzip: the compressed data is truncated")
    return out


# Connect's largest timeout (10 digits of milliseconds, about 115 days); a longer one, which
# grpc-timeout can say, is held to it (gRPC's own deadline arithmetic overflows past it).
MAX_TIMEOUT_S = 9_999_999_999 / 1000
_TIMEOUT_MS = re.compile(r"[0-9]{1,10}")
_GRPC_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def timeout_seconds(connect_timeout_ms: str | None, grpc_timeout: str | None) -> float | None:
    """The call's deadline from ``Connect-Timeout-Ms`` or ``grpc-timeout``, in seconds;
    None without one. ValueError names a malformed header."""
    if connect_timeout_ms is not None:
        if not _TIMEOUT_MS.fullmatch(connect_timeout_ms):
            raise ValueError(
                f"Connect-Timeout-Ms {connect_timeout_ms[:40]!r} is not a whole number of "
                "milliseconds (at most 10 digits)"
            )
        return int(connect_timeout_ms) / 1000
    if grpc_timeout is not None:
        matched = _GRPC_TIMEOUT.fullmatch(grpc_timeout)
        if matched is None:
            raise ValueError(
                f"grpc-timeout {grpc_timeout[:40]!r} is not a gRPC timeout (up to 8 digits "
                "and a unit: H, M, S, m, u or n)"
            )
        return min(int(matched[1]) * _GRPC_UNITS[matched[2]], MAX_TIMEOUT_S)
    return None


def header_value(key: str, value: str | bytes) -> str:
    """A metadata value as an HTTP header carries it: ``-bin`` values in base64."""
    if key.endswith("-bin"):
        raw = value if isinstance(value, bytes) else value.encode()
        return base64.b64encode(raw).decode("ascii").rstrip("=")
    return value if isinstance(value, str) else value.decode("latin-1")


def metadata_value(key: str, value: str) -> str | bytes:
    """An HTTP header's value as metadata: ``-bin`` headers are base64 (padded or not)."""
    if key.endswith("-bin"):
        padded = value + "=" * (-len(value) % 4)
        try:
            return base64.b64decode(padded, validate=True)
        except binascii.Error:
            return base64.urlsafe_b64decode(padded)  # binascii.Error, a ValueError
    return value


def _json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
