"""The Python floor: a grpc.aio pass-through of raw bytes with none of the broker's features.

    .venv/bin/python bench/bare_proxy.py --pki PKI_DIR --contracts FILE --provider HOST:PORT \
        --provider-name echo.agency.tabadol.example [--listen 127.0.0.1:0]

mTLS on both legs (the broker's certificate on each side, the platform CA, client
certificates required), each method forwarded as its own RPC kind (read from the
contracts), with request metadata, the deadline, the status and the trailers carried
across. No identity mapping, policy, tracing, ledger, metrics, limits or size checks: what
any Python proxy has to pay at least. Prints ``listening on PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2

Context = grpc.aio.ServicerContext[Any, Any]
_HOP_BY_HOP = frozenset({"user-agent", "te", "content-type", "host", "connection"})


def method_kinds(contracts: Path) -> dict[str, tuple[bool, bool]]:
    """``/package.Service/Method`` -> (client streaming, server streaming)."""
    files = descriptor_pb2.FileDescriptorSet.FromString(contracts.read_bytes()).file
    kinds = {}
    for file in files:
        prefix = f"{file.package}." if file.package else ""
        for service in file.service:
            for method in service.method:
                path = f"/{prefix}{service.name}/{method.name}"
                kinds[path] = (method.client_streaming, method.server_streaming)
    return kinds


def _outgoing(context: Context) -> dict[str, Any]:
    metadata = tuple(
        (k, v)
        for k, v in context.invocation_metadata() or ()
        if k not in _HOP_BY_HOP and not k.startswith((":", "grpc-"))
    )
    return {"metadata": metadata, "timeout": context.time_remaining()}


async def _relay_error(error: grpc.aio.AioRpcError, context: Context) -> None:
    await context.abort(error.code(), error.details() or "", error.trailing_metadata())


def _handler(
    channel: grpc.aio.Channel, path: str, client_streaming: bool, server_streaming: bool
) -> grpc.RpcMethodHandler[Any, Any]:
    if not server_streaming:
        stub: Callable[..., Any] = (
            channel.stream_unary(path) if client_streaming else channel.unary_unary(path)
        )

        async def single_response(request: Any, context: Context) -> bytes:
            call = stub(request, **_outgoing(context))
            try:
                response: bytes = await call
            except grpc.aio.AioRpcError as e:
                await _relay_error(e, context)
            except asyncio.CancelledError:
                call.cancel()
                raise
            context.set_trailing_metadata(await call.trailing_metadata())
            return response

        if client_streaming:
            return grpc.stream_unary_rpc_method_handler(single_response)
        return grpc.unary_unary_rpc_method_handler(single_response)

    stream_stub: Callable[..., Any] = (
        channel.stream_stream(path) if client_streaming else channel.unary_stream(path)
    )

    async def response_stream(request: Any, context: Context) -> AsyncIterator[bytes]:
        call = stream_stub(request, **_outgoing(context))
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                yield message
        except grpc.aio.AioRpcError as e:
            await _relay_error(e, context)
        except (asyncio.CancelledError, GeneratorExit):
            call.cancel()
            raise
        context.set_trailing_metadata(await call.trailing_metadata())

    if client_streaming:
        return grpc.stream_stream_rpc_method_handler(response_stream)
    return grpc.unary_stream_rpc_method_handler(response_stream)


class PassThrough(grpc.GenericRpcHandler):
    """Every method of the contracts, forwarded to one provider channel."""

    def __init__(self, channel: grpc.aio.Channel, kinds: dict[str, tuple[bool, bool]]) -> None:
        self._handlers = {path: _handler(channel, path, *kind) for path, kind in kinds.items()}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handlers.get(details.method)


async def main(args: argparse.Namespace) -> None:
    ca = (args.pki / "ca.crt").read_bytes()
    cert = (args.pki / "broker.crt").read_bytes()
    key = (args.pki / "broker.key").read_bytes()
    channel = grpc.aio.secure_channel(
        args.provider,
        grpc.ssl_channel_credentials(ca, key, cert),
        options=[("grpc.ssl_target_name_override", args.provider_name)],
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((PassThrough(channel, method_kinds(args.contracts)),))
    port = server.add_secure_port(
        args.listen,
        grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True),
    )
    await server.start()
    print(f"listening on {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pki", type=Path, required=True, help="ca.crt, broker.crt, broker.key")
    parser.add_argument("--contracts", type=Path, required=True, help="a FileDescriptorSet")
    parser.add_argument("--provider", required=True, help="host:port of the provider")
    parser.add_argument("--provider-name", required=True, help="the provider certificate's name")
    parser.add_argument("--listen", default="127.0.0.1:0")
    asyncio.run(main(parser.parse_args()))
