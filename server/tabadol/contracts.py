"""The contracts the broker knows: services and methods read from FileDescriptorSets."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError

from tabadol.errors import ContractError

# Files no agency owns: google/protobuf/ ships with protoc; google/api/ (the HTTP rules),
# google/rpc/ and google/type/ with googleapis-common-protos.
WELL_KNOWN_PREFIXES = ("google/protobuf/", "google/api/", "google/rpc/", "google/type/")


def well_known(file_name: str) -> bool:
    """A file that ships with protoc or googleapis-common-protos, which no agency owns."""
    return file_name.startswith(WELL_KNOWN_PREFIXES)


class RpcKind(enum.Enum):
    UNARY = "unary"
    SERVER_STREAMING = "server_streaming"
    CLIENT_STREAMING = "client_streaming"
    BIDI_STREAMING = "bidi_streaming"

    @classmethod
    def of(cls, client_streaming: bool, server_streaming: bool) -> RpcKind:
        if client_streaming and server_streaming:
            return cls.BIDI_STREAMING
        if client_streaming:
            return cls.CLIENT_STREAMING
        if server_streaming:
            return cls.SERVER_STREAMING
        return cls.UNARY


@dataclass(frozen=True)
class MethodContract:
    service: str
    name: str
    kind: RpcKind
    # The contract says a repeat is harmless (option idempotency_level = IDEMPOTENT or
    # NO_SIDE_EFFECTS): the broker may retry it on another endpoint.
    idempotent: bool = False

    @property
    def path(self) -> str:
        """The HTTP/2 path gRPC uses for this method: ``/pkg.Service/Method``."""
        return f"/{self.service}/{self.name}"


@dataclass(frozen=True)
class ServiceContract:
    name: str
    file: str
    methods: Mapping[str, MethodContract]


@dataclass(frozen=True)
class Contracts:
    """Every service in the loaded FileDescriptorSets, by fully-qualified name."""

    services: Mapping[str, ServiceContract]
    files: Mapping[str, descriptor_pb2.FileDescriptorProto]

    @classmethod
    def from_files(cls, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> Contracts:
        by_name: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        services: dict[str, ServiceContract] = {}
        for fd in files:
            known = by_name.get(fd.name)
            if known is not None:
                # Sets built by different protoc releases carry different copies of
                # descriptor.proto and the like; any copy serves, so the first one stays.
                if known != fd and not well_known(fd.name):
                    raise ContractError(f"{fd.name} is defined twice with different contents")
                continue
            by_name[fd.name] = fd
            for svc in fd.service:
                full = f"{fd.package}.{svc.name}" if fd.package else svc.name
                methods = {
                    m.name: MethodContract(
                        full,
                        m.name,
                        RpcKind.of(m.client_streaming, m.server_streaming),
                        idempotent=m.options.idempotency_level
                        in (
                            descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
                            descriptor_pb2.MethodOptions.IDEMPOTENT,
                        ),
                    )
                    for m in svc.method
                }
                if full in services:
                    raise ContractError(
                        f"service {full} is defined in both {services[full].file} and {fd.name}"
                    )
                services[full] = ServiceContract(full, fd.name, methods)
        return cls(services, by_name)

    @classmethod
    def load(cls, paths: Iterable[Path]) -> Contracts:
        files: list[descriptor_pb2.FileDescriptorProto] = []
        for path in paths:
            fds = descriptor_pb2.FileDescriptorSet()
            try:
                fds.ParseFromString(path.read_bytes())
            except OSError as e:
                raise ContractError(f"{path}: cannot read contracts: {e.strerror}") from e
            except DecodeError as e:
                raise ContractError(f"{path}: not a FileDescriptorSet: {e}") from e
            files.extend(fds.file)
        return cls.from_files(files)

    def method(self, path: str) -> MethodContract | None:
        """The method at a gRPC path such as ``/pkg.Service/Method``, if it exists."""
        service, _, name = path.lstrip("/").partition("/")
        svc = self.services.get(service)
        return svc.methods.get(name) if svc else None
