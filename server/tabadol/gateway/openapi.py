"""OpenAPI 3.1 from the contracts, per caller: the REST routes and Connect endpoints of the
methods one agency may call, their messages as JSON Schema in protobuf's JSON mapping, and the
contracts' comments as descriptions. Pure: descriptors in, a JSON-ready dict out."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from google.protobuf import descriptor_pb2

from tabadol.contracts import Contracts, RpcKind
from tabadol.status import Code

if TYPE_CHECKING:
    from tabadol.gateway.http_rules import Binding

JSON = dict[str, Any]
Field = descriptor_pb2.FieldDescriptorProto
_Proto = TypeVar("_Proto", descriptor_pb2.DescriptorProto, descriptor_pb2.EnumDescriptorProto)

NDJSON = "application/x-ndjson"
CONNECT_STREAM = "application/connect+json"
STATUS = "google.rpc.Status"
CONNECT_ERROR = "connect.Error"
CONNECT_END = "connect.EndStreamResponse"

_VERBS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_INT64 = r"^-?[0-9]+$"
_UINT64 = r"^[0-9]+$"
_SCALARS: dict[int, JSON] = {
    Field.TYPE_DOUBLE: {"type": "number", "format": "double"},
    Field.TYPE_FLOAT: {"type": "number", "format": "float"},
    Field.TYPE_INT64: {"type": "string", "format": "int64", "pattern": _INT64},
    Field.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": _INT64},
    Field.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": _INT64},
    Field.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": _UINT64},
    Field.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": _UINT64},
    Field.TYPE_INT32: {"type": "integer", "format": "int32"},
    Field.TYPE_SINT32: {"type": "integer", "format": "int32"},
    Field.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    Field.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1},
    Field.TYPE_FIXED32: {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1},
    Field.TYPE_BOOL: {"type": "boolean"},
    Field.TYPE_STRING: {"type": "string"},
    Field.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}


def _nullable(schema: JSON) -> JSON:
    return {**schema, "type": [schema["type"], "null"]}


# The well-known types have their own JSON forms (protobuf's JSON mapping), not their fields'.
_WELL_KNOWN: dict[str, JSON] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "An instant in RFC 3339 form, in UTC, e.g. 2024-03-20T10:15:00Z.",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "Seconds with up to nine fractional digits and the suffix s, e.g. 1.5s.",
    },
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Field paths in lowerCamelCase, separated by commas, e.g. name,birthDate.",
    },
    "google.protobuf.Struct": {
        "type": "object",
        "additionalProperties": True,
        "description": "Any JSON object.",
    },
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}, "description": "Any JSON array."},
    "google.protobuf.NullValue": {"type": "null"},
    "google.protobuf.Empty": {"type": "object", "description": "Always {}."},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string", "description": "The message's type URL."}},
        "required": ["@type"],
        "additionalProperties": True,
        "description": "A message of any type: its JSON fields beside @type, which names it.",
    },
    **{
        f"google.protobuf.{name}": {
            **_nullable(_SCALARS[scalar]),
            "description": f"A {kind} that may be null (absent).",
        }
        for name, scalar, kind in (
            ("DoubleValue", Field.TYPE_DOUBLE, "double"),
            ("FloatValue", Field.TYPE_FLOAT, "float"),
            ("Int64Value", Field.TYPE_INT64, "64-bit integer, as a string,"),
            ("UInt64Value", Field.TYPE_UINT64, "unsigned 64-bit integer, as a string,"),
            ("Int32Value", Field.TYPE_INT32, "32-bit integer"),
            ("UInt32Value", Field.TYPE_UINT32, "unsigned 32-bit integer"),
            ("BoolValue", Field.TYPE_BOOL, "boolean"),
            ("StringValue", Field.TYPE_STRING, "string"),
            ("BytesValue", Field.TYPE_BYTES, "base64 string"),
        )
    },
    STATUS: {
        "type": "object",
        "properties": {
            "code": {"type": "integer", "format": "int32", "description": "The gRPC status code."},
            "message": {"type": "string", "description": "What went wrong, for a person."},
            "details": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/google.protobuf.Any"},
                "description": "Machine-readable details, if any.",
            },
        },
        "required": ["code", "message"],
        "description": "The error of a REST call, with the HTTP status of grpc-gateway's mapping.",
    },
}
# What a query parameter can carry: a scalar in its JSON string form.
_QUERY_TYPES = frozenset(
    name
    for name, schema in _WELL_KNOWN.items()
    if schema.get("type") not in (None, "object", "array", "null")
)
# ... or as JSON text.
_QUERY_JSON_TYPES = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)
_CONNECT_CODES = ["canceled" if c is Code.CANCELLED else c.name.lower() for c in Code if c]
_CONNECT_SCHEMAS: dict[str, JSON] = {
    CONNECT_ERROR: {
        "type": "object",
        "properties": {
            "code": {"type": "string", "enum": _CONNECT_CODES},
            "message": {"type": "string", "description": "What went wrong, for a person."},
            "details": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string", "description": "The detail's message type."},
                        "value": {
                            "type": "string",
                            "contentEncoding": "base64",
                            "description": "The detail, in protobuf's binary form.",
                        },
                    },
                },
            },
        },
        "required": ["code"],
        "description": "The error of a Connect call, with the HTTP status of Connect's mapping.",
    },
    CONNECT_END: {
        "type": "object",
        "properties": {
            "error": {"$ref": f"#/components/schemas/{CONNECT_ERROR}"},
            "metadata": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": {"type": "string"}},
                "description": "The call's trailers.",
            },
        },
        "description": "The last envelope of a Connect stream (flags 0x02): the call's outcome.",
    },
}


def openapi_document(
    contracts: Contracts,
    routes: Iterable[tuple[str, Binding]],
    allowed: Collection[str],
    *,
    server_url: str | None,
    title: str = "Tabadol exchange",
) -> JSON:
    """The OpenAPI 3.1 document of the ``allowed`` methods ("/pkg.Service/Method"): their
    REST ``routes`` and Connect endpoints, and only the schemas those reach."""
    index = _Index(contracts)
    schemas = _Schemas(index)
    methods = {path: found for path in allowed if (found := index.methods.get(path)) is not None}
    paths: dict[str, JSON] = {}
    custom: dict[str, list[str]] = {}
    bound: dict[str, list[Binding]] = {}
    for method_path, binding in routes:
        if method_path in methods:
            bound.setdefault(method_path, []).append(binding)
    for method_path in sorted(methods):
        method = methods[method_path]
        for n, binding in enumerate(bound.get(method_path, ()), start=1):
            if method.kind not in (RpcKind.UNARY, RpcKind.SERVER_STREAMING):
                continue  # streams of requests are Connect's alone
            verb = binding.verb.lower()
            where = f"{binding.verb.upper()} {binding.template.openapi_path()}"
            if verb not in _VERBS:  # a custom verb, which OpenAPI cannot name
                custom.setdefault(method_path, []).append(where)
                continue
            item = paths.setdefault(binding.template.openapi_path(), {})
            item.setdefault(verb, _rest_operation(schemas, method, binding, n))
    for method_path in sorted(methods):
        operation = _connect_operation(schemas, methods[method_path], custom.get(method_path, []))
        paths.setdefault(method_path, {})["post"] = operation
    services = sorted({m.service for m in methods.values()})
    document: JSON = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "", "description": _about(server_url)},
    }
    if server_url:
        document["servers"] = [{"url": server_url}]
    document["tags"] = [
        {"name": s, **_described(index.comment(*index.services[s]))} for s in services
    ]
    document["paths"] = {
        path: {verb: item[verb] for verb in _VERBS if verb in item}
        for path, item in sorted(paths.items())
    }
    if methods:
        schemas.ref(STATUS)
        schemas.ref(CONNECT_ERROR)
    components: JSON = {"schemas": dict(sorted(schemas.components.items()))}
    if methods:
        components["responses"] = {
            "RestError": {
                "description": "The call failed: a google.rpc.Status.",
                "content": {"application/json": {"schema": _ref(STATUS)}},
            },
            "ConnectError": {
                "description": "The call failed: a Connect error.",
                "content": {"application/json": {"schema": _ref(CONNECT_ERROR)}},
            },
        }
    components["securitySchemes"] = {
        "mutualTLS": {
            "type": "mutualTLS",
            "description": "The calling agency's certificate, issued by the exchange's CA: it "
            "names the agency, whose grants decide what it may call.",
        }
    }
    document["components"] = components
    document["security"] = [{"mutualTLS": []}]
    # The version names exactly what this caller is shown: it changes when that changes.
    digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
    document["info"]["version"] = digest[:16]
    return document


def _about(server_url: str | None) -> str:
    text = (
        "The methods of the exchange that the calling agency may call, as REST routes (from "
        "the contracts' google.api.http rules) and as Connect endpoints "
        "(POST /package.Service/Method). Messages are JSON in protobuf's JSON mapping: fields "
        "may be written with their lowerCamelCase or their proto names, and a field the "
        "contract does not declare is refused with 400 (for REST, query parameters too). "
        "Every call is admitted, recorded and traced exactly as a gRPC call is."
    )
    if not server_url:
        text += "\n\nThis exchange has no HTTP entry configured: call it over gRPC."
    return text


@dataclass(frozen=True)
class _Method:
    service: str
    name: str
    kind: RpcKind
    proto: descriptor_pb2.MethodDescriptorProto
    file: str
    location: tuple[int, ...]

    @property
    def input(self) -> str:
        return self.proto.input_type.lstrip(".")

    @property
    def output(self) -> str:
        return self.proto.output_type.lstrip(".")


@dataclass(frozen=True)
class _Declared(Generic[_Proto]):
    """A message or enum, where its contract declares it (for its comments)."""

    proto: _Proto
    file: str
    location: tuple[int, ...]


class _Index:
    """The contracts' methods, messages, enums and comments, by name."""

    def __init__(self, contracts: Contracts) -> None:
        self.methods: dict[str, _Method] = {}
        self.services: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.messages: dict[str, _Declared[descriptor_pb2.DescriptorProto]] = {}
        self.enums: dict[str, _Declared[descriptor_pb2.EnumDescriptorProto]] = {}
        self._comments: dict[tuple[str, tuple[int, ...]], str] = {}
        for fd in contracts.files.values():
            prefix = f"{fd.package}." if fd.package else ""
            for i, svc in enumerate(fd.service):
                service = contracts.services.get(prefix + svc.name)
                if service is None:
                    continue
                self.services[service.name] = (fd.name, (6, i))
                for j, m in enumerate(svc.method):
                    contract = service.methods[m.name]
                    self.methods[contract.path] = _Method(
                        service.name, m.name, contract.kind, m, fd.name, (6, i, 2, j)
                    )
            self._types(fd.name, prefix, fd.message_type, fd.enum_type, ())
            for location in fd.source_code_info.location:
                text = _comment_text(location.leading_comments or location.trailing_comments)
                if text:
                    self._comments[(fd.name, tuple(location.path))] = text

    def _types(
        self,
        file: str,
        prefix: str,
        messages: Iterable[descriptor_pb2.DescriptorProto],
        enums: Iterable[descriptor_pb2.EnumDescriptorProto],
        parent: tuple[int, ...],
    ) -> None:
        # Top-level messages are at (4, i), enums at (5, i); nested ones at (..., 3, i) and
        # (..., 4, i) of their message (descriptor.proto's field numbers).
        message_tag, enum_tag = (3, 4) if parent else (4, 5)
        for i, enum in enumerate(enums):
            self.enums[prefix + enum.name] = _Declared(enum, file, (*parent, enum_tag, i))
        for i, message in enumerate(messages):
            location = (*parent, message_tag, i)
            self.messages[prefix + message.name] = _Declared(message, file, location)
            self._types(
                file, f"{prefix}{message.name}.", message.nested_type, message.enum_type, location
            )

    def comment(self, file: str, location: tuple[int, ...]) -> str:
        return self._comments.get((file, location), "")


