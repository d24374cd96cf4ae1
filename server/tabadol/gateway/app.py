"""The gateway's ASGI application: Connect and REST/JSON calls into the broker's request path.

Every call goes through the same ``Proxy`` handler a gRPC call does (identity, limits,
grants, the provider call, its span and its ledger record). This module only turns HTTP into
that handler's inputs and its outputs back into HTTP:

- Connect (``POST /pkg.Service/Method``): unary with the ``application/json`` or
  ``application/proto`` codec, streams with ``application/connect+json`` or ``+proto``
  envelopes; Connect's errors and statuses.
- REST: the routes of the contracts' ``google.api.http`` rules (``tabadol.gateway.http_rules``);
  server streams as newline-delimited JSON; errors as ``google.rpc.Status`` JSON.
- ``GET /openapi.json``: what the calling agency may call (``tabadol.gateway.openapi``).

Request messages are decoded inside the handler's ``read``, after admission: an agency with
no grant is refused before its body is looked at, and a body that does not decode is a
refused call in the ledger (INVALID_ARGUMENT), never forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import grpc.aio
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from tabadol.broker.call import Ending
from tabadol.broker.platform import declared_caller
from tabadol.broker.proxy import Proxy
from tabadol.contracts import Contracts, MethodContract, RpcKind
from tabadol.gateway import wire
from tabadol.gateway.context import HttpAbort, HttpCallContext, Protocol
from tabadol.gateway.http_rules import (
    BadRequest,
    Binding,
    PathTemplate,
    RestRoutes,
    RouteMatch,
    RouteMiss,
    contract_pool,
    fill_request,
    response_json,
)
from tabadol.gateway.server import CERTIFICATE_KEY
from tabadol.metadata import Metadata
from tabadol.status import Code

log = logging.getLogger("tabadol.gateway")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
OpenApi = Callable[[Proxy, RestRoutes, str], bytes]  # proxy, routes, agency -> document

_JSON_TYPES = ("application/json",)
_PROTO_TYPES = ("application/proto", "application/x-protobuf")
_STREAM_TYPES = {"application/connect+json": "json", "application/connect+proto": "proto"}
# Headers that belong to HTTP or to the gateway's protocols: never passed on as metadata.
_NOT_METADATA = frozenset(
    {
        "host", "content-type", "content-length", "content-encoding", "accept",
        "accept-encoding", "accept-language", "connection", "keep-alive", "te", "trailer",
        "transfer-encoding", "upgrade", "user-agent", "cookie", "origin", "referer",
        "cache-control", "pragma", "priority", "expect", "via", "forwarded", "dnt",
    }
)  # fmt: skip
_NOT_METADATA_PREFIXES = ("connect-", "grpc-", "sec-", "x-forwarded-", "proxy-", "if-", ":")
_METADATA_KEY = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


# gRPC's default limit on a call's metadata (grpc.max_metadata_size): more would fail at the
# provider's door, with gRPC's own message, after admission.
MAX_METADATA_BYTES = 8192


class MetadataTooLarge(ValueError):
    """The headers that would become metadata are over what a call may carry."""


class Refusal(Exception):
    """An HTTP request refused before it reached the request path."""

    def __init__(self, status: int, code: Code, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class MessageTypes:
    """The request and response classes of each method, from the loaded contracts."""

    def __init__(self, contracts: Contracts) -> None:
        self.pool = contract_pool(contracts.files)
        self._classes: dict[str, tuple[type[Message], type[Message]]] = {}

    def of(self, method: MethodContract) -> tuple[type[Message], type[Message]]:
        known = self._classes.get(method.path)
        if known is not None:
            return known
        try:
            found = self.pool.FindServiceByName(method.service).methods_by_name[method.name]
        except KeyError:
            raise Refusal(
                500,
                Code.INTERNAL,
                f"Tabadol gateway: the broker's contracts lack the message types of "
                f"{method.path} (a FileDescriptorSet built without --include_imports?)",
            ) from None
        classes = GetMessageClass(found.input_type), GetMessageClass(found.output_type)
        self._classes[method.path] = classes
        return classes


@dataclass(frozen=True)
class _Tables:
    """What the gateway derives from one configuration's contracts."""

    proxy: Proxy
    routes: RestRoutes
    types: MessageTypes


@dataclass
class _Call:
    """One HTTP request headed for a method."""

    scope: Scope
    receive: Receive
    send: Send
    headers: dict[str, str]
    method: MethodContract
    protocol: Protocol
    codec: str  # "json" or "proto"
    binding: Binding  # REST: the rule it matched; Connect JSON: the whole body
    variables: dict[str, str]  # REST: the path's field values


