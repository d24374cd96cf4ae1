"""Contracts rendered for people: ``tabadol services`` and ``tabadol describe``. Pure."""

from __future__ import annotations

import json
import re
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


# What a contract's author could use to take over the reader's terminal or reorder what it
# shows: C0 and C1 controls (ESC starts every ANSI sequence), DEL, the Unicode line and
# paragraph separators, the bidirectional marks, overrides and isolates ("Trojan Source":
# U+061C, U+200E-U+200F, U+202A-U+202E, U+2066-U+2069), and invisible characters that hide
# or split what is shown (U+200B, U+2060-U+2064, U+206A-U+206F, U+FEFF). The zero-width
# non-joiner and joiner (U+200C, U+200D) stay: Persian words are written with them.
_CONTROLS = (
    r"\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028\u2029\u202a-\u202e"
    r"\u2060-\u2064\u2066-\u206f\ufeff"
)
_UNSAFE = re.compile(rf"[\t\n{_CONTROLS}]")
_UNSAFE_IN_COMMENTS = re.compile(rf"[{_CONTROLS}]")  # newlines and tabs are the comment's


def printable(text: str, *, multiline: bool = False) -> str:
    """Text from the broker, safe to print: each control character shown escaped (``\\x1b``),
    so none reaches the terminal as a command. ``multiline`` keeps newlines and tabs."""
    if multiline:
        text = text.replace("\r\n", "\n")
    unsafe = _UNSAFE_IN_COMMENTS if multiline else _UNSAFE
    return unsafe.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)


def openapi_text(document: str) -> str:
    """An OpenAPI document from the broker, indented, with each control character escaped as
    JSON allows (``\\u202e``): still the same JSON, but nothing in it commands the terminal.
    ValueError when it is not JSON."""
    try:
        parsed = json.loads(document)
    except json.JSONDecodeError as e:
        raise ValueError(f"the broker's OpenAPI document is not JSON: {e}") from e
    text = json.dumps(parsed, indent=2, ensure_ascii=False)
    # json.dumps escapes C0 controls itself; whatever else is unsafe is inside a string.
    return _UNSAFE_IN_COMMENTS.sub(lambda m: f"\\u{ord(m[0]):04x}", text) + "\n"


def services_table(services: Iterable[discovery_pb2.Service], agency: str) -> str:
    """One line per method, grouped by service; a mark where ``agency`` may call it."""
    lines = [f"Services on the exchange (✓ = agency '{printable(agency)}' may call it):", ""]
    for service in services:
        name, version = printable(service.name), printable(service.version)
        lines.append(f"{name}  ({version}, provided by {printable(service.provider)})")
        for method in service.methods:
            mark = "✓" if method.allowed else " "
            kind = KIND_WORDS.get(method.kind, "?")
            lines.append(f"  {mark} {printable(method.name):<28} {kind}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _comments(fd: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {
        tuple(location.path): printable(location.leading_comments.rstrip(), multiline=True)
        for location in fd.source_code_info.location
        if location.leading_comments.strip()
    }


def _comment(text: str, indent: str) -> list[str]:
    # protoc keeps the space after "//"; it is put back as it was written.
    return [f"{indent}//{line}".rstrip() for line in text.splitlines()]


def _type_name(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type_name:
        return printable(field.type_name.lstrip("."))
    return _SCALARS.get(field.type, "?")


def describe(
    contract: descriptor_pb2.FileDescriptorSet,
    service: str,
    methods: Iterable[discovery_pb2.Method],
    provider: str,
) -> str:
    """A service as its contract states it, with its comments, and the messages it uses.
    Every name and comment is passed through ``printable``: the contract is an agency's text."""
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
            where = f"provided by {printable(provider)}, in {printable(fd.name)}"
            lines.append(f"service {printable(service)} {{  // {where}")
            used: list[str] = []
            for j, method in enumerate(svc.method):
                lines.append("")
                lines += _comment(notes.get((6, i, 2, j), ""), "  ")
                request = ("stream " if method.client_streaming else "") + printable(
                    method.input_type.lstrip(".")
                )
                response = ("stream " if method.server_streaming else "") + printable(
                    method.output_type.lstrip(".")
                )
                mark = "" if allowed.get(method.name) else "  // you have no grant for this method"
                rpc = printable(method.name)
                lines.append(f"  rpc {rpc}({request}) returns ({response});{mark}")
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
    lines.append(f"message {printable(name)} {{")
    for k, field in enumerate(message.field):
        lines += _comment(notes.get((*path, 2, k), ""), "  ")
        label = _LABEL.get(field.label, "")
        lines.append(f"  {label}{_type_name(field)} {printable(field.name)} = {field.number};")
    lines.append("}")
    return lines
