"""The contracts as one agency may see them. Pure: file descriptors in, answers out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from tabadol.platform.v1 import discovery_pb2

DISCOVERY = "tabadol.platform.v1.Discovery"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
PLATFORM_SERVICES = (DISCOVERY, HEALTH, REFLECTION)


def _platform_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The platform services' own contracts, so reflection can describe them too."""
    files = {}
    for module in (discovery_pb2, health_pb2, reflection_pb2, descriptor_pb2):
        fd = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        files[fd.name] = fd
    return files


PLATFORM_FILES = _platform_files()


class Catalogue:
    """The contracts as one agency may see them: only services it may call (or whose contract
    is public), the platform ones, and the files those need; nothing else, not even a type.

    Pure: built from file descriptors and a set of visible service names.
    """

    def __init__(
        self, files: Mapping[str, descriptor_pb2.FileDescriptorProto], visible: Iterable[str]
    ) -> None:
        self.files = {**PLATFORM_FILES, **files}
        self.visible = frozenset(visible) | frozenset(PLATFORM_SERVICES)
        self._symbols: dict[str, str] = {}  # full name -> file name
        self._services: dict[str, str] = {}  # service full name -> file name
        for fd in self.files.values():
            prefix = f"{fd.package}." if fd.package else ""
            for svc in fd.service:
                full = prefix + svc.name
                self._services[full] = fd.name
                self._symbols[full] = fd.name
                for method in svc.method:
                    self._symbols[f"{full}.{method.name}"] = fd.name
            self._index_types(prefix, fd.message_type, fd.enum_type, fd.name)
        # The files a visible service needs: its own and every one it imports. A type
        # defined anywhere else (in the file of a service the caller may not call) is hidden.
        self._visible_files = {
            f.name for s in self.services() for f in self.closure(self._services[s])
        }

    def _index_types(
        self, prefix: str, messages: Iterable[Any], enums: Iterable[Any], file: str
    ) -> None:
        for enum in enums:
            self._symbols[prefix + enum.name] = file
        for message in messages:
            full = prefix + message.name
            self._symbols[full] = file
            self._index_types(f"{full}.", message.nested_type, message.enum_type, file)

    def services(self) -> list[str]:
        return sorted(s for s in self._services if s in self.visible)

    def _shown(self, fd: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
        """A file with the services the caller may not call taken out."""
        prefix = f"{fd.package}." if fd.package else ""
        hidden = [s for s in fd.service if prefix + s.name not in self.visible]
        if not hidden:
            return fd
        shown = descriptor_pb2.FileDescriptorProto()
        shown.CopyFrom(fd)
        del shown.service[:]
        shown.service.extend(s for s in fd.service if prefix + s.name in self.visible)
        shown.ClearField("source_code_info")  # its paths would point at removed services
        return shown

    def closure(self, name: str) -> list[descriptor_pb2.FileDescriptorProto]:
        """A file and every file it imports, dependencies first, as the caller may see them."""
        ordered: list[descriptor_pb2.FileDescriptorProto] = []
        seen: set[str] = set()

        def visit(file_name: str) -> None:
            if file_name in seen or file_name not in self.files:
                return
            seen.add(file_name)
            fd = self.files[file_name]
            for dependency in fd.dependency:
                visit(dependency)
            ordered.append(self._shown(fd))

        visit(name)
        return ordered

    def file_of(self, symbol: str) -> str | None:
        """The file defining a symbol the caller may see, or None."""
        file = self._symbols.get(symbol)
        if file is None or file not in self._visible_files:
            return None
        service = next(
            (s for s in (symbol, symbol.rpartition(".")[0]) if s in self._services), None
        )
        if service is not None and service not in self.visible:
            return None  # exists, but not for this caller: it is told nothing
        return file

    def visible_file(self, name: str) -> bool:
        """A file the caller may fetch by name: one defining a service it may see, or a
        dependency of such a file."""
        return name in self._visible_files
