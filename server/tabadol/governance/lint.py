"""Style rules for contracts, in the spirit of buf lint's defaults, plus Tabadol's documentation rules.

Tabadol documents every element of a contract: agencies build against these files without
talking to the provider, so the comment is the documentation. Comments are read from the
descriptor's source info, so a descriptor compiled without ``--include_source_info`` fails
every COMMENT_* rule.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from google.protobuf import descriptor_pb2

from tabadol.errors import ContractError

FileDescriptorProto = descriptor_pb2.FileDescriptorProto
DescriptorProto = descriptor_pb2.DescriptorProto
EnumDescriptorProto = descriptor_pb2.EnumDescriptorProto

RULES = (
    "PACKAGE_VERSION_SUFFIX",
    "PACKAGE_DIRECTORY_MATCH",
    "SERVICE_PASCAL_CASE",
    "RPC_PASCAL_CASE",
    "MESSAGE_PASCAL_CASE",
    "FIELD_LOWER_SNAKE_CASE",
    "ENUM_PASCAL_CASE",
    "ENUM_VALUE_UPPER_SNAKE_CASE",
    "ENUM_VALUE_PREFIX",
    "ENUM_ZERO_VALUE_SUFFIX",
    "COMMENT_SERVICE",
    "COMMENT_RPC",
    "COMMENT_MESSAGE",
    "COMMENT_FIELD",
    "COMMENT_ENUM",
    "COMMENT_ENUM_VALUE",
)

# Field numbers of FileDescriptorProto and friends: the paths of source_code_info locations.
_PACKAGE = 2
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE = 2
_SERVICE_METHOD = 2

_VERSION = re.compile(r"v\d+((alpha|beta)\d*)?")
# At least one lower-case letter: KIND is a shout, not PascalCase.
_PASCAL = re.compile(r"[A-Z]([A-Za-z0-9]*[a-z][A-Za-z0-9]*)?")
_LOWER_SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
_UPPER_SNAKE = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")
# Words of an identifier in any case style: "HTTPRequest_id2" -> HTTP, Request, id2.
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z0-9]+|[A-Z0-9]+")

_SourcePath = tuple[int, ...]


@dataclass(frozen=True)
class Finding:
    """One rule a contract file breaks; `line` is 1-based, or 0 when the file has no source info."""

    file: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message} ({self.rule})"


def lint(
    files: Iterable[FileDescriptorProto],
    *,
    targets: Iterable[str] | None = None,
    only: Iterable[str] | None = None,
) -> list[Finding]:
    """Findings in the `targets` files (default: every file), for the `only` rules (default: all).

    Pass the names of the files you own as `targets`: their imports are usually among `files`.
    """
    rules = set(RULES if only is None else only)
    unknown = rules - set(RULES)
    if unknown:
        raise ValueError(f"unknown lint rule(s) {', '.join(sorted(unknown))}; known: {RULES}")
    by_name: dict[str, FileDescriptorProto] = {}
    for fd in files:
        by_name.setdefault(fd.name, fd)
    wanted = set(by_name) if targets is None else set(targets)
    missing = wanted - set(by_name)
    if missing:
        raise ContractError(f"cannot lint {', '.join(sorted(missing))}: not among the contracts")
    found = [
        finding
        for name in wanted
        for finding in _FileLint(by_name[name]).run()
        if finding.rule in rules
    ]
    return sorted(found, key=lambda f: (f.file, f.line, f.rule, f.message))


def _upper_snake(name: str) -> str:
    """`name` in UPPER_SNAKE_CASE, as enum value prefixes spell it: LifeStatus -> LIFE_STATUS."""
    return "_".join(w.upper() for w in _WORD.findall(name))


def _lower_snake(name: str) -> str:
    return "_".join(w.lower() for w in _WORD.findall(name))


def _pascal(name: str) -> str:
    return "".join(w[:1].upper() + w[1:].lower() for w in _WORD.findall(name))


class _FileLint:
    def __init__(self, fd: FileDescriptorProto) -> None:
        self.fd = fd
        self.locations: dict[_SourcePath, descriptor_pb2.SourceCodeInfo.Location] = {}
        for loc in fd.source_code_info.location:
            self.locations.setdefault(tuple(loc.path), loc)

    def run(self) -> Iterator[Finding]:
        yield from self._package()
        for i, svc in enumerate(self.fd.service):
            yield from self._service((_FILE_SERVICE, i), svc)
        for i, msg in enumerate(self.fd.message_type):
            yield from self._message((_FILE_MESSAGE, i), self._scoped(msg.name), msg)
        for i, enum in enumerate(self.fd.enum_type):
            yield from self._enum((_FILE_ENUM, i), self._scoped(enum.name), enum)

    def _package(self) -> Iterator[Finding]:
        package = self.fd.package
        where = (_PACKAGE,)
        if not package:
            yield self._finding(
                where,
                "PACKAGE_VERSION_SUFFIX",
                "file declares no package; declare one ending in a major version, "
                "such as `package tabadol.agencies.nocr.v1;`",
            )
        elif not _VERSION.fullmatch(package.rpartition(".")[2]):
            yield self._finding(
                where,
                "PACKAGE_VERSION_SUFFIX",
                f"package {package} should end in a major version such as .v1, so that a "
                "breaking change can be published beside it as .v2",
            )
        directory = posixpath.dirname(self.fd.name)
        expected = package.replace(".", "/")
        if directory != expected:
            yield self._finding(
                where,
                "PACKAGE_DIRECTORY_MATCH",
                f"package {package or '(none)'} should be in directory {expected or '(the root)'}/"
                f", not {directory or '(the root)'}/",
            )

    def _service(
        self, path: _SourcePath, svc: descriptor_pb2.ServiceDescriptorProto
    ) -> Iterator[Finding]:
        name = self._scoped(svc.name)
        yield from self._case(path, "SERVICE_PASCAL_CASE", "service", name, svc.name, _PASCAL)
        yield from self._comment(path, "COMMENT_SERVICE", f"service {name}")
        for j, method in enumerate(svc.method):
            mpath = (*path, _SERVICE_METHOD, j)
            where = f"{name}/{method.name}"
            yield from self._case(mpath, "RPC_PASCAL_CASE", "method", where, method.name, _PASCAL)
            yield from self._comment(mpath, "COMMENT_RPC", f"method {where}")

    def _message(self, path: _SourcePath, name: str, msg: DescriptorProto) -> Iterator[Finding]:
        if msg.options.map_entry:  # written by protoc for a map field, not by the author
            return
        yield from self._case(path, "MESSAGE_PASCAL_CASE", "message", name, msg.name, _PASCAL)
        yield from self._comment(path, "COMMENT_MESSAGE", f"message {name}")
        for k, field in enumerate(msg.field):
            fpath = (*path, _MESSAGE_FIELD, k)
            where = f"{name}.{field.name}"
            yield from self._case(
                fpath, "FIELD_LOWER_SNAKE_CASE", "field", where, field.name, _LOWER_SNAKE
            )
            yield from self._comment(fpath, "COMMENT_FIELD", f"field {where}")
        for j, nested in enumerate(msg.nested_type):
            yield from self._message((*path, _MESSAGE_NESTED, j), f"{name}.{nested.name}", nested)
        for j, enum in enumerate(msg.enum_type):
            yield from self._enum((*path, _MESSAGE_ENUM, j), f"{name}.{enum.name}", enum)

    def _enum(self, path: _SourcePath, name: str, enum: EnumDescriptorProto) -> Iterator[Finding]:
        yield from self._case(path, "ENUM_PASCAL_CASE", "enum", name, enum.name, _PASCAL)
        yield from self._comment(path, "COMMENT_ENUM", f"enum {name}")
        prefix = _upper_snake(enum.name) + "_"
        for k, value in enumerate(enum.value):
            vpath = (*path, _ENUM_VALUE, k)
            where = f"{name}.{value.name}"
            yield from self._case(
                vpath, "ENUM_VALUE_UPPER_SNAKE_CASE", "enum value", where, value.name, _UPPER_SNAKE
            )
            if not value.name.startswith(prefix):
                yield self._finding(
                    vpath,
                    "ENUM_VALUE_PREFIX",
                    f"enum value {where} should start with {prefix}: enum values share one "
                    "scope with their siblings, and the prefix keeps them unique",
                )
            if value.number == 0 and value.name != f"{prefix}UNSPECIFIED":
                yield self._finding(
                    vpath,
                    "ENUM_ZERO_VALUE_SUFFIX",
                    f"the zero value of enum {name} should be {prefix}UNSPECIFIED, not "
                    f"{value.name}: zero is what an unset field reads as, so it must not "
                    "mean anything",
                )
            yield from self._comment(vpath, "COMMENT_ENUM_VALUE", f"enum value {where}")

    def _case(
        self, path: _SourcePath, rule: str, what: str, where: str, name: str, style: re.Pattern[str]
    ) -> Iterator[Finding]:
        if style.fullmatch(name):
            return
        suggestion, style_name = {
            _PASCAL: (_pascal(name), "PascalCase"),
            _LOWER_SNAKE: (_lower_snake(name), "lower_snake_case"),
            _UPPER_SNAKE: (_upper_snake(name), "UPPER_SNAKE_CASE"),
        }[style]
        yield self._finding(
            path, rule, f"{what} {where} should be {style_name}, such as {suggestion}"
        )

    def _comment(self, path: _SourcePath, rule: str, what: str) -> Iterator[Finding]:
        loc = self.locations.get(path)
        if loc is None or not loc.leading_comments.strip():
            hint = "" if self.locations else " (no source info: compile with --include_source_info)"
            yield self._finding(
                path, rule, f"{what} has no leading comment; document it for its consumers{hint}"
            )

    def _finding(self, path: Sequence[int], rule: str, message: str) -> Finding:
        loc = self.locations.get(tuple(path))
        line = loc.span[0] + 1 if loc is not None and loc.span else 0
        return Finding(self.fd.name, line, rule, message)

    def _scoped(self, name: str) -> str:
        return f"{self.fd.package}.{name}" if self.fd.package else name