def _comment_text(raw: str) -> str:
    # protoc keeps what followed "//" on each line, usually one space.
    lines = [line[1:] if line.startswith(" ") else line for line in raw.splitlines()]
    return "\n".join(line.rstrip() for line in lines).strip()


def _described(text: str) -> JSON:
    return {"description": text} if text else {}


def _ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def json_name(field: Field) -> str:
    """The field's name in JSON: protoc's ``json_name``, or lowerCamelCase as protoc makes it."""
    if field.json_name:
        return field.json_name
    parts = field.name.split("_")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


class _Schemas:
    """The component schemas of the messages and enums referred to so far."""

    def __init__(self, index: _Index) -> None:
        self.index = index
        self.components: dict[str, JSON] = {}

    def ref(self, name: str) -> JSON:
        """A reference to a message's or enum's schema, built (with what it reaches) once."""
        if name not in self.components:
            self.components[name] = {}  # a message may refer to itself
            self.components[name] = self._build(name)
        return _ref(name)

    def _build(self, name: str) -> JSON:
        if name in _WELL_KNOWN:
            schema = dict(_WELL_KNOWN[name])
            if name == STATUS:
                self.ref("google.protobuf.Any")
            return schema
        if name in _CONNECT_SCHEMAS:
            if name == CONNECT_END:
                self.ref(CONNECT_ERROR)
            return dict(_CONNECT_SCHEMAS[name])
        if (enum := self.index.enums.get(name)) is not None:
            return self._enum(enum.proto, enum.file, enum.location)
        if (message := self.index.messages.get(name)) is not None:
            return self._message(message.proto, message.file, message.location)
        return {"description": f"{name}: a type the exchange's contracts do not define."}

    def _enum(
        self, enum: descriptor_pb2.EnumDescriptorProto, file: str, location: tuple[int, ...]
    ) -> JSON:
        values, lines = [], []
        for k, value in enumerate(enum.value):
            values.append(value.name)
            note = self.index.comment(file, (*location, 2, k)).replace("\n", " ")
            lines.append(f"- `{value.name}` ({value.number})" + (f": {note}" if note else ""))
        text = self.index.comment(file, location)
        return {
            "type": "string",
            "enum": values,
            "description": (text + "\n\n" if text else "")
            + "\n".join(lines)
            + "\n\nWritten as the value's name; requests may give its number instead.",
        }

    def _message(
        self, message: descriptor_pb2.DescriptorProto, file: str, location: tuple[int, ...]
    ) -> JSON:
        properties: JSON = {}
        oneofs: dict[int, list[str]] = {}
        for k, field in enumerate(message.field):
            note = self.index.comment(file, (*location, 2, k))
            if field.HasField("oneof_index") and not field.proto3_optional:
                members = oneofs.setdefault(field.oneof_index, [])
                members.append(json_name(field))
                choice = message.oneof_decl[field.oneof_index].name
                note = (note + "\n\n" if note else "") + f"Part of the oneof `{choice}`."
            schema = self.field(field)
            if note:
                schema["description"] = note + (
                    "\n\n" + schema["description"] if "description" in schema else ""
                )
            if field.options.deprecated:
                schema["deprecated"] = True
            properties[json_name(field)] = schema
        text = self.index.comment(file, location)
        for number, members in sorted(oneofs.items()):
            names = ", ".join(f"`{m}`" for m in members)
            line = f"Oneof `{message.oneof_decl[number].name}`: at most one of {names} is set."
            note = self.index.comment(file, (*location, 8, number)).replace("\n", " ")
            text = (text + "\n\n" if text else "") + line + (f" {note}" if note else "")
        return {"type": "object", "properties": properties, **_described(text)}

    def field(self, field: Field) -> JSON:
        """A field's value schema: repeated fields as arrays, maps as objects."""
        if field.label == Field.LABEL_REPEATED:
            entry = self.index.messages.get(field.type_name.lstrip("."))
            if entry is not None and entry.proto.options.map_entry:
                key, value = entry.proto.field
                schema: JSON = {"type": "object", "additionalProperties": self.single(value)}
                if key.type != Field.TYPE_STRING:
                    key_type = "boolean" if key.type == Field.TYPE_BOOL else "integer"
                    schema["description"] = f"Keys are {key_type}s written as strings."
                return schema
            return {"type": "array", "items": self.single(field)}
        return self.single(field)

    def single(self, field: Field) -> JSON:
        if field.type in (Field.TYPE_MESSAGE, Field.TYPE_GROUP, Field.TYPE_ENUM):
            return self.ref(field.type_name.lstrip("."))
        return dict(_SCALARS[field.type])


