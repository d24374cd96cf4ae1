"""A raw HTTP/2 client over mTLS, for sending the broker what no gRPC library would.

The h2 state machine builds and parses well-formed frames (with its validation and
normalisation off, so it sends exactly what a test asks for); ``frame`` builds the invalid
ones by hand. This module only moves bytes and bounds every wait: a broker that neither
answers nor resets a stream fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what a client sends before any frame
WAIT_S = 5.0  # the broker answers everything here in milliseconds; silence this long is a hang

# Frame types and flags (RFC 9113, section 6), for frames built by hand.
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9,
)  # fmt: skip
ACK = END_STREAM = 0x1
END_HEADERS, PRIORITY_FLAG = 0x4, 0x20

Headers = Sequence[tuple[str, str]]


def frame(
    kind: int, flags: int, stream_id: int, payload: bytes, length: int | None = None
) -> bytes:
    """One HTTP/2 frame by hand (frame libraries refuse to build invalid ones); ``length``
    lets the header lie about the payload."""
    size = len(payload) if length is None else length
    return size.to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def grpc_message(
    payload: bytes, *, compressed: bool = False, declared_length: int | None = None
) -> bytes:
    """One length-prefixed gRPC message; ``declared_length`` lets the prefix lie."""
    length = len(payload) if declared_length is None else declared_length
    return bytes([1 if compressed else 0]) + length.to_bytes(4, "big") + payload


def grpc_request_headers(path: str, authority: str, extra: Headers = ()) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]


def tls_context(bundle: Path, *, alpn: Sequence[str] = ("h2",)) -> ssl.SSLContext:
    """A client context presenting an agency bundle (ca.crt, agency.crt, agency.key)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(bundle / "ca.crt"))
    context.load_cert_chain(bundle / "agency.crt", bundle / "agency.key")
    context.set_alpn_protocols(list(alpn))
    return context


@dataclass
class StreamEnd:
    """How the broker ended one stream, or the whole connection."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    reset: int | None = None  # RST_STREAM error code
    goaway: int | None = None  # GOAWAY error code
    closed: bool = False  # the broker closed the connection

    @property
    def grpc_status(self) -> grpc.StatusCode | None:
        """The status in the trailers (or in the headers of a trailers-only response)."""
        for key, value in (*self.trailers, *self.headers):
            if key == "grpc-status":
                return next((c for c in grpc.StatusCode if c.value[0] == int(value)), None)
        return None

    def trailer(self, key: str) -> str | None:
        return next((v for k, v in (*self.trailers, *self.headers) if k == key), None)

    def __str__(self) -> str:
        status = self.grpc_status
        return (
            f"status={status.name if status else None} reset={self.reset} "
            f"goaway={self.goaway} closed={self.closed} "
            f"message={self.trailer('grpc-message')!r}"
        )


class _LiteralEncoder(hpack.Encoder):
    """HPACK without Huffman coding: hpack's Huffman coder takes minutes over a 1 MiB value."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return bytes(super().encode(headers, huffman=False))


