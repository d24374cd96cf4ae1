"""Contracts rendered for people: ``tabadol services`` and ``tabadol describe``. Pure."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import descriptor_pb2

from tabadol.platform.v1 import discovery_pb2

KIND_WORDS = {
    discovery_pb2.RPC_KIND_UNARY: "unary",
    discovery_pb2.RPC_KIND_SERVER_STREAMING: "server streaming",
    discovery_pb2.RPC_KIND_CLIENT_STREAMING: "client streaming",
    discovery_pb2.RPC_KIND_BIDI_STREAMING: "bidi streaming",
}
_LABEL = {
    descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED: "repeated ",
}
_SCALARS = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in descriptor_pb2.FieldDescriptorProto.Type.items()
}


def services_table(services: Iterable[discovery_pb2.Service], agency: str) -> str:
    """One line per method, grouped by service; a mark where ``agency`` may call it."""
    lines = [f"Services on the exchange (✓ = agency {agency!r} may call it):", ""]
    for service in services:
        lines.append(f"{service.name}  ({service.version}, provided by {service.provider})")
        for method in service.methods:
            mark = "✓" if method.allowed else " "
            lines.append(f"  {mark} {method.name:<28} {KIND_WORDS.get(method.kind, '?')}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _comments(fd: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {
        tuple(location.path): location.leading_comments.rstrip()
        for location in fd.source_code_info.location
        if location.leading_comments.strip()
    }


def _comment(text: str, indent: str) -> list[str]:
    # protoc keeps the space after "//"; it is put back as it was written.
    return [f"{indent}//{line}".rstrip() for line in text.splitlines()]


def _type_name(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type_name:
        return field.type_name.lstrip(".")
    return _SCALARS.get(field.type, "?")


def describe(
    contract: descriptor_pb2.FileDescriptorSet,
    service: str,
    methods: Iterable[discovery_pb2.Method],
    provider: str,
) -> str:
    """A service as its contract states it, with its comments, and the messages it uses."""
    allowed = {m.name: m.allowed for m in methods}
    messages: dict[
        str, tuple[descriptor_pb2.DescriptorProto, dict[tuple[int, ...], str], tuple[int, ...]]
    ] = {}
    for fd in contract.file:
        notes = _comments(fd)
        for i, message in enumerate(fd.message_type):
            messages[f"{fd.package}.{message.name}"] = (message, notes, (4, i))
    lines: list[str] = []
    for fd in contract.file:
        notes = _comments(fd)
        for i, svc in enumerate(fd.service):
            if f"{fd.package}.{svc.name}" != service:
                continue
            lines += _comment(notes.get((6, i), ""), "")
            lines.append(f"service {service} {{  // provided by {provider}, in {fd.name}")
            used: list[str] = []
            for j, method in enumerate(svc.method):
                lines.append("")
                lines += _comment(notes.get((6, i, 2, j), ""), "  ")
                request = ("stream " if method.client_streaming else "") + method.input_type.lstrip(
                    "."
                )
                response = (
                    "stream " if method.server_streaming else ""
                ) + method.output_type.lstrip(".")
                mark = "" if allowed.get(method.name) else "  // you have no grant for this method"
                lines.append(f"  rpc {method.name}({request}) returns ({response});{mark}")
                used += [method.input_type.lstrip("."), method.output_type.lstrip(".")]
            lines.append("}")
            for name in dict.fromkeys(used):
                if name in messages:
                    lines += ["", *_message(name, *messages[name])]
    return "\n".join(lines) + "\n"


def _message(
    name: str,
    message: descriptor_pb2.DescriptorProto,
    notes: dict[tuple[int, ...], str],
    path: tuple[int, ...],
) -> list[str]:
    lines = _comment(notes.get(path, ""), "")
    lines.append(f"message {name} {{")
    for k, field in enumerate(message.field):
        lines += _comment(notes.get((*path, 2, k), ""), "  ")
        label = _LABEL.get(field.label, "")
        lines.append(f"  {label}{_type_name(field)} {field.name} = {field.number};")
    lines.append("}")
    return lines