def _field_at(index: _Index, message: str, path: str) -> tuple[Field, str] | None:
    """The field a dotted proto path names, and its comment."""
    field = None
    note = ""
    for part in path.split("."):
        declared = index.messages.get(message)
        if declared is None:
            return None
        for k, candidate in enumerate(declared.proto.field):
            if candidate.name == part:
                field = candidate
                note = index.comment(declared.file, (*declared.location, 2, k))
                break
        else:
            return None
        message = field.type_name.lstrip(".")
    return (field, note) if field is not None else None


def _query_parameters(
    schemas: _Schemas,
    message: str,
    bound: frozenset[str],
    proto_prefix: str = "",
    json_prefix: str = "",
    stack: tuple[str, ...] = (),
) -> Iterator[JSON]:
    """A query parameter for each field the path and body leave, nested fields as ``a.b``."""
    declared = schemas.index.messages.get(message)
    if declared is None or message in stack:
        return
    for k, field in enumerate(declared.proto.field):
        proto_path = proto_prefix + field.name
        if proto_path in bound:
            continue
        name = json_prefix + json_name(field)
        parameter: JSON = {"name": name, "in": "query", "required": False}
        type_name = field.type_name.lstrip(".")
        entry = schemas.index.messages.get(type_name)
        if entry is not None and entry.proto.options.map_entry:
            value = entry.proto.field[1]
            if value.type == Field.TYPE_MESSAGE and value.type_name.lstrip(".") not in _QUERY_TYPES:
                continue
            parameter |= {"style": "deepObject", "explode": True}  # name[key]=value
        elif type_name in _QUERY_JSON_TYPES and field.label != Field.LABEL_REPEATED:
            parameter["content"] = {"application/json": {"schema": schemas.field(field)}}
        elif field.type in (Field.TYPE_MESSAGE, Field.TYPE_GROUP) and type_name not in _QUERY_TYPES:
            # Its fields one by one, as name.field; lists of messages have no query form.
            if field.label != Field.LABEL_REPEATED and not type_name.startswith("google.protobuf."):
                yield from _query_parameters(
                    schemas, type_name, bound, proto_path + ".", name + ".", (*stack, message)
                )
            continue
        if "content" not in parameter:
            parameter["schema"] = schemas.field(field)
        note = schemas.index.comment(declared.file, (*declared.location, 2, k))
        yield parameter | _described(note)