class GatewayApp:
    """The ASGI application of one broker's HTTP entry."""

    def __init__(
        self,
        proxy: Callable[[], Proxy],
        *,
        max_body_bytes: Callable[[], int],
        max_json_depth: Callable[[], int],
        openapi: OpenApi,
    ) -> None:
        self._proxy = proxy
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth
        self._openapi = openapi
        self._tables: _Tables | None = None

    def tables(self) -> _Tables:
        """The routes and message classes of the configuration in force (built once each)."""
        proxy = self._proxy()
        tables = self._tables
        if tables is None or tables.proxy is not proxy:
            types = MessageTypes(proxy.contracts)
            routes = RestRoutes.from_contracts(proxy.contracts, types.pool)  # checked at load
            tables = self._tables = _Tables(proxy, routes, types)
        return tables

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = _headers(scope)
        rest = not _connect_shaped(scope, headers)
        try:
            await self._answer(scope, receive, send, headers, rest)
        except Exception:
            log.exception("the gateway failed on %s %s", scope["method"], _path(scope)[:200])
            await _error(send, rest, 500, Code.INTERNAL, "Tabadol gateway: internal error")

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], rest: bool
    ) -> None:
        tables = self.tables()
        try:
            call = await self._route(scope, receive, send, headers, tables)
            if call is None:
                await self._openapi_document(scope, send, tables)
                return
            rest = call.protocol == "rest"
            await _Exchange(self, call, tables).run()
        except Refusal as refusal:
            await _error(send, rest, refusal.status, refusal.code, refusal.message)
        except HttpAbort as abort:
            status = (wire.REST_STATUS if rest else wire.CONNECT_STATUS).get(abort.code, 500)
            await _error(send, rest, status, abort.code, abort.details, abort.trailers)

    # -- routing ------------------------------------------------------------------------------

    async def _route(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        tables: _Tables,
    ) -> _Call | None:
        """The method a request is for, in the protocol it speaks; None for the OpenAPI
        document. Refusal (or HttpAbort from identity) when there is none."""
        verb = scope["method"]
        path = _path(scope)
        if verb == "GET" and path == "/openapi.json":
            return None
        # Who asks comes before anything about the request: an unproven, revoked or undeclared
        # caller learns nothing of which routes, methods or message shapes exist.
        await _declared(tables.proxy, scope, f"{verb} {path[:200]}")
        matched = tables.routes.match(verb, path)
        if _connect_shaped(scope, headers) and not isinstance(matched, RouteMatch):
            # A Connect call (a REST route of that shape would win).
            method = tables.proxy.contracts.method(path)
            if method is None or method.path not in tables.proxy.handlers:
                # Not in the contracts, or in them but not offered on this exchange.
                await self._unknown_method(scope, path, tables)
            return self._connect(scope, receive, send, headers, method, _ctype(headers))
        if isinstance(matched, RouteMiss):
            raise Refusal(matched.status, _code_of_status(matched.status), matched.message)
        method = tables.proxy.contracts.method(matched.method_path)
        if method is None or method.path not in tables.proxy.handlers:
            # A route of a service in the contracts but not offered on this exchange.
            await self._unknown_method(scope, matched.method_path, tables)
        if method.kind in (RpcKind.CLIENT_STREAMING, RpcKind.BIDI_STREAMING):
            raise Refusal(
                501,
                Code.UNIMPLEMENTED,
                f"Tabadol gateway: {method.path} streams requests, which REST does not carry; "
                "call it with the Connect protocol over HTTP/2",
            )
        return _Call(
            scope, receive, send, headers, method, "rest", "json", matched.binding,
            dict(matched.variables),
        )  # fmt: skip

    def _connect(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        method: MethodContract,
        ctype: str,
    ) -> _Call:
        version = headers.get("connect-protocol-version")
        if version is not None and version != "1":
            raise Refusal(
                400,
                Code.INVALID_ARGUMENT,
                f"Tabadol gateway: Connect-Protocol-Version {version[:20]!r} is not supported "
                "(only 1)",
            )
        if method.kind is RpcKind.UNARY:
            if ctype in _JSON_TYPES:
                codec = "json"
            elif ctype in _PROTO_TYPES:
                codec = "proto"
            else:
                raise Refusal(
                    415,
                    Code.UNKNOWN,
                    f"Tabadol gateway: {method.path} is unary: send application/json or "
                    f"application/proto, not {ctype!r}",
                )
        else:
            streamed = _STREAM_TYPES.get(ctype)
            if streamed is None:
                raise Refusal(
                    415,
                    Code.UNKNOWN,
                    f"Tabadol gateway: {method.path} streams: send application/connect+json "
                    f"or application/connect+proto envelopes, not {ctype!r}",
                )
            codec = streamed
            if method.kind is RpcKind.BIDI_STREAMING and scope.get("http_version") == "1.1":
                raise Refusal(
                    505,
                    Code.UNIMPLEMENTED,
                    "Tabadol gateway: bidirectional streams need HTTP/2 (Connect carries them "
                    "only over HTTP/2)",
                )
        binding = _whole_body(_template_of(method))
        return _Call(scope, receive, send, headers, method, "connect", codec, binding, {})

    async def _unknown_method(self, scope: Scope, path: str, tables: _Tables) -> NoReturn:
        """As the gRPC port answers a path no contract has: UNAUTHENTICATED for an unproven
        certificate, else UNIMPLEMENTED naming what is missing."""
        context = HttpCallContext("connect", _certificate(scope), (), None, _nothing)
        refuse = cast(Any, tables.proxy.handler_for(path)).stream_stream
        await refuse(_no_requests(), context)  # aborts
        raise Refusal(501, Code.UNIMPLEMENTED, f"Tabadol gateway: no method {path[:200]!r}")

    async def _openapi_document(self, scope: Scope, send: Send, tables: _Tables) -> None:
        agency = await _declared(tables.proxy, scope, "GET /openapi.json")
        body = self._openapi(tables.proxy, tables.routes, agency)
        await _respond(send, 200, body, [(b"content-type", b"application/json")])


