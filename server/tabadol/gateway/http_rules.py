"""REST routes from the contracts' ``google.api.http`` rules, mapped as grpc-gateway and Envoy's
gRPC-JSON transcoder map them: path templates, the request message from the path, the query
string and the body, and the response body. Pure: strings and bytes in, messages out.

The rules: https://github.com/googleapis/googleapis/blob/master/google/api/http.proto. Where the
two gateways differ we take the stricter reading, because a call that guesses silently is worse
than one refused with the reason: unknown query parameters and JSON fields are refused, a field
given twice is refused, and a path field may not be set again by the query.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tabadol.contracts import Contracts
from tabadol.errors import ContractError

# Descriptors come from the pure-Python or the upb implementation; both have the same API.
_Type = Any  # google.protobuf.descriptor.Descriptor
_Field = Any  # google.protobuf.descriptor.FieldDescriptor


class BadRequest(Exception):
    """The request cannot become the method's request message; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        if len(message) > _MESSAGE_MOST:  # it may quote the caller's text: never all of it
            message = message[:_MESSAGE_MOST] + "…"
        super().__init__(message)
        self.field = field
        self.message = message


_MESSAGE_MOST = 1000


# -- path templates ------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# RFC 3986 pchar, less what the template syntax itself uses ("*", ":", "{", "}", "/").
_LITERAL = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()+,;=@]|%[0-9A-Fa-f]{2})+")
# RFC 6570 reserved characters: a multi-segment variable keeps them percent-encoded, as
# grpc-gateway (UnescapingModeAllExceptReserved) and Envoy's transcoder do.
_RESERVED = frozenset(b"!#$&'()*+,/:;=?@[]")
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")

_LIT, _STAR, _STARS = "lit", "*", "**"


@dataclass(frozen=True)
class _Segment:
    kind: str  # _LIT, _STAR or _STARS
    text: str = ""


@dataclass(frozen=True)
class _Span:
    """A variable: the field path it binds and the template segments it covers."""

    field_path: str
    start: int
    end: int
    multi: bool  # covers more than one segment, or "**": reserved characters stay encoded


@dataclass(frozen=True)
class _Matched:
    values: dict[str, str]
    missing: str | None  # a bound field whose segment is empty
    error: str | None  # a malformed percent-encoding or invalid UTF-8 in a bound segment
    rank: tuple[int, ...]  # lower is more specific: literals before "*" before "**"


