"""Breaking changes between two versions of the contracts, within each package's major version.

A package's last component is its major version (``tabadol.agencies.nocr.v1``). Whatever a
published package contains is a promise to the agencies that consume it, so only additions are
compatible: anything removed, renamed, renumbered or retyped is reported. The rules are strict
on purpose: a change that happens to be wire-compatible (int32 to int64) still breaks the
generated code and JSON of consumers that were built against the old contract.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from google.api import annotations_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2

from tabadol.contracts import RpcKind, well_known

FileDescriptorProto = descriptor_pb2.FileDescriptorProto
DescriptorProto = descriptor_pb2.DescriptorProto
EnumDescriptorProto = descriptor_pb2.EnumDescriptorProto
FieldDescriptorProto = descriptor_pb2.FieldDescriptorProto
ServiceDescriptorProto = descriptor_pb2.ServiceDescriptorProto

_VERSION = re.compile(r"^v\d+")


class BreakingKind(enum.StrEnum):
    PACKAGE_REMOVED = "PACKAGE_REMOVED"
    SERVICE_REMOVED = "SERVICE_REMOVED"
    METHOD_REMOVED = "METHOD_REMOVED"
    METHOD_STREAMING_CHANGED = "METHOD_STREAMING_CHANGED"
    METHOD_INPUT_TYPE_CHANGED = "METHOD_INPUT_TYPE_CHANGED"
    METHOD_OUTPUT_TYPE_CHANGED = "METHOD_OUTPUT_TYPE_CHANGED"
    HTTP_ROUTE_REMOVED = "HTTP_ROUTE_REMOVED"
    HTTP_ROUTE_CHANGED = "HTTP_ROUTE_CHANGED"
    MESSAGE_REMOVED = "MESSAGE_REMOVED"
    FIELD_REMOVED = "FIELD_REMOVED"
    FIELD_RENUMBERED = "FIELD_RENUMBERED"
    FIELD_RENAMED = "FIELD_RENAMED"
    FIELD_JSON_NAME_CHANGED = "FIELD_JSON_NAME_CHANGED"
    FIELD_TYPE_CHANGED = "FIELD_TYPE_CHANGED"
    FIELD_CARDINALITY_CHANGED = "FIELD_CARDINALITY_CHANGED"
    FIELD_ONEOF_CHANGED = "FIELD_ONEOF_CHANGED"
    RESERVED_FIELD_NUMBER_USED = "RESERVED_FIELD_NUMBER_USED"
    RESERVED_FIELD_NAME_USED = "RESERVED_FIELD_NAME_USED"
    ENUM_REMOVED = "ENUM_REMOVED"
    ENUM_VALUE_REMOVED = "ENUM_VALUE_REMOVED"
    ENUM_VALUE_RENUMBERED = "ENUM_VALUE_RENUMBERED"
    ENUM_VALUE_RENAMED = "ENUM_VALUE_RENAMED"
    RESERVED_ENUM_NUMBER_USED = "RESERVED_ENUM_NUMBER_USED"
    RESERVED_ENUM_NAME_USED = "RESERVED_ENUM_NAME_USED"


@dataclass(frozen=True)
class Breaking:
    """One change that breaks consumers of the old contract, and why."""

    kind: BreakingKind
    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message} [{self.kind}]"


def breaking_changes(
    old: Iterable[FileDescriptorProto], new: Iterable[FileDescriptorProto]
) -> list[Breaking]:
    """Every breaking change from `old` to `new`, sorted by location.

    Well-known files (google/protobuf/..., google/api/...) are not compared: no agency owns
    them, and a contract that stops importing one has not removed anything from its consumers.
    """
    before, after = _Schema.of(old), _Schema.of(new)
    found: list[Breaking] = []
    for package in sorted(before.packages - after.packages):
        found.append(_package_removed(package, after.packages))
    for fd in before.files:
        if fd.package in after.packages:
            found.extend(_FileComparison(fd, before, after).run())
    return sorted(found, key=lambda b: (b.location, b.kind))


def _package_removed(package: str, remaining: Iterable[str]) -> Breaking:
    base, _, version = package.rpartition(".")
    successors = []
    if _VERSION.match(version):
        successors = sorted(
            p
            for p in remaining
            if p.rpartition(".")[0] == base and _VERSION.match(p.rpartition(".")[2])
        )
    why = f"consumers of {package} can no longer call or decode anything in it"
    if successors:
        why += (
            f". Publishing {', '.join(successors)} beside it does not replace it: keep "
            f"{package} until every consumer has moved to the new version"
        )
    return Breaking(
        BreakingKind.PACKAGE_REMOVED, package, f"package {package} was removed or renamed; {why}"
    )


@dataclass(frozen=True)
class _Schema:
    """One version of the contracts, indexed by fully-qualified names (no leading dot)."""

    files: tuple[FileDescriptorProto, ...]
    packages: frozenset[str]
    services: Mapping[str, ServiceDescriptorProto]
    messages: Mapping[str, DescriptorProto]
    enums: Mapping[str, EnumDescriptorProto]
    syntax: Mapping[str, str]  # message name -> syntax of its file

    @classmethod
    def of(cls, files: Iterable[FileDescriptorProto]) -> _Schema:
        by_name: dict[str, FileDescriptorProto] = {}
        for fd in files:
            if not well_known(fd.name):
                by_name.setdefault(fd.name, fd)
        services: dict[str, ServiceDescriptorProto] = {}
        messages: dict[str, DescriptorProto] = {}
        enums: dict[str, EnumDescriptorProto] = {}
        syntax: dict[str, str] = {}
        for fd in by_name.values():
            for svc in fd.service:
                services[_join(fd.package, svc.name)] = svc
            for full, msg in _walk_messages(fd.package, fd.message_type):
                messages[full] = msg
                syntax[full] = fd.syntax or "proto2"
                for e in msg.enum_type:
                    enums[_join(full, e.name)] = e
            for e in fd.enum_type:
                enums[_join(fd.package, e.name)] = e
        return cls(
            files=tuple(by_name.values()),
            packages=frozenset(fd.package for fd in by_name.values()),
            services=services,
            messages=messages,
            enums=enums,
            syntax=syntax,
        )


class _FileComparison:
    """Compares the elements one OLD file declares with the same names in NEW."""

    def __init__(self, fd: FileDescriptorProto, before: _Schema, after: _Schema) -> None:
        self.fd, self.before, self.after = fd, before, after

    def run(self) -> Iterator[Breaking]:
        for svc in self.fd.service:
            yield from self._service(_join(self.fd.package, svc.name), svc)
        for msg in self.fd.message_type:
            yield from self._message(_join(self.fd.package, msg.name), msg)
        for e in self.fd.enum_type:
            yield from self._enum(_join(self.fd.package, e.name), e)

    def _service(self, name: str, old: ServiceDescriptorProto) -> Iterator[Breaking]:
        new = self.after.services.get(name)
        if new is None:
            yield Breaking(
                BreakingKind.SERVICE_REMOVED,
                name,
                f"service {name} was removed or renamed; consumers calling any of its "
                f"{len(old.method)} method(s) now get UNIMPLEMENTED",
            )
            return
        methods = {m.name: m for m in new.method}
        for om in old.method:
            where = f"{name}/{om.name}"
            nm = methods.get(om.name)
            if nm is None:
                yield Breaking(
                    BreakingKind.METHOD_REMOVED,
                    where,
                    f"method {where} was removed or renamed; consumers calling it now get "
                    "UNIMPLEMENTED",
                )
                continue
            was = RpcKind.of(om.client_streaming, om.server_streaming)
            now = RpcKind.of(nm.client_streaming, nm.server_streaming)
            if was != now:
                yield Breaking(
                    BreakingKind.METHOD_STREAMING_CHANGED,
                    where,
                    f"method {where} changed from {_rpc_kind(was)} to {_rpc_kind(now)}; "
                    "consumers' stubs call it the old way and the call fails",
                )
            for kind, side, before, after in [
                (BreakingKind.METHOD_INPUT_TYPE_CHANGED, "request", om.input_type, nm.input_type),
                (
                    BreakingKind.METHOD_OUTPUT_TYPE_CHANGED,
                    "response",
                    om.output_type,
                    nm.output_type,
                ),
            ]:
                if before != after:
                    yield Breaking(
                        kind,
                        where,
                        f"method {where} changed its {side} type from {_bare(before)} to "
                        f"{_bare(after)}; consumers send or decode the old message and the "
                        "bytes are misread",
                    )
            yield from _http_route_changes(where, om, nm)

    def _message(self, name: str, old: DescriptorProto) -> Iterator[Breaking]:
        new = self.after.messages.get(name)
        if new is None:
            yield Breaking(
                BreakingKind.MESSAGE_REMOVED,
                name,
                f"message {name} was removed or renamed; consumers' code that builds or reads "
                "it no longer compiles against the new contract",
            )
            return
        yield from _FieldComparison(name, old, new, self).run()
        for nested in old.nested_type:
            # A map's entry message comes and goes with its field, which is compared instead.
            if not nested.options.map_entry:
                yield from self._message(_join(name, nested.name), nested)
        for e in old.enum_type:
            yield from self._enum(_join(name, e.name), e)

    def _enum(self, name: str, old: EnumDescriptorProto) -> Iterator[Breaking]:
        new = self.after.enums.get(name)
        if new is None:
            yield Breaking(
                BreakingKind.ENUM_REMOVED,
                name,
                f"enum {name} was removed or renamed; consumers' code that uses it no longer "
                "compiles against the new contract",
            )
            return
        new_by_number: dict[int, list[str]] = {}
        for v in new.value:
            new_by_number.setdefault(v.number, []).append(v.name)
        new_by_name = {v.name: v.number for v in new.value}
        for ov in old.value:
            where = f"{name}.{ov.name}"
            same_number = new_by_number.get(ov.number, [])
            if ov.name in same_number:
                continue
            if ov.name in new_by_name:
                yield Breaking(
                    BreakingKind.ENUM_VALUE_RENUMBERED,
                    where,
                    f"enum value {ov.name} of {name} was renumbered from {ov.number} to "
                    f"{new_by_name[ov.name]}; consumers built against the old number read it "
                    "as a different value",
                )
            elif same_number:
                yield Breaking(
                    BreakingKind.ENUM_VALUE_RENAMED,
                    where,
                    f"enum value {ov.number} of {name} was renamed from {ov.name} to "
                    f"{' / '.join(same_number)}; JSON carries enum values by name, and "
                    "consumers' code that names it no longer compiles",
                )
            else:
                yield Breaking(
                    BreakingKind.ENUM_VALUE_REMOVED,
                    where,
                    f"enum value {ov.name} ({ov.number}) of {name} was removed; consumers "
                    "that send or expect it break. Keep it, or reserve it in the enum: "
                    f'`reserved {ov.number}; reserved "{ov.name}";`',
                )
        old_numbers = {v.number for v in old.value}
        old_names = {v.name for v in old.value}
        reserved_names = set(old.reserved_name)
        for nv in new.value:
            where = f"{name}.{nv.name}"
            if nv.number not in old_numbers and any(
                r.start <= nv.number <= r.end for r in old.reserved_range
            ):
                yield Breaking(
                    BreakingKind.RESERVED_ENUM_NUMBER_USED,
                    where,
                    f"enum value {nv.name} of {name} uses number {nv.number}, which the old "
                    "contract reserved; consumers may still send the value that once had it",
                )
            if nv.name not in old_names and nv.name in reserved_names:
                yield Breaking(
                    BreakingKind.RESERVED_ENUM_NAME_USED,
                    where,
                    f"enum value {nv.name} of {name} uses a name the old contract reserved; "
                    "JSON written with the old value is read as this one",
                )


class _FieldComparison:
    """Compares the fields of one message, matched by number (their identity on the wire)."""

    def __init__(
        self, name: str, old: DescriptorProto, new: DescriptorProto, file: _FileComparison
    ) -> None:
        self.name, self.old, self.new = name, old, new
        self.before, self.after = file.before, file.after

    def run(self) -> Iterator[Breaking]:
        new_by_number = {f.number: f for f in self.new.field}
        new_by_name = {f.name: f for f in self.new.field}
        old_names = {f.name for f in self.old.field}
        for of in self.old.field:
            where = f"{self.name}.{of.name}"
            nf = new_by_number.get(of.number)
            moved = new_by_name.get(of.name)
            if moved is not None and moved.number != of.number:
                yield Breaking(
                    BreakingKind.FIELD_RENUMBERED,
                    where,
                    f"field {of.name} of {self.name} was renumbered from {of.number} to "
                    f"{moved.number}; consumers still send and read it as field {of.number}",
                )
                continue
            if nf is None or nf.name in old_names - {of.name}:
                yield self._removed(where, of, nf)
                continue
            if nf.name != of.name:
                yield Breaking(
                    BreakingKind.FIELD_RENAMED,
                    where,
                    f"field {of.number} of {self.name} was renamed from {of.name} to {nf.name}; "
                    "the binary wire format is unchanged, but JSON (and grpc-gateway) "
                    "consumers send and expect the old name, and consumers' code no longer "
                    "compiles",
                )
            elif of.json_name and nf.json_name and of.json_name != nf.json_name:
                yield Breaking(
                    BreakingKind.FIELD_JSON_NAME_CHANGED,
                    where,
                    f"field {of.name} of {self.name} changed its JSON name from "
                    f"{of.json_name} to {nf.json_name}; JSON consumers send and expect the "
                    "old name",
                )
            yield from self._same_number(where, of, nf)
        old_numbers = {f.number for f in self.old.field}
        reserved_names = set(self.old.reserved_name)
        for nf in self.new.field:
            where = f"{self.name}.{nf.name}"
            if nf.number not in old_numbers and any(
                r.start <= nf.number < r.end for r in self.old.reserved_range
            ):
                yield Breaking(
                    BreakingKind.RESERVED_FIELD_NUMBER_USED,
                    where,
                    f"field {nf.name} of {self.name} uses number {nf.number}, which the old "
                    "contract reserved; consumers that still send the removed field's data "
                    "would have it misread as this field",
                )
            if nf.name not in old_names and nf.name in reserved_names:
                yield Breaking(
                    BreakingKind.RESERVED_FIELD_NAME_USED,
                    where,
                    f"field {nf.name} of {self.name} uses a name the old contract reserved; "
                    "JSON written with the removed field is read as this one",
                )

    def _removed(
        self, where: str, of: FieldDescriptorProto, reuser: FieldDescriptorProto | None
    ) -> Breaking:
        if reuser is not None:
            advice = (
                f"; worse, its number is now used by {reuser.name}, so data consumers send "
                f"as {of.name} is misread as {reuser.name}"
            )
        elif any(r.start <= of.number < r.end for r in self.new.reserved_range):
            advice = f" (number {of.number} is reserved now, which stops it being reused)"
        else:
            advice = (
                f'. Keep it, or reserve it in {self.new.name}: `reserved {of.number}; reserved "'
                f'{of.name}";` so that no later field reuses the number'
            )
        return Breaking(
            BreakingKind.FIELD_REMOVED,
            where,
            f"field {of.name} ({of.number}) of {self.name} was removed; consumers that set or "
            f"read it break{advice}",
        )

    def _same_number(
        self, where: str, of: FieldDescriptorProto, nf: FieldDescriptorProto
    ) -> Iterator[Breaking]:
        was, now = _type(of, self.before), _type(nf, self.after)
        if was != now:
            yield Breaking(
                BreakingKind.FIELD_TYPE_CHANGED,
                where,
                f"field {of.name} ({of.number}) of {self.name} changed type from {was} to {now}; "
                "consumers encode and decode it as the old type (even where the wire format "
                "happens to agree, their generated code and JSON do not)",
            )
        was = _cardinality(of, self.before.syntax[self.name])
        now = _cardinality(nf, self.after.syntax[self.name])
        if was != now:
            if "repeated" in (was, now):
                why = "consumers' code reads a single value where there is a list (or the reverse)"
            else:
                why = (
                    "consumers that check whether it was set (or rely on it always being set) break"
                )
            yield Breaking(
                BreakingKind.FIELD_CARDINALITY_CHANGED,
                where,
                f"field {of.name} ({of.number}) of {self.name} changed cardinality from {was} "
                f"to {now}; {why}",
            )
        old_oneof, new_oneof = _oneof(of, self.old), _oneof(nf, self.new)
        if old_oneof != new_oneof:
            if old_oneof is None:
                change = f"moved into oneof {new_oneof}"
            elif new_oneof is None:
                change = f"moved out of oneof {old_oneof}"
            else:
                change = f"moved from oneof {old_oneof} to oneof {new_oneof}"
            yield Breaking(
                BreakingKind.FIELD_ONEOF_CHANGED,
                where,
                f"field {of.name} ({of.number}) of {self.name} {change}; setting one member of "
                "a oneof clears the others, so consumers that set fields together lose data, "
                "and their code that asks which member is set no longer compiles",
            )


_SCALARS = {
    value: name.removeprefix("TYPE_").lower() for name, value in FieldDescriptorProto.Type.items()
}


def _type(field: FieldDescriptorProto, schema: _Schema) -> str:
    if field.type == FieldDescriptorProto.TYPE_MESSAGE:
        entry = schema.messages.get(_bare(field.type_name))
        if entry is not None and entry.options.map_entry:
            key, value = sorted(entry.field, key=lambda f: f.number)
            return f"map<{_type(key, schema)}, {_type(value, schema)}>"
    if field.type_name:
        return _bare(field.type_name)
    return _SCALARS.get(field.type, str(field.type))


def _cardinality(field: FieldDescriptorProto, syntax: str) -> str:
    if field.label == FieldDescriptorProto.LABEL_REPEATED:
        return "repeated"
    if field.label == FieldDescriptorProto.LABEL_REQUIRED:
        return "required"
    if field.proto3_optional:
        return "optional (explicit presence)"
    if syntax == "proto3":
        return "singular (no presence)"
    return "optional"


def _oneof(field: FieldDescriptorProto, msg: DescriptorProto) -> str | None:
    # proto3 `optional` wraps a field in a synthetic oneof; that is presence, not a oneof.
    if not field.HasField("oneof_index") or field.proto3_optional:
        return None
    return msg.oneof_decl[field.oneof_index].name


def _http_route_changes(
    where: str, old: descriptor_pb2.MethodDescriptorProto, new: descriptor_pb2.MethodDescriptorProto
) -> Iterator[Breaking]:
    """The HTTP routes (google.api.http) of a method that are gone or carry another shape."""
    now = _http_routes(new)
    for (verb, path), (body, response_body) in _http_routes(old).items():
        route = f"{verb} {path}"
        if (verb, path) not in now:
            yield Breaking(
                BreakingKind.HTTP_ROUTE_REMOVED,
                where,
                f"method {where} lost its HTTP route {route}; agencies calling it over "
                "HTTP/JSON now get 404",
            )
            continue
        new_body, new_response_body = now[verb, path]
        for part, before, after in [
            ("body", body, new_body),
            ("response_body", response_body, new_response_body),
        ]:
            if before != after:
                yield Breaking(
                    BreakingKind.HTTP_ROUTE_CHANGED,
                    where,
                    f"the HTTP route {route} of method {where} changed its {part} from "
                    f"{before or '(none)'!r} to {after or '(none)'!r}; agencies calling it "
                    "over HTTP/JSON send or read the old shape",
                )


def _http_routes(
    method: descriptor_pb2.MethodDescriptorProto,
) -> dict[tuple[str, str], tuple[str, str]]:
    """(verb, path template) -> (body, response_body) of a method's rule and its additional
    bindings."""
    # Re-parsed: a descriptor read before google.api was imported holds the rule as unknown bytes.
    options = descriptor_pb2.MethodOptions.FromString(method.options.SerializeToString())
    if not options.HasExtension(annotations_pb2.http):
        return {}
    rule = options.Extensions[annotations_pb2.http]
    routes: dict[tuple[str, str], tuple[str, str]] = {}
    for binding in (rule, *rule.additional_bindings):
        pattern = binding.WhichOneof("pattern")
        if pattern == "custom":
            verb, path = binding.custom.kind, binding.custom.path
        elif pattern is not None:
            verb, path = pattern.upper(), getattr(binding, pattern)
        else:
            continue
        routes[verb, path] = (binding.body, binding.response_body)
    return routes


def _rpc_kind(kind: RpcKind) -> str:
    return kind.value.replace("_", " ")


def _walk_messages(
    scope: str, messages: Iterable[DescriptorProto]
) -> Iterator[tuple[str, DescriptorProto]]:
    for msg in messages:
        full = _join(scope, msg.name)
        yield full, msg
        yield from _walk_messages(full, msg.nested_type)


def _join(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name


def _bare(type_name: str) -> str:
    return type_name.removeprefix(".")