def _rest_operation(schemas: _Schemas, method: _Method, binding: Binding, n: int) -> JSON:
    variables = binding.template.variables
    parameters = []
    for variable in variables:
        found = _field_at(schemas.index, method.input, variable)
        schema = schemas.field(found[0]) if found else {"type": "string"}
        parameters.append(
            {
                "name": variable,
                "in": "path",
                "required": True,
                "schema": schema,
                **_described(found[1] if found else ""),
            }
        )
    operation: JSON = {
        "tags": [method.service],
        "summary": method.name,
        "operationId": f"{method.service}.{method.name}" + (f".{n}" if n > 1 else ""),
        **_described(schemas.index.comment(method.file, method.location)),
    }
    if binding.body != "*":
        # The fields the path or the body bind; their parents are expanded, not skipped.
        bound = frozenset({*variables, *([binding.body] if binding.body else [])})
        parameters += _query_parameters(schemas, method.input, bound)
    if parameters:
        operation["parameters"] = parameters
    if binding.body:
        if binding.body == "*":
            body, note = schemas.ref(method.input), f"A {method.input}."
        else:
            found = _field_at(schemas.index, method.input, binding.body)
            body = schemas.field(found[0]) if found else {}
            note = f"The request's field `{binding.body}`" + (f": {found[1]}" if found else ".")
        operation["requestBody"] = {
            "required": True,
            "description": note,
            "content": {"application/json": {"schema": body}},
        }
    if binding.response_body:
        found = _field_at(schemas.index, method.output, binding.response_body)
        answer = schemas.field(found[0]) if found else {}
        what = f"The response's field `{binding.response_body}`"
    else:
        answer, what = schemas.ref(method.output), f"A {method.output}"
    if method.kind is RpcKind.SERVER_STREAMING:
        ok = {
            "description": f"{what} per line, as each arrives (newline-delimited JSON).",
            "content": {NDJSON: {"schema": answer}},
        }
    else:
        ok = {"description": f"{what}.", "content": {"application/json": {"schema": answer}}}
    operation["responses"] = {
        "200": ok,
        "default": {"$ref": "#/components/responses/RestError"},
    }
    return operation


