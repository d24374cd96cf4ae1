"""OpenAPI 3.1 from the contracts, per caller: exactly the methods an agency may call, as REST
routes and Connect endpoints, with schemas in protobuf's JSON mapping and the contracts'
comments; the same document from Discovery's GetOpenAPI and ``tabadol describe --openapi``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google.api.annotations_pb2
import grpc
import grpc.aio
import grpc_tools
import pytest
from grpc_tools import protoc
from openapi_spec_validator import validate

from tabadol.broker import Broker
from tabadol.contracts import Contracts
from tabadol.describe import openapi_text
from tabadol.gateway.http_rules import RestRoutes
from tabadol.gateway.openapi import openapi_document
from tabadol.pki import CertificateAuthority
from tabadol.platform.v1 import discovery_pb2, discovery_pb2_grpc
from tests.support.echo import SERVICE, UNARY
from tests.support.gateway import running_echo_gateway
from tests.test_platform import run_cli

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "build" / "contracts.pb"
NOCR = "tabadol.agencies.nocr.v1.PersonRegistry"
POST = "tabadol.agencies.post.v1.AddressDirectory"
TAX = "tabadol.agencies.tax.v1.InvoiceRegistry"
CONFORMANCE = "tabadol.conformance.v1.TestService"
INQUIRE = f"/{NOCR}/InquirePerson"
Document = dict[str, Any]
MEHR = "\u0645\u0647\u0631\u200c\u0645\u0627\u0647"  # Mehr (the month), with its ZWNJ

# Every form the JSON mapping gives a field, with a comment on everything that can carry one.
SAMPLE_PROTO = """syntax = "proto3";

// Shapes of every kind.
package tabadol.sample.v1;

import "google/api/annotations.proto";
import "google/protobuf/any.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/empty.proto";
import "google/protobuf/field_mask.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

// Keeps shapes.
service Shapes {
  // Gets one shape.
  rpc GetShape(Shape) returns (Shape) {
    option (google.api.http) = {get: "/v1/shapes/{name}"};
  }

  // Renames a shape: the body is its label alone, and so is the answer.
  rpc Rename(Shape) returns (Shape) {
    option (google.api.http) = {patch: "/v1/shapes/{id}" body: "label" response_body: "label"};
  }

  // Watches shapes.
  rpc Watch(google.protobuf.Empty) returns (stream Shape);

  // Uploads shapes.
  rpc Upload(stream Shape) returns (google.protobuf.Empty);
}