class RawH2:
    """One HTTP/2 connection to the broker that sends exactly what it is told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding="utf-8",
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.conn.encoder = _LiteralEncoder()
        self.ends: dict[int, StreamEnd] = {}
        self.ended: set[int] = set()  # streams the broker half-closed (END_STREAM)
        self.settings_received = False
        self.goaway: int | None = None
        self.closed = False

    @classmethod
    async def open(cls, port: int, bundle: Path, server_hostname: str) -> RawH2:
        """TLS with the agency's certificate and ALPN h2, then the client preface and SETTINGS."""
        async with asyncio.timeout(WAIT_S):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls_context(bundle), server_hostname=server_hostname
            )
        raw = cls(reader, writer)
        raw.conn.initiate_connection()
        await raw.flush()
        return raw

    async def flush(self) -> None:
        await self.send_raw(self.conn.data_to_send())

    async def send_raw(self, data: bytes) -> None:
        if not data or self.closed:
            return
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            self.closed = True  # the broker hung up first: what it sent is still readable

    async def start_call(
        self,
        path: str,
        authority: str,
        body: bytes | None,
        *,
        extra_headers: Headers = (),
        trailers: Headers | None = None,
    ) -> int:
        """Open a stream with gRPC request headers, send ``body`` and half-close."""
        stream_id = self.conn.get_next_available_stream_id()
        headers = grpc_request_headers(path, authority, extra_headers)
        self.conn.send_headers(stream_id, headers, end_stream=body is None and trailers is None)
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=trailers is None)
        if trailers is not None:
            self.conn.send_headers(stream_id, list(trailers), end_stream=True)
        await self.flush()
        return stream_id

    async def call(
        self,
        path: str,
        authority: str,
        body: bytes | None,
        *,
        extra_headers: Headers = (),
        trailers: Headers | None = None,
    ) -> StreamEnd:
        stream_id = await self.start_call(
            path, authority, body, extra_headers=extra_headers, trailers=trailers
        )
        return await self.until_end(stream_id)

    async def until_end(self, stream_id: int) -> StreamEnd:
        """Read until the stream ends, is reset, or the connection goes; fail after WAIT_S."""
        end = self.ends.setdefault(stream_id, StreamEnd())
        try:
            async with asyncio.timeout(WAIT_S):
                while not self._over(stream_id):
                    data = await self._read()
                    if not data:
                        break
                    self._receive(data)
                    await self.flush()
        except TimeoutError:
            raise AssertionError(
                f"the broker neither ended nor reset stream {stream_id} within {WAIT_S:.0f} s: {end}"
            ) from None
        end.goaway, end.closed = self.goaway, self.closed
        return end

    async def max_concurrent_streams(self) -> int:
        """The stream limit the broker advertises in its first SETTINGS frame."""
        async with asyncio.timeout(WAIT_S):
            while not self.settings_received:
                data = await self._read()
                assert data, "the broker closed the connection before its SETTINGS"
                self._receive(data)
                await self.flush()
        return int(self.conn.remote_settings.max_concurrent_streams)

    async def probe(self) -> str:
        """After raw garbage: "goaway" or "closed" if the broker ended the connection, or
        "alive" if it still answers a PING. Frames are read raw, without the h2 state
        machine, which the garbage has put out of step with the broker.
        """
        payload = b"tabadol!"
        await self.send_raw(frame(PING, 0, 0, payload))
        buffer = bytearray()
        try:
            async with asyncio.timeout(WAIT_S):
                while True:
                    while len(buffer) >= 9:
                        length = int.from_bytes(buffer[:3], "big")
                        kind, flags = buffer[3], buffer[4]
                        if len(buffer) < 9 + length:
                            break
                        body = bytes(buffer[9 : 9 + length])
                        del buffer[: 9 + length]
                        if kind == GOAWAY:
                            return "goaway"
                        if kind == PING and flags & ACK and body == payload:
                            return "alive"
                    data = await self._read()
                    if not data:
                        return "closed"
                    buffer += data
        except TimeoutError:
            raise AssertionError(
                f"the broker neither ended the connection nor answered a PING in {WAIT_S:.0f} s"
            ) from None

    def close(self) -> None:
        """Drop the connection at once: a hostile client owes the broker no goodbye."""
        self.writer.transport.abort()

    def _over(self, stream_id: int) -> bool:
        return (
            stream_id in self.ended
            or self.ends[stream_id].reset is not None
            or self.goaway is not None
            or self.closed
        )

    async def _read(self) -> bytes:
        try:
            data = await self.reader.read(65536)
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
        return data

    def _receive(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # Only well-formed frames go through h2, so this is the broker breaking HTTP/2.
            raise AssertionError(f"the broker sent invalid HTTP/2: {e!r}") from e
        for event in events:
            stream_id = getattr(event, "stream_id", None)
            end = self.ends.setdefault(stream_id, StreamEnd()) if stream_id else None
            if isinstance(event, h2.events.ResponseReceived) and end is not None:
                end.headers = _text(event.headers)
            elif isinstance(event, h2.events.TrailersReceived) and end is not None:
                end.trailers = _text(event.headers)
            elif isinstance(event, h2.events.DataReceived) and end is not None:
                end.data += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and stream_id:
                self.ended.add(stream_id)
            elif isinstance(event, h2.events.StreamReset) and end is not None:
                end.reset = int(event.error_code)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.settings_received = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = int(event.error_code or 0)


def _text(headers: Sequence[tuple[str | bytes, str | bytes]]) -> list[tuple[str, str]]:
    return [
        (
            k.decode() if isinstance(k, bytes) else k,
            v.decode(errors="replace") if isinstance(v, bytes) else v,
        )
        for k, v in headers
    ]