def _connect_operation(schemas: _Schemas, method: _Method, custom: list[str]) -> JSON:
    text = schemas.index.comment(method.file, method.location)
    if custom:
        also = ", ".join(custom)
        text += f"\n\nAlso over HTTP as {also} (a custom verb OpenAPI cannot describe)."
    timeout = {
        "name": "Connect-Timeout-Ms",
        "in": "header",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 9999999999},
        "description": "The call's deadline, in milliseconds from now.",
    }
    operation: JSON = {
        "tags": [method.service],
        "summary": f"{method.name} (Connect)",
        "operationId": f"{method.service}.{method.name}.connect",
    }
    if method.kind is RpcKind.UNARY:
        version = {
            "name": "Connect-Protocol-Version",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "enum": ["1"]},
            "description": "The Connect protocol version.",
        }
        operation |= {
            **_described(text.strip()),
            "parameters": [version, timeout],
            "requestBody": {
                "required": True,
                "description": f"A {method.input}.",
                "content": {"application/json": {"schema": schemas.ref(method.input)}},
            },
            "responses": {
                "200": {
                    "description": f"A {method.output}.",
                    "content": {"application/json": {"schema": schemas.ref(method.output)}},
                },
                "default": {"$ref": "#/components/responses/ConnectError"},
            },
        }
        return operation
    requests = (
        f"one envelope per {method.input}"
        if method.kind in (RpcKind.CLIENT_STREAMING, RpcKind.BIDI_STREAMING)
        else f"one envelope with the {method.input}"
    )
    responses = (
        f"one envelope per {method.output}"
        if method.kind in (RpcKind.SERVER_STREAMING, RpcKind.BIDI_STREAMING)
        else f"one envelope with the {method.output}"
    )
    envelopes = (
        f"A Connect stream ({method.kind.value.replace('_', ' ')}): the body is a sequence of "
        "envelopes, each a flags byte, a 4-byte big-endian length, and that many bytes of one "
        f"JSON message. The request carries {requests}; the response carries {responses}, then "
        f"a last envelope with flags 0x02 holding a {CONNECT_END} (the error, if the call "
        "failed, and the trailers). The HTTP status is 200 even when the call fails."
    )
    if method.kind is RpcKind.BIDI_STREAMING:
        envelopes += " Both directions at once need HTTP/2."
    operation |= {
        "description": (text + "\n\n" + envelopes).strip(),
        "parameters": [timeout],
        "requestBody": {
            "required": True,
            "description": f"Envelopes of {method.input} messages.",
            "content": {CONNECT_STREAM: {"schema": schemas.ref(method.input)}},
        },
        "responses": {
            "200": {
                "description": f"Envelopes of {method.output} messages, then the end of the "
                "stream.",
                "content": {CONNECT_STREAM: {"schema": schemas.ref(method.output)}},
            },
        },
    }
    schemas.ref(CONNECT_END)
    return operation