// A shape.
message Shape {
  // How it is drawn.
  enum Style {
    // Not set.
    STYLE_UNSPECIFIED = 0;
    // With solid lines.
    STYLE_SOLID = 1;
  }

  // A label on a shape.
  message Label {
    // Its text.
    string text = 1;
  }

  // Its name.
  string name = 1;
  int64 id = 2;
  uint64 area = 3;
  sint64 offset = 4;
  fixed64 mass = 5;
  int32 sides = 6;
  uint32 corners = 7;
  double width = 8;
  float height = 9;
  bool filled = 10;
  // Its picture.
  bytes picture = 11;
  Style style = 12;
  repeated string tags = 13;
  map<string, int64> counts = 14;
  map<int32, Label> labels_by_number = 15;
  // The colour.
  oneof colour {
    // A named colour.
    string colour_name = 16;
    // An RGB colour.
    uint32 rgb = 17;
  }
  optional string note = 18;
  google.protobuf.Timestamp created = 19;
  google.protobuf.Duration lifetime = 20;
  google.protobuf.Int64Value budget = 21;
  google.protobuf.StringValue nickname = 22;
  google.protobuf.Struct attributes = 23;
  google.protobuf.Value anything = 24;
  google.protobuf.ListValue list = 25;
  google.protobuf.Empty nothing = 26;
  google.protobuf.FieldMask mask = 27;
  google.protobuf.Any extra = 28;
  repeated Shape children = 29;
  Label label = 30;
  string odd_name = 31 [json_name = "strange"];
  bool retired = 32 [deprecated = true];
}
"""


def load_routes(contracts: Contracts) -> list[tuple[str, Any]]:
    return list(RestRoutes.from_contracts(contracts).routes())


@pytest.fixture(scope="module")
def demo() -> Contracts:
    return Contracts.load([DEMO])


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Contracts:
    src = tmp_path_factory.mktemp("sample")
    proto = src / "tabadol" / "sample" / "v1" / "shapes.proto"
    proto.parent.mkdir(parents=True)
    proto.write_text(SAMPLE_PROTO)
    out = src / "sample.pb"
    googleapis = Path(google.api.annotations_pb2.__file__).parents[2]
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc", f"-I{src}", f"-I{googleapis}", f"-I{well_known}",
            "--include_imports", "--include_source_info", f"--descriptor_set_out={out}",
            str(proto.relative_to(src)),
        ]
    )  # fmt: skip
    assert code == 0
    return Contracts.load([out])


def document_for(contracts: Contracts, allowed: set[str], url: str | None = None) -> Document:
    document = openapi_document(contracts, load_routes(contracts), allowed, server_url=url)
    validate(document)
    return document


def every_method(contracts: Contracts) -> set[str]:
    return {m.path for s in contracts.services.values() for m in s.methods.values()}


def schema(document: Document, name: str) -> Document:
    found: Document = document["components"]["schemas"][name]
    return found


# -- per caller -----------------------------------------------------------------------------


def test_an_agency_allowed_one_method_sees_that_method_alone(demo: Contracts) -> None:
    document = document_for(demo, {INQUIRE})
    assert list(document["paths"]) == [INQUIRE, "/v1/people/{national_id}", "/v1/people:inquire"]
    assert [tag["name"] for tag in document["tags"]] == [NOCR]
    assert set(document["components"]["schemas"]) == {
        "connect.Error",
        "google.protobuf.Any",
        "google.rpc.Status",
        "tabadol.agencies.nocr.v1.Gender",
        "tabadol.agencies.nocr.v1.InquirePersonRequest",
        "tabadol.agencies.nocr.v1.LifeStatus",
        "tabadol.agencies.nocr.v1.Person",
        "tabadol.type.v1.Date",
    }


def test_an_agency_allowed_nothing_sees_no_paths_and_no_schemas(demo: Contracts) -> None:
    document = document_for(demo, set())
    assert document["paths"] == {}
    assert document["tags"] == []
    assert document["components"]["schemas"] == {}


def test_a_method_the_contracts_do_not_declare_is_left_out(demo: Contracts) -> None:
    document = document_for(demo, {INQUIRE, "/tabadol.nope.v1.Ghost/Haunt", "junk"})
    assert INQUIRE in document["paths"]
    assert not any("Ghost" in path or "junk" in path for path in document["paths"])


def test_every_demo_method_validates_and_the_json_is_the_same_every_time(
    demo: Contracts,
) -> None:
    everything = every_method(demo)
    document = document_for(demo, everything, "https://gateway.example:8443")
    again = openapi_document(
        demo, load_routes(demo), sorted(everything, reverse=True),
        server_url="https://gateway.example:8443",
    )  # fmt: skip
    assert json.dumps(document) == json.dumps(again)
    assert list(document["paths"]) == sorted(document["paths"])
    assert list(document["components"]["schemas"]) == sorted(document["components"]["schemas"])
    assert document["openapi"] == "3.1.0"
    # The version changes with what the caller is shown, and only then.
    fewer = document_for(demo, {INQUIRE}, "https://gateway.example:8443")
    assert fewer["info"]["version"] != document["info"]["version"]


def test_without_an_http_entry_there_are_no_servers_and_the_description_says_so(
    demo: Contracts,
) -> None:
    document = document_for(demo, {INQUIRE})
    assert "servers" not in document
    assert "no HTTP entry" in document["info"]["description"]
    served = document_for(demo, {INQUIRE}, "https://gateway.example:8443")
    assert served["servers"] == [{"url": "https://gateway.example:8443"}]
    assert "no HTTP entry" not in served["info"]["description"]


def test_callers_prove_themselves_with_their_certificate(demo: Contracts) -> None:
    document = document_for(demo, {INQUIRE})
    assert document["components"]["securitySchemes"]["mutualTLS"]["type"] == "mutualTLS"
    assert document["security"] == [{"mutualTLS": []}]


# -- routes ---------------------------------------------------------------------------------


def test_a_get_binds_the_path_field_and_takes_nested_fields_as_query(demo: Contracts) -> None:
    operation = document_for(demo, {INQUIRE})["paths"]["/v1/people/{national_id}"]["get"]
    parameters = {(p["in"], p["name"]): p for p in operation["parameters"]}
    assert list(parameters) == [
        ("path", "national_id"),
        ("query", "birthDate.year"),
        ("query", "birthDate.month"),
        ("query", "birthDate.day"),
    ]
    assert parameters[("path", "national_id")]["required"] is True
    assert parameters[("path", "national_id")]["description"].startswith("National id")
    assert parameters[("query", "birthDate.year")]["schema"] == {
        "type": "integer",
        "format": "int32",
    }
    assert "requestBody" not in operation
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/tabadol.agencies.nocr.v1.Person"
    }
    assert operation["responses"]["default"] == {"$ref": "#/components/responses/RestError"}
    assert operation["description"].startswith("Returns the civil-registration record")


def test_an_additional_binding_with_a_whole_body_has_no_query(demo: Contracts) -> None:
    operation = document_for(demo, {INQUIRE})["paths"]["/v1/people:inquire"]["post"]
    assert "parameters" not in operation
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/tabadol.agencies.nocr.v1.InquirePersonRequest"
    }
    assert operation["operationId"] == f"{NOCR}.InquirePerson.2"


def test_a_server_stream_is_ndjson_over_rest_and_envelopes_over_connect(demo: Contracts) -> None:
    method = f"/{POST}/ListAddresses"
    document = document_for(demo, {method})
    rest = document["paths"]["/v1/provinces/{region.province}/addresses"]["get"]
    assert [(p["in"], p["name"]) for p in rest["parameters"]] == [
        ("path", "region.province"),
        ("query", "region.city"),
        ("query", "maxResults"),
    ]
    assert list(rest["responses"]["200"]["content"]) == ["application/x-ndjson"]
    connect = document["paths"][method]["post"]
    assert list(connect["requestBody"]["content"]) == ["application/connect+json"]
    assert list(connect["responses"]["200"]["content"]) == ["application/connect+json"]
    assert "envelope" in connect["description"]
    assert "connect.EndStreamResponse" in document["components"]["schemas"]


def test_a_single_field_body_and_response_body_describe_that_field(demo: Contracts) -> None:
    document = document_for(demo, {f"/{CONFORMANCE}/UnaryCall"})
    payload = {"$ref": "#/components/schemas/tabadol.conformance.v1.Payload"}
    put = document["paths"]["/v1/conformance/payloads/{response_size}"]["put"]
    assert put["requestBody"]["content"]["application/json"]["schema"] == payload
    assert put["responses"]["200"]["content"]["application/json"]["schema"] == payload
    assert [p["name"] for p in put["parameters"]] == [
        "response_size",
        "responseStatus.code",
        "responseStatus.message",
    ]
    status = document["paths"]["/v1/conformance/statuses/{response_status.code}"]["get"]
    assert [p["name"] for p in status["parameters"]] == [
        "response_status.code",
        "responseSize",
        "payload.body",
        "responseStatus.message",
    ]


def test_a_custom_verb_is_named_where_openapi_cannot_list_it(demo: Contracts) -> None:
    method = f"/{CONFORMANCE}/EmptyCall"
    document = document_for(demo, {method})
    assert list(document["paths"]["/v1/conformance/empty"]) == ["get"]
    assert "PURGE /v1/conformance/empty" in document["paths"][method]["post"]["description"]


def test_client_and_bidi_streams_are_connect_only(demo: Contracts) -> None:
    verify, submit = f"/{NOCR}/VerifyPeople", f"/{TAX}/SubmitInvoices"
    document = document_for(demo, {verify, submit})
    assert list(document["paths"]) == [verify, submit]
    bidi = document["paths"][verify]["post"]
    assert "HTTP/2" in bidi["description"]
    assert [p["name"] for p in bidi["parameters"]] == ["Connect-Timeout-Ms"]


def test_a_unary_connect_endpoint_takes_and_gives_json(demo: Contracts) -> None:
    operation = document_for(demo, {INQUIRE})["paths"][INQUIRE]["post"]
    assert operation["operationId"] == f"{NOCR}.InquirePerson.connect"
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/tabadol.agencies.nocr.v1.InquirePersonRequest"
    }
    assert operation["responses"]["default"] == {"$ref": "#/components/responses/ConnectError"}
    assert [p["name"] for p in operation["parameters"]] == [
        "Connect-Protocol-Version",
        "Connect-Timeout-Ms",
    ]


def test_errors_are_google_rpc_status_for_rest_and_connect_errors_for_connect(
    demo: Contracts,
) -> None:
    document = document_for(demo, {INQUIRE})
    status = schema(document, "google.rpc.Status")["properties"]
    assert status["code"]["type"] == "integer"
    assert status["message"]["type"] == "string"
    assert status["details"]["type"] == "array"
    responses = document["components"]["responses"]
    assert responses["RestError"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/google.rpc.Status"
    }
    codes = schema(document, "connect.Error")["properties"]["code"]["enum"]
    assert codes[0] == "canceled" and "unauthenticated" in codes and "ok" not in codes
    assert len(codes) == 16


# -- schemas --------------------------------------------------------------------------------


def test_descriptions_come_from_the_contracts_comments(demo: Contracts) -> None:
    document = document_for(demo, {INQUIRE})
    assert document["tags"][0]["description"].startswith("The national person registry.")
    person = schema(document, "tabadol.agencies.nocr.v1.Person")
    assert person["description"] == "A person's civil-registration record."
    assert (
        person["properties"]["nationalId"]["description"] == "National id (code melli), 10 digits."
    )
    gender = schema(document, "tabadol.agencies.nocr.v1.Gender")
    assert gender["enum"] == ["GENDER_UNSPECIFIED", "GENDER_MALE", "GENDER_FEMALE"]
    assert "- `GENDER_FEMALE` (2): Female." in gender["description"]


def test_scalars_follow_protobufs_json_mapping(sample: Contracts) -> None:
    document = document_for(sample, every_method(sample))
    fields = schema(document, "tabadol.sample.v1.Shape")["properties"]
    assert fields["id"] == {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
    assert fields["offset"]["type"] == "string" and fields["offset"]["format"] == "int64"
    assert fields["area"] == {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
    assert fields["mass"]["format"] == "uint64"
    assert fields["sides"] == {"type": "integer", "format": "int32"}
    assert fields["corners"]["minimum"] == 0 and fields["corners"]["maximum"] == 2**32 - 1
    assert fields["width"] == {"type": "number", "format": "double"}
    assert fields["height"] == {"type": "number", "format": "float"}
    assert fields["filled"] == {"type": "boolean"}
    assert fields["picture"] == {
        "type": "string",
        "format": "byte",
        "contentEncoding": "base64",
        "description": "Its picture.",
    }
    assert fields["name"] == {"type": "string", "description": "Its name."}


def test_names_enums_lists_and_maps_follow_protobufs_json_mapping(sample: Contracts) -> None:
    document = document_for(sample, every_method(sample))
    fields = schema(document, "tabadol.sample.v1.Shape")["properties"]
    assert "labelsByNumber" in fields and "labels_by_number" not in fields
    assert "strange" in fields and "oddName" not in fields  # json_name as the contract sets it
    assert fields["style"] == {"$ref": "#/components/schemas/tabadol.sample.v1.Shape.Style"}
    style = schema(document, "tabadol.sample.v1.Shape.Style")
    assert style["type"] == "string" and style["enum"] == ["STYLE_UNSPECIFIED", "STYLE_SOLID"]
    assert style["description"].startswith("How it is drawn.")
    assert "- `STYLE_SOLID` (1): With solid lines." in style["description"]
    assert fields["tags"] == {"type": "array", "items": {"type": "string"}}
    assert fields["counts"] == {
        "type": "object",
        "additionalProperties": {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"},
    }
    labels = fields["labelsByNumber"]
    assert labels["additionalProperties"] == {
        "$ref": "#/components/schemas/tabadol.sample.v1.Shape.Label"
    }
    assert "integers written as strings" in labels["description"]
    assert fields["children"] == {
        "type": "array",
        "items": {"$ref": "#/components/schemas/tabadol.sample.v1.Shape"},
    }
    assert fields["retired"]["deprecated"] is True
    # A map's entry is no message of its own in JSON.
    assert not any("Entry" in name for name in document["components"]["schemas"])


def test_oneofs_are_documented_and_proto3_optional_is_not_a_oneof(sample: Contracts) -> None:
    document = document_for(sample, every_method(sample))
    shape = schema(document, "tabadol.sample.v1.Shape")
    assert (
        "Oneof `colour`: at most one of `colourName`, `rgb` is set. The colour."
        in shape["description"]
    )
    assert (
        shape["properties"]["rgb"]["description"] == "An RGB colour.\n\nPart of the oneof `colour`."
    )
    assert "note" not in shape["description"] and "description" not in shape["properties"]["note"]


def test_well_known_types_have_their_json_forms(sample: Contracts) -> None:
    document = document_for(sample, every_method(sample))

    def of(name: str) -> Document:
        return schema(document, f"google.protobuf.{name}")

    assert of("Timestamp")["type"] == "string" and of("Timestamp")["format"] == "date-time"
    assert of("Duration")["type"] == "string" and of("Duration")["pattern"].endswith("s$")
    assert of("Int64Value")["type"] == ["string", "null"]
    assert of("Int64Value")["format"] == "int64"
    assert of("StringValue")["type"] == ["string", "null"]
    assert of("Struct")["type"] == "object" and of("Struct")["additionalProperties"] is True
    assert "type" not in of("Value")
    assert of("ListValue")["type"] == "array"
    assert of("Empty")["type"] == "object"
    assert of("FieldMask")["type"] == "string"
    assert of("Any")["required"] == ["@type"]
    fields = schema(document, "tabadol.sample.v1.Shape")["properties"]
    assert fields["created"] == {"$ref": "#/components/schemas/google.protobuf.Timestamp"}


def test_query_parameters_are_every_form_a_query_can_carry(sample: Contracts) -> None:
    document = document_for(sample, every_method(sample))
    get = document["paths"]["/v1/shapes/{name}"]["get"]
    parameters = {p["name"]: p for p in get["parameters"]}
    assert get["parameters"][0]["name"] == "name" and parameters["name"]["in"] == "path"
    # Scalars, enums, lists of scalars, well-known types with a string form, nested fields.
    for name in ("id", "style", "tags", "created", "lifetime", "budget", "mask", "label.text"):
        assert parameters[name]["in"] == "query", name
    assert parameters["tags"]["schema"] == {"type": "array", "items": {"type": "string"}}
    # A map of scalars as counts[key]=value; JSON values as JSON text.
    assert parameters["counts"]["style"] == "deepObject"
    assert parameters["counts"]["schema"]["additionalProperties"]["format"] == "int64"
    assert parameters["attributes"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/google.protobuf.Struct"
    }
    # Maps of messages, lists of messages and Any have no query form.
    for name in ("labelsByNumber", "children", "extra", "nothing"):
        assert not any(p == name or p.startswith(name + ".") for p in parameters), name


EXAMPLES: dict[str, str] = {
    "integer": "3",
    "number": "1.5",
    "boolean": "true",
    "int64": "-5",
    "uint64": "5",
    "byte": "AAE=",
    "date-time": "2024-03-20T10:15:00Z",
}


def example(document: Document, schema: Document) -> str:
    """A value a query parameter of this schema may carry, as text."""
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rpartition("/")[2]]
    if "enum" in schema:
        return str(schema["enum"][-1])
    if "pattern" in schema and schema["pattern"].endswith("s$"):
        return "1.5s"
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    return EXAMPLES.get(schema.get("format", ""), EXAMPLES.get(kind, "text"))


def test_the_gateway_accepts_every_query_parameter_the_document_lists(
    sample: Contracts,
) -> None:
    from urllib.parse import urlencode

    from google.protobuf import descriptor_pb2, descriptor_pool
    from google.protobuf.message_factory import GetMessageClass

    from tabadol.gateway.http_rules import fill_request

    document = document_for(sample, every_method(sample))
    pairs: list[tuple[str, str]] = []
    for parameter in document["paths"]["/v1/shapes/{name}"]["get"]["parameters"]:
        if parameter["in"] != "query" or parameter["name"] == "rgb":  # one of the oneof
            continue
        name, schema = parameter["name"], parameter.get("schema", {})
        if "content" in parameter:
            pairs.append((name, '{"a": [1, "b"]}' if name == "attributes" else "[1]"))
        elif parameter.get("style") == "deepObject":
            pairs.append((f"{name}[k]", example(document, schema["additionalProperties"])))
        elif schema.get("type") == "array":
            pairs += [(name, example(document, schema["items"]))] * 2
        else:
            pairs.append((name, example(document, schema)))
    pool = descriptor_pool.DescriptorPool()
    for fd in descriptor_pb2.FileDescriptorSet(file=sample.files.values()).file:
        pool.Add(fd)
    shape = GetMessageClass(pool.FindMessageTypeByName("tabadol.sample.v1.Shape"))()
    (binding,) = [b for path, b in load_routes(sample) if path.endswith("/GetShape")]
    fill_request(shape, binding, {"name": "circle"}, urlencode(pairs).encode(), b"")
    assert shape.name == "circle" and shape.id == -5 and list(shape.tags) == ["text", "text"]
    assert shape.counts["k"] == -5 and shape.label.text == "text"
    assert shape.created.seconds > 0 and shape.budget.value == -5


def test_a_patch_with_a_field_body_and_response_body(sample: Contracts) -> None:
    document = document_for(sample, every_method(sample))
    patch = document["paths"]["/v1/shapes/{id}"]["patch"]
    label = {"$ref": "#/components/schemas/tabadol.sample.v1.Shape.Label"}
    assert patch["requestBody"]["content"]["application/json"]["schema"] == label
    assert patch["responses"]["200"]["content"]["application/json"]["schema"] == label
    names = [p["name"] for p in patch["parameters"]]
    assert names[0] == "id" and "name" in names and "label.text" not in names
    path_id = patch["parameters"][0]["schema"]
    assert path_id["type"] == "string" and path_id["format"] == "int64"


def test_only_the_schemas_the_allowed_methods_reach(sample: Contracts) -> None:
    document = document_for(sample, {"/tabadol.sample.v1.Shapes/Watch"})
    assert list(document["paths"]) == ["/tabadol.sample.v1.Shapes/Watch"]
    assert "tabadol.sample.v1.Shape" in document["components"]["schemas"]
    assert "google.protobuf.Empty" in document["components"]["schemas"]
    # Nothing from another file of the contracts the methods do not use.
    demo_like = [n for n in document["components"]["schemas"] if n.startswith("tabadol.agencies")]
    assert demo_like == []


# -- Discovery and the CLI ------------------------------------------------------------------

Channel = Callable[[str], grpc.aio.Channel]


async def get_openapi(channel: grpc.aio.Channel, service: str = "") -> Document:
    stub = discovery_pb2_grpc.DiscoveryStub(channel)
    answer = await stub.GetOpenAPI(discovery_pb2.GetOpenAPIRequest(service=service), timeout=30)
    document: Document = json.loads(answer.json)
    validate(document)
    return document


async def test_discovery_gives_each_agency_the_methods_its_grants_allow(
    channel_for: Channel,
) -> None:
    only_unary = await get_openapi(channel_for("nocr"))
    assert list(only_unary["paths"]) == [UNARY]
    blob = schema(only_unary, "tabadol.test.v1.Blob")
    assert blob["properties"]["data"]["contentEncoding"] == "base64"
    assert "servers" not in only_unary  # the test broker has no HTTP entry
    everything = await get_openapi(channel_for("post"))
    assert sorted(everything["paths"]) == sorted(
        f"/{SERVICE}/{m}" for m in ("Unary", "ServerStream", "ClientStream", "Bidi")
    )
    nothing = await get_openapi(channel_for("cra"))
    assert nothing["paths"] == {}


async def test_discovery_narrows_the_document_to_one_service(channel_for: Channel) -> None:
    document = await get_openapi(channel_for("nocr"), SERVICE)
    assert list(document["paths"]) == [UNARY]
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await get_openapi(channel_for("cra"), SERVICE)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'cra'" in (denied.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await get_openapi(channel_for("nocr"), "tabadol.nope.v1.Ghost")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_describe_openapi_prints_the_callers_document(
    broker: Broker, pki: CertificateAuthority
) -> None:
    code, out = await run_cli(
        "describe", "--openapi", "--broker", f"127.0.0.1:{broker.port}",
        "--credentials", str(pki.dir / "agencies" / "nocr"),
    )  # fmt: skip
    assert code == 0, out
    document = json.loads(out)
    validate(document)
    assert list(document["paths"]) == [UNARY]
    code, out = await run_cli(
        "describe", "--openapi", "--broker", f"127.0.0.1:{broker.port}",
        "--credentials", str(pki.dir / "agencies" / "cra"), SERVICE,
    )  # fmt: skip
    assert code == 2
    assert "PERMISSION_DENIED" in out and SERVICE in out


async def test_describe_without_a_service_or_openapi_says_what_it_needs(
    broker: Broker, pki: CertificateAuthority
) -> None:
    code, out = await run_cli(
        "describe", "--broker", f"127.0.0.1:{broker.port}",
        "--credentials", str(pki.dir / "agencies" / "nocr"),
    )  # fmt: skip
    assert code == 2
    assert "name a service" in out and "--openapi" in out


def test_printed_documents_cannot_command_the_terminal() -> None:
    hostile = {"description": "bad\x1b[2J \u202eevil\u2066 \x85 \x7f ok: " + MEHR}
    text = openapi_text(json.dumps(hostile, ensure_ascii=False))
    for char in ("\x1b", "\u202e", "\u2066", "\x85", "\x7f"):
        assert char not in text
    assert "\\u202e" in text and "\\u001b" in text
    assert MEHR in text  # Persian, with its zero-width non-joiner, stays readable
    assert json.loads(text) == hostile
    with pytest.raises(ValueError, match="not JSON"):
        openapi_text("{")


async def test_discovery_names_the_http_entry_agencies_reach(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: Any
) -> None:
    from tabadol.client import connect

    public_url = 'public_url = "https://gateway.example:8443"\n'
    async with (
        running_echo_gateway(
            tmp_path, pki.dir, echo_contracts, echo_provider.address, public_url
        ) as broker,
        connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "nocr") as channel,
    ):
        document = await get_openapi(channel)
    assert document["servers"] == [{"url": "https://gateway.example:8443"}]
    assert "no HTTP entry" not in document["info"]["description"]
    assert list(document["paths"]) == [UNARY]
