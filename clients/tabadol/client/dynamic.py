"""Call any method described by a FileDescriptorSet, with JSON in and JSON out.

For people and scripts (``tabadol call``), like grpcurl: no generated code needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory


class DynamicContracts:
    """A descriptor pool loaded from FileDescriptorSet files."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.pool = descriptor_pool.DescriptorPool()
        for path in paths:
            fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
            for fd in fds.file:
                try:
                    self.pool.FindFileByName(fd.name)
                except KeyError:
                    self.pool.Add(fd)

    def method(self, full_name: str) -> Any:
        """A method descriptor from ``pkg.Service/Method`` or ``pkg.Service.Method``."""
        name = full_name.strip("/").replace("/", ".")
        try:
            return self.pool.FindMethodByName(name)
        except KeyError:
            raise LookupError(f"no method {full_name!r} in the loaded contracts") from None


async def call_json(
    channel: grpc.aio.Channel,
    contracts: DynamicContracts,
    method_name: str,
    requests: list[str],
    *,
    timeout: float | None = None,
) -> AsyncIterator[str]:
    """Send each JSON request (one for a unary request) and yield each response as JSON."""
    method = contracts.method(method_name)
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    messages = [json_format.Parse(text, request_cls()).SerializeToString() for text in requests]
    if not method.client_streaming and len(messages) != 1:
        raise ValueError(f"{method.full_name} takes exactly one request, got {len(messages)}")

    def render(data: bytes) -> str:
        return json_format.MessageToJson(response_cls.FromString(data), indent=2)

    # Bytes in, bytes out: no serializers, the messages are already encoded.
    if method.client_streaming and method.server_streaming:
        bidi: Any = channel.stream_stream(path)
        async for data in bidi(iter(messages), timeout=timeout):
            yield render(data)
    elif method.client_streaming:
        client_stream: Any = channel.stream_unary(path)
        yield render(await client_stream(iter(messages), timeout=timeout))
    elif method.server_streaming:
        server_stream: Any = channel.unary_stream(path)
        async for data in server_stream(messages[0], timeout=timeout):
            yield render(data)
    else:
        unary: Any = channel.unary_unary(path)
        yield render(await unary(messages[0], timeout=timeout))