class _Exchange:
    """One call through the request path: its request read from HTTP, its answer written."""

    def __init__(self, app: GatewayApp, call: _Call, tables: _Tables) -> None:
        self.app, self.call, self.tables = app, call, tables
        self.request_class, self.response_class = tables.types.of(call.method)
        self.started = False  # the response's status and headers are sent
        self.context: HttpCallContext | None = None  # once the call is under way
        self.disconnected = False
        self.too_large = False
        self._read_once = False
        self._watch: asyncio.Task[None] | None = None
        self._answered = False
        self._task = asyncio.current_task()

    @property
    def streams_out(self) -> bool:
        return self.call.method.kind in (RpcKind.SERVER_STREAMING, RpcKind.BIDI_STREAMING)

    @property
    def streams_in(self) -> bool:
        return self.call.method.kind in (RpcKind.CLIENT_STREAMING, RpcKind.BIDI_STREAMING)

    async def run(self) -> None:
        call = self.call
        try:
            timeout = wire.timeout_seconds(
                call.headers.get("connect-timeout-ms"), call.headers.get("grpc-timeout")
            )
            metadata = _metadata(call.scope)
        except MetadataTooLarge as e:
            raise Refusal(431, Code.RESOURCE_EXHAUSTED, f"Tabadol gateway: {e}") from None
        except ValueError as e:
            raise Refusal(400, Code.INVALID_ARGUMENT, f"Tabadol gateway: {e}") from None
        deadline = None if timeout is None else time.monotonic() + timeout
        context = HttpCallContext(
            call.protocol,
            _certificate(call.scope),
            metadata,
            deadline,
            self._read_one,
        )
        self.context = context
        handler = cast(Any, self.tables.proxy.handler_for(call.method.path))
        requests = self._requests() if self.streams_in else _no_requests()
        try:
            async with asyncio.timeout(timeout):
                if self.streams_out:
                    await self._stream(handler.stream_stream(requests, context), context)
                else:
                    response = await handler.stream_unary(requests, context)
                    await self._unary(cast(bytes, response), context)
        except TimeoutError:
            await self._fail(Code.DEADLINE_EXCEEDED, "Tabadol gateway: deadline exceeded", ())
        except HttpAbort as abort:
            await self._fail(abort.code, abort.details, abort.trailers)
        except asyncio.CancelledError:
            if self.disconnected:
                return  # the consumer went away: nobody to answer
            raise
        finally:
            self._answered = True
            if self._watch is not None:
                self._watch.cancel()

    # -- the request ----------------------------------------------------------------------

    async def _body(self) -> bytes:
        """The whole request body, at most the gateway's limit, decompressed."""
        limit = self.app.max_body_bytes()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.call.receive()
            if message["type"] == "http.disconnect":
                self._gone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                self.too_large = True
                await self._drain(message, 4 * limit)
                raise Ending(
                    Code.RESOURCE_EXHAUSTED,
                    f"Tabadol gateway: the request body is over the limit of {limit} bytes",
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        encoding = self.call.headers.get("content-encoding", "identity").lower()
        return self._decompressed(body, encoding, "Content-Encoding")

    async def _drain(self, message: dict[str, Any], most: int) -> None:
        """Read and drop the rest of a body refused for its size, up to ``most`` bytes: over
        HTTP/1.1 a client still sending would otherwise get a reset, not the answer."""
        dropped = 0
        while message.get("more_body", False) and dropped <= most:
            message = await self.call.receive()
            if message["type"] == "http.disconnect":
                return
            dropped += len(message.get("body", b""))

    def _decompressed(self, data: bytes, encoding: str, header: str) -> bytes:
        if encoding in ("identity", ""):
            return data
        if encoding != "gzip":
            raise Ending(
                Code.UNIMPLEMENTED,
                f"Tabadol gateway: {header} {encoding[:40]!r} is not supported (gzip or identity)",
            )
        try:
            return wire.gunzip(data, self.app.max_body_bytes())
        except ValueError as e:
            raise Ending(
                Code.INVALID_ARGUMENT, f"Tabadol gateway: the gzip request body: {e}"
            ) from None

    async def _read_one(self) -> bytes | object:
        """The request message of a unary-request call (the request path reads it once it
        has admitted the call)."""
        if self._read_once:
            return grpc.aio.EOF
        self._read_once = True
        body = await self._body()
        self._watch_for_disconnect()
        if self.call.protocol == "connect" and self.streams_out:
            return self._one_envelope(body)
        return self._decoded(body)

    def _one_envelope(self, body: bytes) -> bytes:
        frames = wire.Envelopes(self.app.max_body_bytes())
        try:
            messages = list(frames.feed(body))
            frames.finish()
        except wire.EnvelopeError as e:
            raise Ending(Code.INVALID_ARGUMENT, f"Tabadol gateway: {e}") from None
        if any(flags & wire.ENVELOPE_END_STREAM for flags, _ in messages):
            raise Ending(
                Code.INVALID_ARGUMENT,
                "Tabadol gateway: a request stream may not send end-of-stream",
            )
        if len(messages) != 1:
            raise Ending(
                Code.INVALID_ARGUMENT,
                f"Tabadol gateway: {self.call.method.path} takes one request message; "
                f"the stream carried {len(messages)} envelopes",
            )
        return self._envelope_message(*messages[0])

    def _envelope_message(self, flags: int, data: bytes) -> bytes:
        if flags & wire.ENVELOPE_COMPRESSED:
            encoding = self.call.headers.get("connect-content-encoding", "identity").lower()
            if encoding == "identity":
                raise Ending(
                    Code.INVALID_ARGUMENT,
                    "Tabadol gateway: a compressed envelope, but no Connect-Content-Encoding",
                )
            data = self._decompressed(data, encoding, "Connect-Content-Encoding")
        return self._decoded(data)

    def _decoded(self, data: bytes) -> bytes:
        """A request message from its wire form: protobuf bytes pass as they are (checked
        to parse); JSON (and REST's path and query) becomes the message."""
        call = self.call
        message = self.request_class()
        try:
            if call.codec == "proto":
                message.ParseFromString(data)
                return data
            fill_request(
                message,
                call.binding,
                call.variables,
                call.scope.get("query_string", b"") if call.protocol == "rest" else b"",
                data,
                max_depth=self.app.max_json_depth(),
            )
        except BadRequest as e:
            raise Ending(Code.INVALID_ARGUMENT, f"Tabadol gateway: {e}") from None
        except DecodeError as e:
            raise Ending(
                Code.INVALID_ARGUMENT,
                f"Tabadol gateway: the request is not a valid {message.DESCRIPTOR.full_name} "
                f"in protobuf binary: {e}",
            ) from None
        return message.SerializeToString()

    async def _requests(self) -> AsyncIterator[bytes]:
        """A client or bidi stream's messages, from Connect envelopes as they arrive."""
        frames = wire.Envelopes(self.app.max_body_bytes())
        while True:
            message = await self.call.receive()
            if message["type"] == "http.disconnect":
                self._gone()
            try:
                for flags, data in frames.feed(message.get("body", b"")):
                    if flags & wire.ENVELOPE_END_STREAM:
                        raise wire.EnvelopeError("a request stream may not send end-of-stream")
                    yield self._envelope_message(flags, data)
                if not message.get("more_body", False):
                    frames.finish()
                    self._watch_for_disconnect()  # it may still leave while answers come
                    return
            except wire.EnvelopeError as e:
                raise Ending(Code.INVALID_ARGUMENT, f"Tabadol gateway: {e}") from None

    def _gone(self) -> None:
        """The consumer closed the connection: the call ends as cancelled by it."""
        self.disconnected = True
        if self._task is not None and not self._answered:
            self._task.cancel()
        raise asyncio.CancelledError("the consumer went away")

    def _watch_for_disconnect(self) -> None:
        async def watch() -> None:
            while (await self.call.receive())["type"] != "http.disconnect":
                pass
            if not self._answered:
                self.disconnected = True
                if self._task is not None:
                    self._task.cancel()

        self._watch = asyncio.create_task(watch())

    # -- the answer -----------------------------------------------------------------------

    def _initial(self) -> Metadata:
        """The provider's initial metadata, once it has sent it."""
        return self.context.initial_metadata if self.context is not None else ()

    def _encoded(self, data: bytes) -> bytes:
        if self.call.codec == "proto":
            return data
        message = self.response_class()
        try:
            message.ParseFromString(data)
        except DecodeError as e:
            log.warning(
                "provider %s answered %s with bytes that are not a %s: %s",
                self.tables.proxy.config.services.get(self.call.method.service),
                self.call.method.path,
                message.DESCRIPTOR.full_name,
                e,
            )
            raise HttpAbort(
                Code.INTERNAL,
                f"Tabadol gateway: the provider's answer is not a valid "
                f"{message.DESCRIPTOR.full_name}",
                (),
            ) from None
        return response_json(message, self.call.binding)

    def _content_type(self) -> bytes:
        call = self.call
        if call.protocol == "rest":
            return b"application/x-ndjson" if self.streams_out else b"application/json"
        if self.streams_out or self.streams_in:
            return f"application/connect+{call.codec}".encode()
        return b"application/json" if call.codec == "json" else b"application/proto"

    async def _start(self, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self.started = True
        headers = [
            (b"content-type", self._content_type()),
            *_http_headers(self._initial()),
            *(extra or ()),
        ]
        await self.call.send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _unary(self, response: bytes, context: HttpCallContext) -> None:
        body = self._encoded(response)
        if self.streams_in and self.call.protocol == "connect":  # a client stream
            await self._start()
            await self._chunk(wire.envelope(body))
            await self._end_stream(Code.OK, "", context.trailing_metadata)
            return
        prefix = "trailer-" if self.call.protocol == "connect" else ""
        await self._start(_http_headers(context.trailing_metadata, prefix))
        await self.call.send({"type": "http.response.body", "body": body})

    async def _stream(self, messages: AsyncIterator[bytes], context: HttpCallContext) -> None:
        rest = self.call.protocol == "rest"
        async for data in messages:
            body = self._encoded(data)
            if not self.started:
                await self._start()
            await self._chunk(body + b"\n" if rest else wire.envelope(body))
        if not self.started:
            await self._start()
        if rest:
            await self.call.send({"type": "http.response.body", "body": b""})
        else:
            await self._end_stream(Code.OK, "", context.trailing_metadata)

    async def _chunk(self, data: bytes) -> None:
        await self.call.send({"type": "http.response.body", "body": data, "more_body": True})

    async def _end_stream(self, code: Code, message: str, trailers: Metadata) -> None:
        text = [(k, wire.header_value(k, v)) for k, v in trailers]
        await self.call.send(
            {"type": "http.response.body", "body": wire.end_of_stream(code, message, text)}
        )

    async def _fail(self, code: Code, message: str, trailers: Metadata) -> None:
        """End the call with an error: its HTTP status before anything was sent; within
        the stream once it has begun (and a Connect stream always answers 200)."""
        call = self.call
        connect_stream = call.protocol == "connect" and (self.streams_in or self.streams_out)
        if connect_stream:
            if not self.started:
                await self._start()
            await self._end_stream(code, message, trailers)
            return
        if self.started:  # a REST server stream under way
            await call.send(
                {"type": "http.response.body", "body": wire.ndjson_error(code, message)}
            )
            return
        rest = call.protocol == "rest"
        status = (wire.REST_STATUS if rest else wire.CONNECT_STATUS).get(code, 500)
        if code is Code.RESOURCE_EXHAUSTED and self.too_large:
            status = 413
        await _error(call.send, rest, status, code, message, trailers, self._initial())


def _path(scope: Scope) -> str:
    return cast(bytes, scope.get("raw_path") or scope["path"].encode()).decode("latin-1")


def _ctype(headers: dict[str, str]) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _connect_shaped(scope: Scope, headers: dict[str, str]) -> bool:
    """``POST /pkg.Service/Method`` with an application/* body: a Connect call."""
    service = _path(scope)[1:].partition("/")[0]
    return (
        scope["method"] == "POST" and "." in service and _ctype(headers).startswith("application/")
    )


@functools.lru_cache(maxsize=4096)
def _whole_body(template: str) -> Binding:
    """Connect's binding: the whole body is the request (each method's template parsed once)."""
    return Binding("POST", PathTemplate.parse(template), "*", "")


def _template_of(method: MethodContract) -> str:
    return f"/{method.service}/{method.name}"


def _code_of_status(status: int) -> Code:
    return {400: Code.INVALID_ARGUMENT, 405: Code.UNIMPLEMENTED}.get(status, Code.NOT_FOUND)


async def _declared(proxy: Proxy, scope: Scope, what: str) -> str:
    """The calling agency, if its certificate proves it and the registry declares it;
    HttpAbort (401 or 403) otherwise, exactly as the broker's own gRPC services answer."""
    context = HttpCallContext("rest", _certificate(scope), (), None, _nothing)
    return await declared_caller(proxy, cast(Any, context), what)


async def _nothing() -> object:
    return grpc.aio.EOF


async def _no_requests() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


def _certificate(scope: Scope) -> bytes | None:
    """The client certificate TLS verified (``tabadol.gateway.server`` puts it in every
    scope, once per connection), else the ASGI TLS extension's."""
    if CERTIFICATE_KEY in scope:
        return cast(bytes | None, scope[CERTIFICATE_KEY])
    tls = scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return chain[0].encode("ascii") if chain else None


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (the last of repeated ones)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _metadata(scope: Scope) -> Metadata:
    """The request's own headers as gRPC metadata: everything but HTTP's and the protocols'
    (``x-tabadol-*`` is dropped later, as on the gRPC side). ValueError names a header
    that metadata cannot carry."""
    kept: list[tuple[str, str | bytes]] = []
    size = 0
    for raw_key, raw_value in scope["headers"]:
        key = raw_key.decode("latin-1").lower()
        if key in _NOT_METADATA or key.startswith(_NOT_METADATA_PREFIXES):
            continue
        size += len(raw_key) + len(raw_value) + 32  # as HPACK counts an entry
        if size > MAX_METADATA_BYTES:
            raise MetadataTooLarge(
                f"the request's headers carry more than the {MAX_METADATA_BYTES} bytes of "
                "metadata a call may take to its provider"
            )
        if not key or not set(key) <= _METADATA_KEY:
            raise ValueError(f"header {key[:60]!r} is not a valid metadata key")
        value = raw_value.decode("latin-1")
        if not key.endswith("-bin") and not all(" " <= c <= "~" for c in value):
            raise ValueError(
                f"header {key!r} has characters gRPC metadata cannot carry (printable "
                "ASCII only; send binary values in a '-bin' header, base64)"
            )
        try:
            kept.append((key, wire.metadata_value(key, value)))
        except ValueError:
            raise ValueError(f"header {key!r} is not valid base64") from None
    return tuple(kept)


def _http_headers(metadata: Metadata, prefix: str = "") -> list[tuple[bytes, bytes]]:
    return [
        (f"{prefix}{k}".encode("latin-1"), wire.header_value(k, v).encode("latin-1"))
        for k, v in metadata
    ]


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(
    send: Send,
    rest: bool,
    status: int,
    code: Code,
    message: str,
    trailers: Metadata = (),
    initial: Metadata = (),
) -> None:
    """An error answer: google.rpc.Status JSON for REST, Connect's error JSON otherwise; the
    request id (and any other metadata) as headers."""
    body = wire.rest_error(code, message) if rest else wire.connect_error(code, message)
    headers = [
        (b"content-type", b"application/json"),
        *_http_headers(initial),
        *_http_headers(trailers, "" if rest else "trailer-"),  # Connect: trailers prefixed
    ]
    with contextlib.suppress(RuntimeError, OSError):  # the connection may already be gone
        await _respond(send, status, body, headers)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