@dataclass(frozen=True)
class PathTemplate:
    """A ``google.api.http`` path template: ``/v1/{name=shelves/*/books/*}:undelete``."""

    text: str
    variables: tuple[str, ...]  # field paths bound, in order
    _segments: tuple[_Segment, ...] = field(default=(), repr=False, compare=False)
    _spans: tuple[_Span, ...] = field(default=(), repr=False, compare=False)
    _verb: str = field(default="", repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> PathTemplate:
        """The template in `text`; ValueError naming what is wrong and where."""
        segments, spans, verb = _TemplateParser(text).parse()
        return cls(text, tuple(s.field_path for s in spans), segments, spans, verb)

    @property
    def shape(self) -> tuple[tuple[str, str], ...]:
        """The template without its variable names: two templates of one shape match the
        same paths."""
        return (*((s.kind, s.text) for s in self._segments), ("verb", self._verb))

    def match(self, path: str) -> dict[str, str] | None:
        """The decoded values of the variables in a raw (percent-encoded) path, or None.

        ValueError if a bound segment has a malformed percent-encoding or is not UTF-8.
        """
        matched = self._match(path)
        if matched is None or matched.missing is not None:
            return None
        if matched.error is not None:
            raise ValueError(matched.error)
        return matched.values

    def openapi_path(self) -> str:
        """The path as OpenAPI writes it: each variable as ``{field.path}``."""
        parts: list[str] = []
        starts = {span.start: span for span in self._spans}
        i = 0
        while i < len(self._segments):
            span = starts.get(i)
            if span is not None:
                parts.append("{" + span.field_path + "}")
                i = span.end
                continue
            segment = self._segments[i]
            parts.append(segment.text if segment.kind == _LIT else segment.kind)
            i += 1
        return "/" + "/".join(parts) + (f":{self._verb}" if self._verb else "")

    def _match(self, path: str) -> _Matched | None:
        if not path.startswith("/"):
            return None
        parts = path[1:].split("/")
        if self._verb:
            suffix = ":" + self._verb
            last = parts[-1]
            if not last.endswith(suffix) or len(last) == len(suffix):
                return None
            parts[-1] = last[: -len(suffix)]
        segments = self._segments
        deep = next((i for i, s in enumerate(segments) if s.kind == _STARS), None)
        # Which path parts each template segment takes: one each, except "**", which takes
        # whatever lies between the segments before it and the literals after it.
        taken: list[tuple[int, int]] = []
        if deep is None:
            if len(parts) != len(segments):
                return None
            taken = [(i, i + 1) for i in range(len(parts))]
        else:
            tail = len(segments) - deep - 1
            if len(parts) < len(segments) - 1:
                return None
            taken = [(i, i + 1) for i in range(deep)]
            taken.append((deep, len(parts) - tail))
            taken.extend((j, j + 1) for j in range(len(parts) - tail, len(parts)))
        rank: list[int] = []
        for segment, (a, _) in zip(segments, taken, strict=True):
            if segment.kind == _LIT:
                if parts[a] != segment.text:
                    return None
                rank.append(0)
            elif segment.kind == _STAR:
                rank.append(1)
            else:
                rank.append(2)
        owner = {i: span for span in self._spans for i in range(span.start, span.end)}
        missing: str | None = None
        for i, segment in enumerate(segments):
            a, b = taken[i]
            empty = segment.kind == _STAR and parts[a] == ""
            empty = empty or (segment.kind == _STARS and all(p == "" for p in parts[a:b]))
            if empty:
                span = owner.get(i)
                if span is None:
                    if segment.kind == _STAR:
                        return None  # an unbound "*" matches one whole, non-empty segment
                else:
                    missing = missing or span.field_path
        values: dict[str, str] = {}
        error: str | None = None
        for span in self._spans:
            a, b = taken[span.start][0], taken[span.end - 1][1]
            try:
                values[span.field_path] = "/".join(_unescape(p, span.multi) for p in parts[a:b])
            except ValueError as e:
                error = error or f"path field {span.field_path}: {e}"
        rank.append(0 if self._verb else 1)
        return _Matched(values, missing, error, tuple(rank))


def _unescape(part: str, keep_reserved: bool) -> str:
    """A path segment percent-decoded as UTF-8; reserved characters stay encoded if asked."""
    bad = _PERCENT.search(part)
    if bad is not None:
        raise ValueError(
            f"malformed percent-encoding {part[bad.start() : bad.start() + 3]!r} in {part!r}"
        )
    if "%" not in part:
        return part
    out = bytearray()
    i = 0
    raw = part.encode("utf-8")
    while i < len(raw):
        if raw[i] == 0x25:  # "%"
            byte = int(raw[i + 1 : i + 3], 16)
            if keep_reserved and byte in _RESERVED:
                out += raw[i : i + 3]
            else:
                out.append(byte)
            i += 3
        else:
            out.append(raw[i])
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{part!r} does not decode to UTF-8 text ({e.reason})") from None


class _TemplateParser:
    """Template = "/" Segments [ Verb ]; Segments = Segment { "/" Segment };
    Segment = "*" | "**" | LITERAL | Variable; Variable = "{" FieldPath [ "=" Segments ] "}"."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.segments: list[_Segment] = []
        self.spans: list[_Span] = []

    def fail(self, problem: str) -> ValueError:
        return ValueError(f"path template {self.text!r}: {problem} at position {self.pos}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> tuple[tuple[_Segment, ...], tuple[_Span, ...], str]:
        if not self.text.startswith("/"):
            raise ValueError(f"path template {self.text!r} does not start with '/'")
        self.pos = 1
        self.parse_segments(in_variable=False)
        verb = ""
        if self.peek() == ":":
            self.pos += 1
            verb = self.literal("verb")
        if self.pos < len(self.text):
            raise self.fail(f"unexpected {self.peek()!r}")
        self.check()
        return tuple(self.segments), tuple(self.spans), verb

    def parse_segments(self, *, in_variable: bool) -> None:
        while True:
            self.segment(in_variable=in_variable)
            if self.peek() != "/":
                return
            self.pos += 1

    def segment(self, *, in_variable: bool) -> None:
        if self.text.startswith("**", self.pos):
            self.pos += 2
            self.segments.append(_Segment(_STARS))
        elif self.peek() == "*":
            self.pos += 1
            self.segments.append(_Segment(_STAR))
        elif self.peek() == "{":
            if in_variable:
                raise self.fail("variables cannot nest")
            self.variable()
            return
        else:
            self.segments.append(_Segment(_LIT, self.literal("segment")))
            return
        if self.peek() not in ("", "/", ":", "}"):
            raise self.fail("'*' and '**' must be whole segments")

    def literal(self, what: str) -> str:
        found = _LITERAL.match(self.text, self.pos)
        if found is None:
            if self.peek() in ("", "/", ":", "}"):
                raise self.fail(f"empty {what}")
            raise self.fail(f"{self.peek()!r} cannot appear in a {what}")
        self.pos = found.end()
        return found.group()

    def variable(self) -> None:
        self.pos += 1  # "{"
        names: list[str] = []
        while True:
            ident = _IDENT.match(self.text, self.pos)
            if ident is None:
                raise self.fail("a variable needs a field path (field or field.subfield)")
            names.append(ident.group())
            self.pos = ident.end()
            if self.peek() != ".":
                break
            self.pos += 1
        start = len(self.segments)
        if self.peek() == "=":
            self.pos += 1
            self.parse_segments(in_variable=True)
        else:
            self.segments.append(_Segment(_STAR))
        if self.peek() != "}":
            raise self.fail(f"variable {'.'.join(names)} is not closed with '}}'")
        self.pos += 1
        end = len(self.segments)
        multi = end - start > 1 or any(s.kind == _STARS for s in self.segments[start:end])
        self.spans.append(_Span(".".join(names), start, end, multi))

    def check(self) -> None:
        deep = [i for i, s in enumerate(self.segments) if s.kind == _STARS]
        after = self.segments[deep[0] + 1 :] if deep else []
        if any(s.kind != _LIT for s in after):
            raise ValueError(f"path template {self.text!r}: only literal segments may follow '**'")
        bound: list[str] = []
        for span in self.spans:
            for other in bound:
                if span.field_path == other:
                    raise ValueError(f"path template {self.text!r} binds {other} twice")
                if span.field_path.startswith(other + ".") or other.startswith(
                    span.field_path + "."
                ):
                    raise ValueError(
                        f"path template {self.text!r} binds both {other} and {span.field_path}"
                    )
            bound.append(span.field_path)


# -- rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """One HTTP rule of a method: its verb, path template, body field and response field."""

    verb: str
    template: PathTemplate
    body: str  # "" no body, "*" the whole request, else a top-level request field
    response_body: str  # "" the whole response, else a top-level response field


def bindings(method: descriptor_pb2.MethodDescriptorProto) -> tuple[Binding, ...]:
    """The method's ``google.api.http`` rule and its additional_bindings; () if it has none.

    ValueError naming the problem for a rule that cannot be served.
    """
    # Read the options again now that the extension is registered: a descriptor parsed
    # before google.api.annotations was imported holds the rule as an unknown field.
    options = descriptor_pb2.MethodOptions.FromString(method.options.SerializeToString())
    if not options.HasExtension(annotations_pb2.http):
        return ()
    rule = options.Extensions[annotations_pb2.http]
    found = [_binding(rule)]
    for extra in rule.additional_bindings:
        if len(extra.additional_bindings):
            raise ValueError("an additional binding may not have additional_bindings of its own")
        found.append(_binding(extra))
    return tuple(found)


def _binding(rule: http_pb2.HttpRule) -> Binding:
    pattern = rule.WhichOneof("pattern")
    if pattern is None:
        raise ValueError("the rule names no verb and path (get, put, post, delete, patch, custom)")
    if pattern == "custom":
        verb, path = rule.custom.kind, rule.custom.path
        if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", verb):
            raise ValueError(f"custom rule kind {verb!r} is not an HTTP method name")
    else:
        verb, path = pattern.upper(), getattr(rule, pattern)
    return Binding(verb, PathTemplate.parse(path), rule.body, rule.response_body)


@dataclass(frozen=True)
class RouteMatch:
    method_path: str  # /pkg.Service/Method
    binding: Binding
    variables: dict[str, str]  # field path -> decoded value


@dataclass(frozen=True)
class RouteMiss:
    status: int  # 404 no route, 405 another verb, 400 a missing path field or a bad segment
    message: str
    allow: tuple[str, ...] = ()  # for 405: the verbs the path has (the Allow header)


class RestRoutes:
    """Every HTTP rule of every method in the contracts, and which one a request takes."""

    def __init__(self, routes: Iterable[tuple[str, Binding]]) -> None:
        self._routes = tuple(routes)

    @classmethod
    def from_contracts(cls, contracts: Contracts, pool: Any = None) -> RestRoutes:
        """The routes of the contracts' rules; ContractError naming the method of a bad one.
        ``pool``: the contracts' descriptor pool (``contract_pool``), if already built."""
        found: list[tuple[str, Binding]] = []
        claimed: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        for name in sorted(contracts.files):
            fd = contracts.files[name]
            for service in fd.service:
                full = f"{fd.package}.{service.name}" if fd.package else service.name
                for method in service.method:
                    where = f"/{full}/{method.name}"
                    try:
                        rules = bindings(method)
                    except ValueError as e:
                        raise ContractError(f"{where}: google.api.http: {e}") from None
                    if not rules:
                        continue
                    if pool is None:
                        pool = contract_pool(contracts.files)
                    try:
                        described = pool.FindMethodByName(f"{full}.{method.name}")
                    except KeyError:
                        raise ContractError(
                            f"{where}: google.api.http: its file or a file it imports is not "
                            "in the contracts (build them with --include_imports)"
                        ) from None
                    for binding in rules:
                        _check_rule(where, binding, described.input_type, described.output_type)
                        key = (binding.verb, binding.template.shape)
                        other = claimed.setdefault(key, where)
                        if other != where:
                            raise ContractError(
                                f"{other} and {where} both claim "
                                f"{binding.verb} {binding.template.text}"
                            )
                        found.append((where, binding))
        return cls(found)

    def routes(self) -> Iterable[tuple[str, Binding]]:
        """(gRPC method path, binding) for every rule."""
        return self._routes

    def match(self, verb: str, path: str) -> RouteMatch | RouteMiss:
        """The route a request takes: literal segments win over variables, variables over
        ``**``; else why there is none."""
        best: tuple[tuple[int, ...], str, Binding, _Matched] | None = None
        allowed: set[str] = set()
        for method_path, binding in self._routes:
            matched = binding.template._match(path)
            if matched is None:
                continue
            if binding.verb != verb:
                allowed.add(binding.verb)
                continue
            if best is None or matched.rank < best[0]:
                best = (matched.rank, method_path, binding, matched)
        if best is not None:
            _, method_path, binding, matched = best
            if matched.missing is not None:
                return RouteMiss(400, f"path field {matched.missing} is missing")
            if matched.error is not None:
                return RouteMiss(400, matched.error)
            return RouteMatch(method_path, binding, matched.values)
        if allowed:
            verbs = tuple(sorted(allowed))
            return RouteMiss(
                405, f"{verb} is not allowed on {path[:200]}; allowed: {', '.join(verbs)}", verbs
            )
        return RouteMiss(404, f"no route for {verb} {path[:200]}")


def contract_pool(files: Mapping[str, descriptor_pb2.FileDescriptorProto]) -> Any:
    """A descriptor pool of the contracts, each file added after the files it imports; a file
    whose imports are absent (a set built without --include_imports) is left out, and so are
    the files importing it."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    failed: set[str] = set()

    def add(name: str, path: frozenset[str]) -> bool:
        if name in added:
            return True
        fd = files.get(name)
        if fd is None or name in path or name in failed:
            failed.add(name)
            return False
        if not all([add(dependency, path | {name}) for dependency in fd.dependency]):
            failed.add(name)
            return False
        try:
            pool.Add(fd)
        except (TypeError, ValueError):
            failed.add(name)
            return False
        added.add(name)
        return True

    for name in sorted(files):
        add(name, frozenset())
    return pool


def _check_rule(where: str, binding: Binding, request: _Type, response: _Type) -> None:
    rule = f"{binding.verb} {binding.template.text}"
    for field_path in binding.template.variables:
        try:
            fields = _field_path(request, field_path.split("."), json_names=False)
        except LookupError as e:
            raise ContractError(f"{where}: {rule}: path variable {field_path}: {e}") from None
        leaf = fields[-1]
        if _is_repeated(leaf):
            raise ContractError(
                f"{where}: {rule}: path variable {field_path} is a repeated field; "
                "a path segment carries one value"
            )
        if leaf.message_type is not None and leaf.message_type.full_name not in _TEXT_WKT:
            raise ContractError(
                f"{where}: {rule}: path variable {field_path} is a message "
                f"({leaf.message_type.full_name}); bind one of its fields"
            )
    if binding.body not in ("", "*"):
        if binding.body not in request.fields_by_name:
            raise ContractError(
                f"{where}: {rule}: body field {binding.body} is not a field of "
                f"{request.full_name} (body names a top-level field, or '*')"
            )
        if binding.body in binding.template.variables:
            raise ContractError(
                f"{where}: {rule}: body field {binding.body} is also bound by the path"
            )
    if binding.body and binding.verb == "GET":
        raise ContractError(f"{where}: {rule}: a GET rule may not take a request body")
    if binding.response_body and binding.response_body not in response.fields_by_name:
        raise ContractError(
            f"{where}: {rule}: response_body {binding.response_body} is not a field of "
            f"{response.full_name}"
        )


# -- the request message -------------------------------------------------------------------

_WRAPPERS = frozenset(
    f"google.protobuf.{n}Value"
    for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
# Well-known types whose JSON form is one value, so a path segment or a query value can hold it.
_TEXT_WKT = frozenset(
    {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
    | _WRAPPERS
)
_JSON_WKT = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)
_ONE_VALUE = _TEXT_WKT | _JSON_WKT | {"google.protobuf.Any"}
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: ("sint32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: ("sfixed32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: ("sint64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: ("sfixed64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: ("uint32", 0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: ("fixed32", 0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: ("uint64", 0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: ("fixed64", 0, 2**64 - 1),
}
_FLOAT_MAX = 3.4028234663852886e38
# One way to split any number (linear to match: the text is the caller's).
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_SPECIAL_FLOATS = {"nan": "NaN", "inf": "Infinity", "+inf": "Infinity", "infinity": "Infinity"}
_SPECIAL_FLOATS |= {"+infinity": "Infinity", "-inf": "-Infinity", "-infinity": "-Infinity"}
# strconv.ParseBool's spellings, as grpc-gateway accepts (PHP's http_build_query sends 1 and 0).
_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True}
_BOOLS |= {"0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


def fill_request(
    message: Message,
    binding: Binding,
    variables: Mapping[str, str],
    query: bytes,
    body: bytes,
    *,
    max_depth: int = 32,
) -> None:
    """Set `message` from the body, then the query string, then the path's variables.

    BadRequest naming the field for anything that does not fit the message.
    """
    descriptor = message.DESCRIPTOR
    bound = binding.template.variables
    if binding.body == "*":
        for key, _ in _query_pairs(query):
            raise BadRequest(
                key,
                f"query parameter {_cut(key)} is not accepted: this route takes every field from "
                "the request body",
            )
        if body:
            js = _load_json(body, max_depth)
            if not isinstance(js, dict):
                raise BadRequest("", f"request body must be a JSON object, not {_kind(js)}")
            _check_message(js, descriptor, "")
            _merge(js, message, max_depth, "request body", located=lambda: _locate(js, descriptor))
    elif binding.body:
        target = descriptor.fields_by_name.get(binding.body)
        if target is None:
            raise BadRequest(binding.body, f"body field {binding.body} is not in the request")
        if body:
            value = _load_json(body, max_depth)
            if value is not None:
                _check_field(value, target, target.json_name)
            wrapped = {target.json_name: value}
            _merge(
                wrapped,
                message,
                max_depth,
                "request body",
                located=lambda: _locate(wrapped, descriptor),
            )
    elif body:
        raise BadRequest(
            "",
            f"{binding.verb} {binding.template.text} takes no request body; "
            "send the fields as query parameters",
        )
    if binding.body != "*":
        _fill_query(message, binding, query, max_depth)
    for field_path in bound:
        text = variables.get(field_path)
        if text is None or text == "":
            raise BadRequest(field_path, f"path field {field_path} is missing")
        _set_path_field(message, field_path, text, max_depth)


def _fill_query(message: Message, binding: Binding, query: bytes, max_depth: int) -> None:
    descriptor = message.DESCRIPTOR
    grouped: dict[tuple[str, ...], tuple[str, list[_Field], list[tuple[str, str]]]] = {}
    for key, value in _query_pairs(query):
        name, map_key = key, None
        opening = key.rfind("[") if key.endswith("]") else -1
        if opening >= 0:  # counts[key]: a scan, not a regex, over the caller's text
            name, map_key = key[:opening], key[opening + 1 : -1]
        try:
            fields = _field_path(descriptor, name.split("."), json_names=True)
        except LookupError:
            raise BadRequest(key, f"unknown query parameter {_cut(key)}") from None
        leaf = fields[-1]
        canonical = tuple(f.name for f in fields)
        dotted = ".".join(canonical)
        if (map_key is not None) != _is_map(leaf):
            if map_key is None:
                raise BadRequest(key, f"query parameter {key} is a map; give it as {key}[key]")
            raise BadRequest(key, f"unknown query parameter {_cut(key)}")
        if leaf.message_type is not None and not _is_map(leaf):
            full = leaf.message_type.full_name
            if full not in _TEXT_WKT and full not in _JSON_WKT:
                raise BadRequest(
                    key,
                    f"query parameter {key} names a message ({full}); set its fields "
                    f"as {key}.<field>",
                )
        for variable in binding.template.variables:
            if _overlaps(dotted, variable):
                raise BadRequest(
                    key, f"query parameter {key} sets {dotted}, which the path already binds"
                )
        if binding.body and canonical[0] == binding.body:
            raise BadRequest(
                key, f"query parameter {key} sets {dotted}, which comes from the request body"
            )
        entry = grouped.setdefault(canonical, (key, fields, []))
        entry[2].append((map_key or "", value))
    choices: dict[tuple[str, ...], str] = {}
    for canonical, (key, fields, values) in grouped.items():
        leaf = fields[-1]
        oneof = leaf.containing_oneof
        if oneof is not None and not _is_synthetic(oneof):
            where = (*canonical[:-1], oneof.name)
            other = choices.setdefault(where, key)
            if other != key:
                raise BadRequest(
                    key,
                    f"query parameters {other} and {key} are both in the oneof "
                    f"{oneof.name}; give only one",
                )
        label = f"query parameter {key}"
        if _is_map(leaf):
            entries: dict[str, Any] = {}
            key_field = leaf.message_type.fields_by_name["key"]
            value_field = leaf.message_type.fields_by_name["value"]
            for map_key, text in values:
                converted = _converted(key_field, map_key, key, f"{label} key", max_depth)
                as_key = json.dumps(converted) if isinstance(converted, bool) else str(converted)
                if as_key in entries:
                    raise BadRequest(key, f"{label} gives key {map_key!r} twice")
                entries[as_key] = _converted(value_field, text, key, label, max_depth)
            given: Any = entries
        elif _is_repeated(leaf):
            given = [_converted(leaf, text, key, label, max_depth) for _, text in values]
        else:
            if len(values) > 1:
                raise BadRequest(
                    key, f"{label} is given {len(values)} times, but {leaf.name} holds one value"
                )
            given = _converted(leaf, values[0][1], key, label, max_depth)
        _merge(_nest(fields, given), message, max_depth, label, field=key)


def _set_path_field(message: Message, field_path: str, text: str, max_depth: int) -> None:
    label = f"path field {field_path}"
    try:
        fields = _field_path(message.DESCRIPTOR, field_path.split("."), json_names=False)
    except LookupError as e:
        raise BadRequest(field_path, f"{label}: {e}") from None
    leaf = fields[-1]
    if _is_repeated(leaf) or (
        leaf.message_type is not None and leaf.message_type.full_name not in _TEXT_WKT
    ):
        raise BadRequest(
            field_path, f"{label} is a {'repeated field' if _is_repeated(leaf) else 'message'}"
        )
    nested = _nest(fields, _converted(leaf, text, field_path, label, max_depth))
    # The body may carry the field too (a resource with its name): it must agree.
    current = _present(message, fields)
    if current is not None:
        scratch = type(message)()
        _merge(nested, scratch, max_depth, label, field=field_path)
        wanted = _present(scratch, fields)
        if wanted != current:
            raise BadRequest(
                field_path,
                f"{label} is {text!r} in the path, but the request body sets it to "
                f"{_shown(current)}",
            )
        return
    _merge(nested, message, max_depth, label, field=field_path)


def _present(message: Message, fields: Sequence[_Field]) -> Any:
    """The value at a field path if it is set (a scalar without presence: if not default)."""
    holder: Any = message
    for f in fields[:-1]:
        if not holder.HasField(f.name):
            return None
        holder = getattr(holder, f.name)
    leaf = fields[-1]
    if leaf.has_presence:
        return getattr(holder, leaf.name) if holder.HasField(leaf.name) else None
    value = getattr(holder, leaf.name)
    return None if value == leaf.default_value else value


def _shown(value: Any) -> str:
    if isinstance(value, Message):
        return json.dumps(json_format.MessageToDict(value), ensure_ascii=False)
    return repr(value)


def _field_path(descriptor: _Type, names: Sequence[str], *, json_names: bool) -> list[_Field]:
    """The fields along a dotted path; LookupError naming the part that does not exist."""
    fields: list[_Field] = []
    current = descriptor
    for i, name in enumerate(names):
        if i:
            parent = fields[-1]
            if parent.message_type is None or _is_repeated(parent):
                raise LookupError(f"{'.'.join(names[:i])} is not a single message")
            if parent.message_type.full_name.startswith("google.protobuf."):
                raise LookupError(f"{'.'.join(names[:i])} is given as one value")
            current = parent.message_type
        found = current.fields_by_name.get(name)
        if found is None and json_names:
            found = next((f for f in current.fields if f.json_name == name), None)
        if found is None:
            raise LookupError(f"{current.full_name} has no field {name}")
        fields.append(found)
    return fields


def _nest(fields: Sequence[_Field], value: Any) -> dict[str, Any]:
    for f in reversed(fields):
        value = {f.json_name: value}
    return value  # type: ignore[no-any-return]


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _is_repeated(f: _Field) -> bool:
    return bool(f.is_repeated)


def _is_map(f: _Field) -> bool:
    return _is_repeated(f) and f.message_type is not None and f.message_type.GetOptions().map_entry


def _is_synthetic(oneof: Any) -> bool:
    """A proto3 ``optional`` field's own oneof, which holds nothing else."""
    return len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name


class _Invalid(ValueError):
    """A text value that does not fit its field; the message says why."""


def _converted(f: _Field, text: str, name: str, label: str, max_depth: int) -> Any:
    """`text` for field `f`, or BadRequest naming `name` (as the caller wrote it)."""
    try:
        return _from_text(f, text, max_depth)
    except _Invalid as e:
        raise BadRequest(name, f"{label}: {e}") from None
    except BadRequest as e:
        raise BadRequest(name, f"{label}: {e.message}") from None


def _from_text(f: _Field, text: str, max_depth: int) -> Any:
    """A query or path value as the JSON value json_format takes for the field."""
    if f.message_type is not None:
        full = f.message_type.full_name
        if full in _WRAPPERS:
            return _from_text(f.message_type.fields_by_name["value"], text, max_depth)
        if full in _JSON_WKT:
            return _load_json(text.encode("utf-8"), max_depth, where="the value")
        return text  # Timestamp, Duration, FieldMask: json_format reads their text forms
    kind = f.type
    if kind in _INT_RANGES:
        name, low, high = _INT_RANGES[kind]
        if not re.fullmatch(r"[+-]?\d+" if low < 0 else r"\+?\d+", text):
            raise _Invalid(f"{_cut(text)!r} is not a{'n' if low < 0 else ' non-negative'} integer")
        number = _int(text)
        if number is None or not low <= number <= high:
            raise _Invalid(f"{_cut(text)} is out of range for {name} ({low} to {high})")
        return number
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        special = _SPECIAL_FLOATS.get(text.lower())
        if special is not None:
            return special
        if not _DECIMAL.fullmatch(text):
            raise _Invalid(f"{_cut(text)!r} is not a number")
        number_f = float(text)
        limit = _FLOAT_MAX if kind == FieldDescriptor.TYPE_FLOAT else float("inf")
        if abs(number_f) > limit or abs(number_f) == float("inf"):
            name = "float" if kind == FieldDescriptor.TYPE_FLOAT else "double"
            raise _Invalid(f"{_cut(text)} is out of range for {name}")
        return number_f
    if kind == FieldDescriptor.TYPE_BOOL:
        if text not in _BOOLS:
            raise _Invalid(f"{_cut(text)!r} is not a boolean (true or false)")
        return _BOOLS[text]
    if kind == FieldDescriptor.TYPE_BYTES:
        return _base64(text)
    if kind == FieldDescriptor.TYPE_ENUM:
        enum = f.enum_type
        if text in enum.values_by_name:
            return text
        if re.fullmatch(r"[+-]?\d+", text) and _int(text) in enum.values_by_number:
            return int(text)
        raise _Invalid(f"{_cut(text)!r} is not a value of {enum.full_name}")
    return text


def _int(text: str) -> int | None:
    """The integer of a string of digits; None past Python's limit on digits (4,300), which
    is far outside every protobuf range."""
    try:
        return int(text)
    except ValueError:
        return None


def _cut(text: str, most: int = 60) -> str:
    """The caller's text as a message shows it: at most ``most`` characters."""
    return text if len(text) <= most else text[:most] + "…"


def _base64(text: str) -> str:
    """Standard or URL-safe base64, padded or not, as the standard form json_format reads."""
    if not re.fullmatch(r"[A-Za-z0-9+/\-_]*={0,2}", text):
        raise _Invalid(f"{_cut(text)!r} is not base64")
    bare = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        data = base64.b64decode(bare + "=" * (-len(bare) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _Invalid(f"{_cut(text)!r} is not base64") from None
    return base64.b64encode(data).decode("ascii")


def _query_pairs(query: bytes) -> Iterator[tuple[str, str]]:
    """The query string's (name, value) pairs, decoded as HTML forms encode them."""
    for piece in query.split(b"&"):
        if not piece:
            continue
        raw_key, _, raw_value = piece.partition(b"=")
        key = _form_decode(raw_key, "", "a query parameter name")
        if not key:
            raise BadRequest("", "a query parameter has no name")
        yield key, _form_decode(raw_value, key, f"query parameter {_cut(key)}")


def _form_decode(raw: bytes, name: str, what: str) -> str:
    try:
        text = raw.decode("ascii").replace("+", " ")
    except UnicodeDecodeError:
        raise BadRequest(name, f"{what} has bytes that are not percent-encoded") from None
    try:
        return _unescape(text, keep_reserved=False)
    except ValueError as e:
        raise BadRequest(name, f"{what}: {e}") from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (write it as the string {json.dumps(name)})")


def _load_json(data: bytes, max_depth: int, where: str = "request body") -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN literals, at most `max_depth` levels."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest("", f"{where} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise BadRequest(
            "", f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except _DuplicateKey as e:
        raise BadRequest(str(e), f"{where}: key {str(e)!r} appears twice in one object") from None
    except RecursionError:
        raise BadRequest(
            "", f"{where} is nested too deeply (more than {max_depth} levels)"
        ) from None
    except ValueError as e:
        raise BadRequest("", f"{where} is not valid JSON: {e}") from None
    if _depth_exceeds(value, max_depth):
        raise BadRequest("", f"{where} is nested too deeply (more than {max_depth} levels)")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "null"


def _check_message(js: Any, descriptor: _Type, path: str) -> None:
    """Refuse unknown fields and values of the wrong JSON kind, naming the field."""
    if not isinstance(js, dict):
        raise BadRequest(path, f"request body: {path} must be a JSON object, not {_kind(js)}")
    for key, value in js.items():
        here = f"{path}.{key}" if path else key
        f = descriptor.fields_by_name.get(key)
        if f is None:
            f = next((c for c in descriptor.fields if c.json_name == key), None)
        if f is None:
            raise BadRequest(here, f"request body: unknown field {here}")
        if value is not None:
            _check_field(value, f, here)


def _check_field(value: Any, f: _Field, path: str) -> None:
    if _is_map(f):
        if not isinstance(value, dict):
            raise BadRequest(
                path, f"request body: {path} must be a JSON object, not {_kind(value)}"
            )
        value_field = f.message_type.fields_by_name["value"]
        for key, item in value.items():
            if item is not None:
                _check_single(item, value_field, f"{path}[{key}]")
    elif _is_repeated(f):
        if not isinstance(value, list):
            raise BadRequest(path, f"request body: {path} must be a JSON array, not {_kind(value)}")
        for i, item in enumerate(value):
            if item is not None:
                _check_single(item, f, f"{path}[{i}]")
    else:
        _check_single(value, f, path)


def _check_single(value: Any, f: _Field, path: str) -> None:
    if f.message_type is None:
        if isinstance(value, dict | list):
            raise BadRequest(path, f"request body: {path} must be one value, not {_kind(value)}")
        return
    full = f.message_type.full_name
    if full == "google.protobuf.Value":
        return
    if full in ("google.protobuf.Struct", "google.protobuf.Any"):
        expected: type = dict
    elif full == "google.protobuf.ListValue":
        expected = list
    elif full in _TEXT_WKT:
        if isinstance(value, dict | list):
            raise BadRequest(path, f"request body: {path} must be one value, not {_kind(value)}")
        return
    else:
        _check_message(value, f.message_type, path)
        return
    if not isinstance(value, expected):
        raise BadRequest(
            path,
            f"request body: {path} must be {'a JSON object' if expected is dict else 'a JSON array'}, "
            f"not {_kind(value)}",
        )


def _locate(js: dict[str, Any], descriptor: _Type, prefix: str = "") -> BadRequest | None:
    """Which value json_format refused, found by converting one field at a time."""
    for key, value in js.items():
        here = f"{prefix}.{key}" if prefix else key
        f = descriptor.fields_by_name.get(key) or next(
            (c for c in descriptor.fields if c.json_name == key), None
        )
        if f is None or value is None:
            continue
        if (
            f.message_type is not None
            and not _is_map(f)
            and f.message_type.full_name not in _ONE_VALUE
        ):
            items = value if _is_repeated(f) else [value]
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    inner = _locate(
                        item, f.message_type, f"{here}[{i}]" if _is_repeated(f) else here
                    )
                    if inner is not None:
                        return inner
            continue
        scratch = message_factory.GetMessageClass(descriptor)()
        try:
            json_format.ParseDict({key: value}, scratch, descriptor_pool=descriptor.file.pool)
        except Exception as e:  # json_format raises ParseError, ValueError or TypeError
            return BadRequest(here, f"request body: field {here}: {_clean(e)}")
    return None


def _merge(
    js: dict[str, Any],
    message: Message,
    max_depth: int,
    label: str,
    *,
    field: str = "",
    located: Any = None,
) -> None:
    """json_format.ParseDict into `message`, its errors as BadRequest naming the field."""
    try:
        json_format.ParseDict(
            js,
            message,
            ignore_unknown_fields=False,
            descriptor_pool=_pool_of(message),
            max_recursion_depth=max_depth,
        )
    except Exception as e:  # ParseError, and ValueError/TypeError from deeper down
        problem = _clean(e)
        if "too deep" in problem:
            raise BadRequest(
                field, f"{label} is nested too deeply (more than {max_depth} levels)"
            ) from None
        found = located() if located is not None else None
        if found is not None:
            raise found from None
        raise BadRequest(field, f"{label}: {problem}") from None


def _pool_of(message: Message) -> Any:
    """The descriptor pool the message's type is in: json_format resolves Any types there."""
    return message.DESCRIPTOR.file.pool


def _clean(e: Exception) -> str:
    """json_format's message without its nesting and Python's phrasing."""
    text = str(e)
    while (prefix := re.match(r"Failed to parse \S+ field: ", text)) is not None:
        text = text[prefix.end() :]
    text = re.sub(r"\s*Available Fields.*$", "", text, flags=re.S).rstrip(". ")
    text = re.sub(r" at \"?[\w.\[\]]+\"?$", "", text).rstrip(". ")
    text = re.sub(r"invalid literal for int\(\) with base 10: (.*)", r"not an integer: \1", text)
    return text


# -- the response --------------------------------------------------------------------------


def response_json(message: Message, binding: Binding) -> bytes:
    """The response as JSON (json_format's names and forms, compact UTF-8); only the
    response_body field when the rule names one."""
    pool = _pool_of(message)
    if not binding.response_body:
        value: Any = json_format.MessageToDict(message, descriptor_pool=pool)
    else:
        f = message.DESCRIPTOR.fields_by_name[binding.response_body]
        if f.message_type is not None and not _is_repeated(f):
            value = json_format.MessageToDict(getattr(message, f.name), descriptor_pool=pool)
        else:
            only = type(message)()
            only.MergeFrom(message)
            for other in message.DESCRIPTOR.fields:
                if other.name != f.name:
                    only.ClearField(other.name)
            value = json_format.MessageToDict(
                only, descriptor_pool=pool, always_print_fields_with_no_presence=True
            ).get(f.json_name)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
