"""The benchmark's JSON-shaped contract: a person record, echoed by the bench's provider.

The echo contract carries one ``bytes`` field, whose JSON is a single base64 string: too
little of what json_format does for an agency's real calls. ``PersonEcho.Echo`` takes and
answers a small record of the kind the registries exchange (strings, a nested date, an enum
and a bool), with a ``google.api.http`` rule, so that the same message goes over gRPC as
protobuf and over the broker's HTTP entry as Connect JSON and as a REST route.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass

from tests.support.echo import echo_file_descriptor

SERVICE = "tabadol.bench.v1.PersonEcho"
METHOD = f"/{SERVICE}/Echo"
REST_PATH = "/v1/people:echo"  # POST, the whole record as the body

_F = descriptor_pb2.FieldDescriptorProto

# What an agency's web application sends: json_format's names (lowerCamelCase), so that
# the answer, json_format's output, is the same document.
PERSON_JSON: dict[str, object] = {
    "nationalId": "0012345678",
    "givenName": "Maryam",
    "familyName": "Hosseini Tabrizi",
    "fatherName": "Abdolreza",
    "birthDate": {"year": 1368, "month": 7, "day": 21},
    "birthPlace": "Mashhad",
    "province": "Razavi Khorasan",
    "postalCode": "9177948974",
    "status": "STATUS_ALIVE",
    "verified": True,
}


def person_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """``tabadol/bench/v1/person.proto``: the record, its date, and the echo service."""
    fd = descriptor_pb2.FileDescriptorProto(
        name="tabadol/bench/v1/person.proto",
        package="tabadol.bench.v1",
        syntax="proto3",
        dependency=["google/api/annotations.proto"],
    )
    date = fd.message_type.add(name="Date")
    for number, name in enumerate(("year", "month", "day"), 1):
        date.field.add(name=name, number=number, type=_F.TYPE_INT32, label=_F.LABEL_OPTIONAL)
    status = fd.enum_type.add(name="Status")
    for number, name in enumerate(("STATUS_UNSPECIFIED", "STATUS_ALIVE", "STATUS_DECEASED")):
        status.value.add(name=name, number=number)
    person = fd.message_type.add(name="Person")
    strings = ("national_id", "given_name", "family_name")
    for number, name in enumerate(strings, 1):
        person.field.add(name=name, number=number, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    person.field.add(
        name="birth_date", number=4, type=_F.TYPE_MESSAGE, label=_F.LABEL_OPTIONAL,
        type_name=".tabadol.bench.v1.Date",
    )  # fmt: skip
    for number, name in enumerate(("birth_place", "province", "postal_code", "father_name"), 5):
        person.field.add(name=name, number=number, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    person.field.add(
        name="status", number=9, type=_F.TYPE_ENUM, label=_F.LABEL_OPTIONAL,
        type_name=".tabadol.bench.v1.Status",
    )  # fmt: skip
    person.field.add(name="verified", number=10, type=_F.TYPE_BOOL, label=_F.LABEL_OPTIONAL)
    service = fd.service.add(name="PersonEcho")
    echo = service.method.add(
        name="Echo", input_type=".tabadol.bench.v1.Person", output_type=".tabadol.bench.v1.Person"
    )
    echo.options.Extensions[annotations_pb2.http].CopyFrom(
        http_pb2.HttpRule(post=REST_PATH, body="*")
    )
    return fd


def _imported() -> list[descriptor_pb2.FileDescriptorProto]:
    """The files the rule's annotation needs, as ``protoc --include_imports`` adds them."""
    files = []
    for module in (descriptor_pb2, http_pb2, annotations_pb2):
        fd = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fd)
        files.append(fd)
    return files


def write_contracts(path: Path) -> Path:
    """The bench's contracts: the echo contract, the person echo and their imports."""
    files = [echo_file_descriptor(), *_imported(), person_file_descriptor()]
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=files).SerializeToString())
    return path


@cache
def _person_class() -> type:
    pool = descriptor_pool.DescriptorPool()
    for fd in (*_imported(), person_file_descriptor()):
        pool.Add(fd)
    return GetMessageClass(pool.FindMessageTypeByName("tabadol.bench.v1.Person"))


def person_bytes() -> bytes:
    """``PERSON_JSON`` as protobuf: what a gRPC consumer sends for the same record."""
    message = _person_class()()
    json_format.ParseDict(PERSON_JSON, message)
    return bytes(message.SerializeToString())


def person_body() -> bytes:
    """``PERSON_JSON`` as an HTTP client sends it (compact UTF-8)."""
    return json.dumps(PERSON_JSON, separators=(",", ":"), ensure_ascii=False).encode()
