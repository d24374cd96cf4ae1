"""REST routes from google.api.http rules: path templates, routing, the request message from
path, query and body, and the response body, against descriptors protoc compiles."""

from __future__ import annotations

import contextlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
from google.api import annotations_pb2  # type: ignore[import-untyped]
from google.api_core import path_template as api_core_paths
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from tabadol.contracts import Contracts
from tabadol.errors import ContractError
from tabadol.gateway.http_rules import (
    BadRequest,
    Binding,
    PathTemplate,
    RestRoutes,
    RouteMatch,
    RouteMiss,
    bindings,
    fill_request,
    response_json,
)

# google-api-core's templates, the independent reading the matcher is checked against.
path_template: Any = api_core_paths

LIBRARY_PROTO = """
syntax = "proto3";
package library.v1;

import "google/api/annotations.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/field_mask.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

enum Color {
  COLOR_UNSPECIFIED = 0;
  RED = 1;
  GREEN = 2;
}

message Date {
  int32 year = 1;
  int32 month = 2;
  int32 day = 3;
}

message InquirePersonRequest {
  string national_id = 1;
  Date birth_date = 2;
}

message Person {
  string national_id = 1;
  string full_name = 2;
}

message Everything {
  double a_double = 1;
  float a_float = 2;
  int32 an_int32 = 3;
  int64 an_int64 = 4;
  uint32 a_uint32 = 5;
  uint64 a_uint64 = 6;
  sint32 a_sint32 = 7;
  sint64 a_sint64 = 8;
  fixed32 a_fixed32 = 9;
  fixed64 a_fixed64 = 10;
  sfixed32 a_sfixed32 = 11;
  sfixed64 a_sfixed64 = 12;
  bool a_bool = 13;
  string a_string = 14;
  bytes a_bytes = 15;
  Color color = 16;
  repeated string tags = 17;
  repeated int32 numbers = 18;
  repeated Color colors = 19;
  Date date = 20;
  google.protobuf.Timestamp at = 21;
  google.protobuf.Duration ttl = 22;
  google.protobuf.Int32Value maybe_int = 23;
  google.protobuf.BoolValue maybe_bool = 24;
  google.protobuf.StringValue maybe_string = 25;
  google.protobuf.FieldMask mask = 26;
  google.protobuf.Struct extra = 27;
  map<string, string> labels = 28;
  map<int32, Color> paint = 29;
  oneof choice {
    string by_name = 30;
    int32 by_number = 31;
  }
  optional int32 opt = 32;
  repeated Date dates = 33;
}

message Book {
  string name = 1;
  string title = 2;
  int32 pages = 3;
}

message GetBookRequest { string name = 1; bool with_pages = 2; }
message UpdateBookRequest { Book book = 1; google.protobuf.FieldMask update_mask = 2; }
message ReadFileRequest { string path = 1; int32 offset = 2; }
message FileChunk { string path = 1; bytes data = 2; }
message NoteRequest { int64 id = 1; string text = 2; }
message Note { int64 id = 1; string text = 2; repeated string tags = 3; }
message NoteAnswer { Note note = 1; string etag = 2; repeated string tags = 3; int32 version = 4; }
message Node { Node child = 1; string value = 2; }
message Empty {}

service Library {
  rpc InquirePerson(InquirePersonRequest) returns (Person) {
    option (google.api.http) = {
      get: "/v1/people/{national_id}"
      additional_bindings { post: "/v1/people:inquire" body: "*" }
    };
  }
  rpc WhoAmI(Empty) returns (Person) {
    option (google.api.http) = { get: "/v1/people/me" };
  }
  rpc Search(Everything) returns (Everything) {
    option (google.api.http) = { get: "/v1/search" };
  }
  rpc Echo(Everything) returns (Everything) {
    option (google.api.http) = { post: "/v1/echo" body: "*" };
  }
  rpc GetBook(GetBookRequest) returns (Book) {
    option (google.api.http) = { get: "/v1/{name=shelves/*/books/*}" };
  }
  rpc UndeleteBook(GetBookRequest) returns (Book) {
    option (google.api.http) = { post: "/v1/{name=shelves/*/books/*}:undelete" body: "*" };
  }
  rpc UpdateBook(UpdateBookRequest) returns (Book) {
    option (google.api.http) = { patch: "/v1/{book.name=shelves/*/books/*}" body: "book" };
  }
  rpc ReadFile(ReadFileRequest) returns (FileChunk) {
    option (google.api.http) = { get: "/v1/files/{path=**}" };
  }
  rpc TailFile(ReadFileRequest) returns (FileChunk) {
    option (google.api.http) = { get: "/v1/tails/{path=**}/tail" };
  }
  rpc CreateNote(NoteRequest) returns (NoteAnswer) {
    option (google.api.http) = { post: "/v1/notes" body: "text" response_body: "note" };
  }
  rpc NoteTags(NoteRequest) returns (NoteAnswer) {
    option (google.api.http) = { get: "/v1/notes/{id}/tags" response_body: "tags" };
  }
  rpc NoteVersion(NoteRequest) returns (NoteAnswer) {
    option (google.api.http) = { get: "/v1/notes/{id}/version" response_body: "version" };
  }
  rpc DeleteNote(NoteRequest) returns (Empty) {
    option (google.api.http) = { delete: "/v1/notes/{id}" };
  }
  rpc PeekNote(NoteRequest) returns (Empty) {
    option (google.api.http) = { custom: { kind: "HEAD" path: "/v1/notes/{id}" } };
  }
  rpc Grow(Node) returns (Node) {
    option (google.api.http) = { post: "/v1/nodes" body: "*" };
  }
  rpc Plain(Empty) returns (Empty);
}
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    root = tmp_path_factory.mktemp("protos")
    (root / "library" / "v1").mkdir(parents=True)
    (root / "library" / "v1" / "library.proto").write_text(LIBRARY_PROTO)
    out = root / "library.pb"
    # The directory holding google/api/http.proto, which googleapis-common-protos installs.
    google_api = Path(annotations_pb2.__file__).parent.parent.parent
    code = protoc.main(
        [
            "protoc",
            f"-I{root}",
            f"-I{google_api}",
            f"-I{resources.files('grpc_tools') / '_proto'}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            "library/v1/library.proto",
        ]
    )
    assert code == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@pytest.fixture(scope="module")
def contracts(compiled: descriptor_pb2.FileDescriptorSet) -> Contracts:
    return Contracts.from_files(compiled.file)


@pytest.fixture(scope="module")
def routes(contracts: Contracts) -> RestRoutes:
    return RestRoutes.from_contracts(contracts)


@pytest.fixture(scope="module")
def pool(compiled: descriptor_pb2.FileDescriptorSet) -> Any:
    made = descriptor_pool.DescriptorPool()
    for fd in compiled.file:  # --include_imports writes imports first
        made.Add(fd)
    return made


def _message(pool: Any, name: str) -> Message:
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"library.v1.{name}"))()


def _route(routes: RestRoutes, verb: str, path: str) -> RouteMatch:
    matched = routes.match(verb, path)
    assert isinstance(matched, RouteMatch), matched
    return matched


def _call(
    routes: RestRoutes,
    pool: Any,
    verb: str,
    target: str,
    body: bytes = b"",
    *,
    max_depth: int = 32,
) -> Message:
    """The request message a REST call becomes, as the gateway builds it."""
    path, _, query = target.partition("?")
    matched = _route(routes, verb, path)
    method = pool.FindMethodByName(matched.method_path.strip("/").replace("/", "."))
    message = message_factory.GetMessageClass(method.input_type)()
    fill_request(
        message, matched.binding, matched.variables, query.encode(), body, max_depth=max_depth
    )
    return message


def _as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _refused(
    routes: RestRoutes, pool: Any, verb: str, target: str, body: bytes = b"", **kw: Any
) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        _call(routes, pool, verb, target, body, **kw)
    assert str(caught.value) == caught.value.message
    return caught.value


# -- path templates ------------------------------------------------------------------------


def test_a_field_binding_matches_one_segment_and_decodes_it() -> None:
    template = PathTemplate.parse("/v1/people/{national_id}")
    assert template.variables == ("national_id",)
    assert template.match("/v1/people/0012345678") == {"national_id": "0012345678"}
    assert template.match("/v1/people/a%2Fb%20c%3A") == {"national_id": "a/b c:"}
    assert template.match("/v1/people/%D8%B9%D9%84%DB%8C") == {"national_id": "علی"}
    assert template.match("/v1/people/1/2") is None
    assert template.match("/v1/people") is None
    assert template.match("/v1/people/") is None
    assert template.match("/v1/persons/1") is None
    assert template.match("v1/people/1") is None


def test_a_multi_segment_variable_keeps_reserved_characters_encoded() -> None:
    template = PathTemplate.parse("/v1/{name=shelves/*/books/*}")
    assert template.variables == ("name",)
    assert template.match("/v1/shelves/s1/books/b%201") == {"name": "shelves/s1/books/b 1"}
    assert template.match("/v1/shelves/s%2F1/books/b1") == {"name": "shelves/s%2F1/books/b1"}
    assert template.match("/v1/shelves/s1/novels/b1") is None
    assert template.match("/v1/shelves/s1/books") is None


def test_a_double_star_variable_takes_the_rest_of_the_path() -> None:
    template = PathTemplate.parse("/v1/files/{path=**}")
    assert template.match("/v1/files/a") == {"path": "a"}
    assert template.match("/v1/files/a/b/c.txt") == {"path": "a/b/c.txt"}
    assert template.match("/v1/files/a%2Fb/%3Ac%20d") == {"path": "a%2Fb/%3Ac d"}
    assert template.match("/v1/files") is None
    tail = PathTemplate.parse("/v1/tails/{path=**}/tail")
    assert tail.match("/v1/tails/a/b/tail") == {"path": "a/b"}
    assert tail.match("/v1/tails/a/b") is None


def test_a_custom_verb_is_matched_at_the_end_of_the_path() -> None:
    template = PathTemplate.parse("/v1/{name=shelves/*/books/*}:undelete")
    assert template.match("/v1/shelves/1/books/2:undelete") == {"name": "shelves/1/books/2"}
    assert template.match("/v1/shelves/1/books/2") is None
    assert template.match("/v1/shelves/1/books/2:delete") is None
    assert PathTemplate.parse("/v1/people:inquire").match("/v1/people:inquire") == {}
    # Without a verb in the template, a colon is part of the value.
    assert PathTemplate.parse("/v1/people/{id}").match("/v1/people/a:b") == {"id": "a:b"}


def test_unbound_wildcards_match_without_binding() -> None:
    template = PathTemplate.parse("/v1/*/items/**")
    assert template.variables == ()
    assert template.match("/v1/x/items/a/b") == {}
    assert template.match("/v1//items/a") is None


def test_nested_field_paths_are_bound() -> None:
    template = PathTemplate.parse("/v1/{book.name=shelves/*/books/*}/{a.b.c}")
    assert template.variables == ("book.name", "a.b.c")
    assert template.match("/v1/shelves/1/books/2/x") == {
        "book.name": "shelves/1/books/2",
        "a.b.c": "x",
    }


def test_a_malformed_percent_encoding_in_a_bound_segment_is_an_error() -> None:
    template = PathTemplate.parse("/v1/people/{id}")
    with pytest.raises(ValueError, match="malformed percent-encoding '%zz'"):
        template.match("/v1/people/%zz")
    with pytest.raises(ValueError, match="UTF-8"):
        template.match("/v1/people/%FF")


@pytest.mark.parametrize(
    ("template", "openapi"),
    [
        ("/v1/people/{national_id}", "/v1/people/{national_id}"),
        ("/v1/{name=shelves/*/books/*}:undelete", "/v1/{name}:undelete"),
        ("/v1/{book.name=shelves/*}", "/v1/{book.name}"),
        ("/v1/files/{path=**}", "/v1/files/{path}"),
        ("/v1/people:inquire", "/v1/people:inquire"),
    ],
)
def test_openapi_path_names_each_variable_once(template: str, openapi: str) -> None:
    assert PathTemplate.parse(template).openapi_path() == openapi


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("v1/people", "does not start with '/'"),
        ("/", "empty segment"),
        ("/v1//people", "empty segment"),
        ("/v1/people/", "empty segment"),
        ("/v1/{}", "needs a field path"),
        ("/v1/{1abc}", "needs a field path"),
        ("/v1/{a.}", "needs a field path"),
        ("/v1/{name", "not closed"),
        ("/v1/{name=a/{b}}", "cannot nest"),
        ("/v1/{name=}", "empty segment"),
        ("/v1/a*", "unexpected '*'"),
        ("/v1/*a", "whole segments"),
        ("/v1/**/*", "only literal segments may follow '**'"),
        ("/v1/**/{x}", "only literal segments may follow '**'"),
        ("/v1/{x}/{x}", "binds x twice"),
        ("/v1/{a}/{a.b}", "binds both a and a.b"),
        ("/v1/a:", "empty verb"),
        ("/v1/a:b/c", "unexpected '/'"),
        ("/v1/a b", "unexpected ' '"),
        ("/v1/a}", "unexpected '}'"),
    ],
)
def test_a_bad_template_is_refused_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="path template") as caught:
        PathTemplate.parse(text)
    assert problem in str(caught.value)


_SEGMENT = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)
# Dot segments are left out: google-api-core refuses them (URL normalisation removes them).
_SAFE = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~", min_size=1, max_size=10
).filter(lambda s: s not in (".", ".."))


@given(value=_SEGMENT)
def test_a_single_segment_value_round_trips_through_percent_encoding(value: str) -> None:
    template = PathTemplate.parse("/v1/people/{national_id}")
    path = "/v1/people/" + quote(value, safe="")
    assert template.match(path) == {"national_id": value}


@given(
    shelf=_SAFE,
    book=_SAFE,
    rest=st.lists(_SAFE, min_size=1, max_size=4),
)
def test_paths_expanded_by_google_api_core_match_back(
    shelf: str, book: str, rest: list[str]
) -> None:
    books = "/v1/{name=shelves/*/books/*}:undelete"
    path = path_template.expand(books, name=f"shelves/{shelf}/books/{book}")
    assert path_template.validate(books, path)
    assert PathTemplate.parse(books).match(path) == {"name": f"shelves/{shelf}/books/{book}"}
    files = "/v1/files/{path=**}"
    path = path_template.expand(files, path="/".join(rest))
    assert path_template.validate(files, path)
    assert PathTemplate.parse(files).match(path) == {"path": "/".join(rest)}
    people = "/v1/people/{national_id}"
    assert PathTemplate.parse(people).match(path_template.expand(people, national_id=shelf)) == {
        "national_id": shelf
    }


@given(parts=st.lists(st.sampled_from(["v1", "people", "x", "", "files", "a:b"]), max_size=5))
def test_matching_agrees_with_google_api_core_on_which_paths_fit(parts: list[str]) -> None:
    path = "/" + "/".join(parts)
    for text in ("/v1/people/{national_id}", "/v1/files/{path=**}", "/v1/*/x"):
        ours = PathTemplate.parse(text).match(path) is not None
        assert ours == path_template.validate(text, path), (text, path)


# Without "%": reserved expansion passes an existing %XX through, so a "%" is ambiguous.
_TEXT_WITHOUT_PERCENT = st.characters(codec="utf-8", exclude_characters="%")


@given(
    segments=st.lists(st.text(alphabet=_TEXT_WITHOUT_PERCENT, min_size=1), min_size=1, max_size=4)
)
def test_a_multi_segment_value_round_trips_as_rfc6570_reserved_expansion(
    segments: list[str],
) -> None:
    """A client expands {+path}: reserved characters as they are, the rest encoded. What
    stays encoded is reserved characters only, and decoding them gives the value back."""
    reserved = "!$&'()*+,;=:@"
    path = "/v1/files/" + "/".join(quote(s, safe=reserved) for s in segments)
    matched = PathTemplate.parse("/v1/files/{path=**}").match(path)
    assert matched is not None
    assert unquote(matched["path"]) == "/".join(segments)
    assert all(
        unquote(escape) in "!#$&'()*+,/:;=?@[]" for escape in re.findall(r"%..", matched["path"])
    )


# -- rules ---------------------------------------------------------------------------------


def _method(contracts: Contracts, name: str) -> descriptor_pb2.MethodDescriptorProto:
    fd = contracts.files["library/v1/library.proto"]
    return next(m for m in fd.service[0].method if m.name == name)


def test_bindings_reads_the_rule_and_its_additional_bindings(contracts: Contracts) -> None:
    found = bindings(_method(contracts, "InquirePerson"))
    assert [(b.verb, b.template.text, b.body, b.response_body) for b in found] == [
        ("GET", "/v1/people/{national_id}", "", ""),
        ("POST", "/v1/people:inquire", "*", ""),
    ]
    assert bindings(_method(contracts, "Plain")) == ()
    (peek,) = bindings(_method(contracts, "PeekNote"))
    assert (peek.verb, peek.template.text) == ("HEAD", "/v1/notes/{id}")
    (create,) = bindings(_method(contracts, "CreateNote"))
    assert (create.body, create.response_body) == ("text", "note")


def test_bindings_reads_a_rule_parsed_before_the_annotations_were_imported(
    contracts: Contracts,
) -> None:
    raw = _method(contracts, "GetBook").SerializeToString()
    # Options as a process without google.api would hold them: the rule as unknown bytes.
    method = descriptor_pb2.MethodDescriptorProto.FromString(raw)
    assert [b.template.text for b in bindings(method)] == ["/v1/{name=shelves/*/books/*}"]


def _with_rule(contracts: Contracts, method_name: str, **rule: Any) -> Contracts:
    """The contracts with one method's rule replaced."""
    files = []
    for name, fd in contracts.files.items():
        fd = descriptor_pb2.FileDescriptorProto.FromString(fd.SerializeToString())
        if name == "library/v1/library.proto":
            method = next(m for m in fd.service[0].method if m.name == method_name)
            options = descriptor_pb2.MethodOptions()
            http = options.Extensions[annotations_pb2.http]
            for key, value in rule.items():
                if key == "additional":
                    for extra in value:
                        http.additional_bindings.add(**extra)
                elif key == "custom":
                    http.custom.kind, http.custom.path = value
                else:
                    setattr(http, key, value)
            method.options.CopyFrom(
                descriptor_pb2.MethodOptions.FromString(options.SerializeToString())
            )
        files.append(fd)
    return Contracts.from_files(files)


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"get": "/v1/people/{nationalid}"}, "InquirePersonRequest has no field nationalid"),
        ({"get": "/v1/people/{birth_date.yaer}"}, "library.v1.Date has no field yaer"),
        ({"get": "/v1/people/{national_id.x}"}, "national_id is not a single message"),
        ({"get": "/v1/people/{birth_date}"}, "is a message (library.v1.Date)"),
        ({"post": "/v1/people", "body": "person"}, "body field person is not a field"),
        ({"post": "/v1/people/{national_id}", "body": "national_id"}, "also bound by the path"),
        ({"get": "/v1/people", "body": "*"}, "a GET rule may not take a request body"),
        ({"get": "/v1/people/{national_id}", "response_body": "name"}, "response_body name"),
        ({"get": "/v1/people/{national_id"}, "not closed"),
        ({"body": "*"}, "names no verb and path"),
        ({"custom": ("", "/v1/x")}, "is not an HTTP method name"),
        (
            {
                "get": "/v1/a",
                "additional": [{"get": "/v1/b", "additional_bindings": [{"get": "/v1/c"}]}],
            },
            "may not have additional_bindings of its own",
        ),
    ],
)
def test_a_bad_rule_is_a_contract_error_naming_the_method(
    contracts: Contracts, rule: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ContractError) as caught:
        RestRoutes.from_contracts(_with_rule(contracts, "InquirePerson", **rule))
    assert "/library.v1.Library/InquirePerson" in str(caught.value)
    assert problem in str(caught.value)


def test_a_repeated_field_in_the_path_is_a_contract_error(contracts: Contracts) -> None:
    with pytest.raises(ContractError, match="tags is a repeated field"):
        RestRoutes.from_contracts(_with_rule(contracts, "Search", get="/v1/search/{tags}"))


def test_two_methods_claiming_one_verb_and_template_is_a_contract_error(
    contracts: Contracts,
) -> None:
    clash = _with_rule(contracts, "WhoAmI", get="/v1/people/{other}")
    with pytest.raises(ContractError) as caught:
        RestRoutes.from_contracts(_with_rule(clash, "WhoAmI", get="/v1/search"))
    assert "/library.v1.Library/Search" in str(caught.value)
    assert "/library.v1.Library/WhoAmI" in str(caught.value)
    assert "GET /v1/search" in str(caught.value)


def test_routes_lists_every_binding_of_every_method(routes: RestRoutes) -> None:
    listed = [(path, b.verb, b.template.text) for path, b in routes.routes()]
    assert ("/library.v1.Library/InquirePerson", "GET", "/v1/people/{national_id}") in listed
    assert ("/library.v1.Library/InquirePerson", "POST", "/v1/people:inquire") in listed
    assert ("/library.v1.Library/PeekNote", "HEAD", "/v1/notes/{id}") in listed
    assert not any(path.endswith("/Plain") for path, _, _ in listed)
    assert len(listed) == 16


def test_no_rules_need_no_descriptor_pool() -> None:
    assert list(RestRoutes.from_contracts(Contracts({}, {})).routes()) == []


# -- routing -------------------------------------------------------------------------------


def test_a_request_finds_its_method_and_variables(routes: RestRoutes) -> None:
    matched = _route(routes, "GET", "/v1/people/0012345678")
    assert matched.method_path == "/library.v1.Library/InquirePerson"
    assert matched.variables == {"national_id": "0012345678"}
    assert matched.binding.verb == "GET"
    inquire = _route(routes, "POST", "/v1/people:inquire")
    assert inquire.method_path == "/library.v1.Library/InquirePerson"
    assert inquire.binding.body == "*"
    assert _route(routes, "HEAD", "/v1/notes/7").method_path == "/library.v1.Library/PeekNote"
    assert _route(routes, "DELETE", "/v1/notes/7").method_path == "/library.v1.Library/DeleteNote"
    undelete = _route(routes, "POST", "/v1/shelves/1/books/2:undelete")
    assert undelete.method_path == "/library.v1.Library/UndeleteBook"


def test_literal_segments_win_over_variables(routes: RestRoutes) -> None:
    assert _route(routes, "GET", "/v1/people/me").method_path == "/library.v1.Library/WhoAmI"
    assert _route(routes, "GET", "/v1/people/mee").method_path.endswith("/InquirePerson")


def test_an_unknown_path_is_404(routes: RestRoutes) -> None:
    assert routes.match("GET", "/v2/people/1") == RouteMiss(404, "no route for GET /v2/people/1")
    assert isinstance(routes.match("GET", "/v1/people/1/extra"), RouteMiss)
    assert routes.match("GET", "/v1/people/1/").status == 404  # type: ignore[union-attr]


def test_a_path_of_another_verb_is_405_listing_the_allowed(routes: RestRoutes) -> None:
    miss = routes.match("GET", "/v1/notes/7")
    assert miss == RouteMiss(
        405, "GET is not allowed on /v1/notes/7; allowed: DELETE, HEAD", ("DELETE", "HEAD")
    )
    assert routes.match("POST", "/v1/search").status == 405  # type: ignore[union-attr]
    assert routes.match("get", "/v1/search").status == 405  # type: ignore[union-attr]


def test_an_empty_path_field_is_400_naming_it(routes: RestRoutes) -> None:
    assert routes.match("GET", "/v1/people/") == RouteMiss(400, "path field national_id is missing")
    assert routes.match("GET", "/v1/shelves//books/2") == RouteMiss(
        400, "path field name is missing"
    )
    assert routes.match("GET", "/v1/files/") == RouteMiss(400, "path field path is missing")


def test_a_malformed_path_is_400(routes: RestRoutes) -> None:
    miss = routes.match("GET", "/v1/people/%E0%A4")
    assert isinstance(miss, RouteMiss)
    assert miss.status == 400
    assert "path field national_id" in miss.message
    assert "UTF-8" in miss.message
    assert routes.match("GET", "/v1/people/%2").status == 400  # type: ignore[union-attr]


# -- the request: path, query and body -----------------------------------------------------


def test_path_and_query_fill_a_get_request(routes: RestRoutes, pool: Any) -> None:
    message = _call(
        routes,
        pool,
        "GET",
        "/v1/people/0012345678?birth_date.year=1360&birthDate.month=7&birth_date.day=1",
    )
    assert _as_dict(message) == {
        "national_id": "0012345678",
        "birth_date": {"year": 1360, "month": 7, "day": 1},
    }


def test_body_star_fills_the_whole_message_and_the_path_goes_on_top(
    routes: RestRoutes, pool: Any
) -> None:
    body = json.dumps({"nationalId": "0012345678", "birth_date": {"year": 1360}}).encode()
    message = _call(routes, pool, "POST", "/v1/people:inquire", body)
    assert _as_dict(message) == {"national_id": "0012345678", "birth_date": {"year": 1360}}
    undelete = _call(routes, pool, "POST", "/v1/shelves/1/books/2:undelete", b'{"withPages":true}')
    assert _as_dict(undelete) == {"name": "shelves/1/books/2", "with_pages": True}
    assert _as_dict(_call(routes, pool, "POST", "/v1/people:inquire", b"")) == {}


def test_body_field_fills_that_field_and_the_path_sets_inside_it(
    routes: RestRoutes, pool: Any
) -> None:
    message = _call(
        routes,
        pool,
        "PATCH",
        "/v1/shelves/1/books/2?update_mask=title,pages",
        b'{"title": "Shahnameh", "pages": 990}',
    )
    assert _as_dict(message) == {
        "book": {"name": "shelves/1/books/2", "title": "Shahnameh", "pages": 990},
        "update_mask": "title,pages",
    }
    # The same name in the body agrees with the path, so it is accepted.
    same = _call(routes, pool, "PATCH", "/v1/shelves/1/books/2", b'{"name": "shelves/1/books/2"}')
    assert _as_dict(same) == {"book": {"name": "shelves/1/books/2"}}
    note = _call(routes, pool, "POST", "/v1/notes?id=5", b'"remember"')
    assert _as_dict(note) == {"id": "5", "text": "remember"}


def test_a_path_variable_is_converted_to_its_field_type(routes: RestRoutes, pool: Any) -> None:
    assert _as_dict(_call(routes, pool, "DELETE", "/v1/notes/-42")) == {"id": "-42"}
    bad = _refused(routes, pool, "DELETE", "/v1/notes/abc")
    assert bad.field == "id"
    assert bad.message == "path field id: 'abc' is not an integer"
    big = _refused(routes, pool, "DELETE", f"/v1/notes/{2**63}")
    assert "out of range for int64" in big.message


def test_a_double_star_value_reaches_the_field(routes: RestRoutes, pool: Any) -> None:
    message = _call(routes, pool, "GET", "/v1/files/etc/a%20b/c%2Fd?offset=3")
    assert _as_dict(message) == {"path": "etc/a b/c%2Fd", "offset": 3}
    tail = _call(routes, pool, "GET", "/v1/tails/x/y/tail")
    assert _as_dict(tail) == {"path": "x/y"}


def test_query_parameters_of_every_scalar_kind(routes: RestRoutes, pool: Any) -> None:
    query = "&".join(
        [
            "a_double=-1.5e3",
            "aFloat=2.5",
            f"an_int32={-(2**31)}",
            f"an_int64={2**63 - 1}",
            f"a_uint32={2**32 - 1}",
            f"a_uint64={2**64 - 1}",
            "a_sint32=-7",
            "a_sint64=-8",
            "a_fixed32=9",
            "a_fixed64=10",
            "a_sfixed32=-11",
            "a_sfixed64=-12",
            "a_bool=true",
            "a_string=%D8%B3%D9%84%D8%A7%D9%85+world",
            "a_bytes=-_8",
            "color=GREEN",
        ]
    )
    message = _call(routes, pool, "GET", "/v1/search?" + query)
    assert _as_dict(message) == {
        "a_double": -1500.0,
        "a_float": 2.5,
        "an_int32": -(2**31),
        "an_int64": str(2**63 - 1),
        "a_uint32": 2**32 - 1,
        "a_uint64": str(2**64 - 1),
        "a_sint32": -7,
        "a_sint64": "-8",
        "a_fixed32": 9,
        "a_fixed64": "10",
        "a_sfixed32": -11,
        "a_sfixed64": "-12",
        "a_bool": True,
        "a_string": "سلام world",
        "a_bytes": "+/8=",
        "color": "GREEN",
    }


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("a_bool=1", {"a_bool": True}),
        ("a_bool=False", {}),
        ("color=2", {"color": "GREEN"}),
        ("a_bytes=%2B%2F8%3D", {"a_bytes": "+/8="}),
        ("a_bytes=AQI", {"a_bytes": "AQI="}),
        ("a_double=NaN", {"a_double": "NaN"}),
        ("a_double=-Infinity", {"a_double": "-Infinity"}),
        ("an_int32=%2B5", {"an_int32": 5}),
        ("a_string=", {}),
        ("a_string", {}),
        ("tags=a&tags=b&tags=c", {"tags": ["a", "b", "c"]}),
        ("numbers=1&numbers=-2", {"numbers": [1, -2]}),
        ("colors=RED&colors=2", {"colors": ["RED", "GREEN"]}),
        ("date.year=1403&date.month=1", {"date": {"year": 1403, "month": 1}}),
        ("at=2024-03-20T10:00:00Z", {"at": "2024-03-20T10:00:00Z"}),
        ("ttl=1.5s", {"ttl": "1.500s"}),
        ("maybe_int=0", {"maybe_int": 0}),
        ("maybeBool=false", {"maybe_bool": False}),
        ("maybe_string=", {"maybe_string": ""}),
        ("mask=title,date.year", {"mask": "title,date.year"}),
        ("extra=%7B%22a%22%3A%5B1%2Ctrue%5D%7D", {"extra": {"a": [1, True]}}),
        ("labels[k1]=v1&labels[k2]=v2", {"labels": {"k1": "v1", "k2": "v2"}}),
        ("paint[3]=RED", {"paint": {"3": "RED"}}),
        ("by_name=x", {"by_name": "x"}),
        ("opt=0", {"opt": 0}),
    ],
)
def test_query_parameters_set_fields(
    routes: RestRoutes, pool: Any, query: str, expected: dict[str, Any]
) -> None:
    assert _as_dict(_call(routes, pool, "GET", "/v1/search?" + query)) == expected


@pytest.mark.parametrize(
    ("query", "field", "problem"),
    [
        ("colour=RED", "colour", "unknown query parameter colour"),
        ("date.yaer=1", "date.yaer", "unknown query parameter date.yaer"),
        ("a_string.x=1", "a_string.x", "unknown query parameter a_string.x"),
        ("tags[x]=1", "tags[x]", "unknown query parameter tags[x]"),
        ("labels=1", "labels", "is a map; give it as labels[key]"),
        ("date=1", "date", "names a message (library.v1.Date)"),
        ("dates.year=1", "dates.year", "unknown query parameter dates.year"),
        ("an_int32=2147483648", "an_int32", "out of range for int32"),
        ("an_int32=1.5", "an_int32", "'1.5' is not an integer"),
        ("a_uint64=-1", "a_uint64", "'-1' is not a non-negative integer"),
        ("a_uint32=4294967296", "a_uint32", "out of range for uint32"),
        (f"an_int64={2**63}", "an_int64", "out of range for int64"),
        ("a_float=1e39", "a_float", "out of range for float"),
        ("a_double=1e400", "a_double", "out of range for double"),
        ("a_double=1_0", "a_double", "is not a number"),
        ("a_bool=yes", "a_bool", "'yes' is not a boolean"),
        ("color=PURPLE", "color", "is not a value of library.v1.Color"),
        ("color=7", "color", "is not a value of library.v1.Color"),
        ("a_bytes=*", "a_bytes", "is not base64"),
        ("at=yesterday", "at", "query parameter at:"),
        ("ttl=5 minutes", "ttl", "query parameter ttl:"),
        ("extra=%7B", "extra", "query parameter extra: the value is not valid JSON"),
        ("a_string=a&a_string=b", "a_string", "is given 2 times"),
        ("date.year=1&date.year=2", "date.year", "is given 2 times"),
        ("by_name=x&by_number=2", "by_number", "both in the oneof choice"),
        ("labels[k]=1&labels[k]=2", "labels[k]", "gives key 'k' twice"),
        ("paint[x]=RED", "paint[x]", "'x' is not an integer"),
        ("a_string=%FF", "a_string", "query parameter a_string: '%FF' does not decode to UTF-8"),
        ("a_string=%G1", "a_string", "malformed percent-encoding '%G1'"),
        ("=1", "", "a query parameter has no name"),
    ],
)
def test_a_bad_query_parameter_is_refused_naming_it(
    routes: RestRoutes, pool: Any, query: str, field: str, problem: str
) -> None:
    bad = _refused(routes, pool, "GET", "/v1/search?" + query)
    assert bad.field == field
    assert problem in bad.message


def test_query_parameters_may_not_set_path_or_body_fields(routes: RestRoutes, pool: Any) -> None:
    bad = _refused(routes, pool, "GET", "/v1/people/1?national_id=2")
    assert (
        bad.message == "query parameter national_id sets national_id, which the path already binds"
    )
    bad = _refused(routes, pool, "PATCH", "/v1/shelves/1/books/2?book.title=x", b"{}")
    assert (
        bad.message
        == "query parameter book.title sets book.title, which comes from the request body"
    )
    bad = _refused(routes, pool, "POST", "/v1/people:inquire?national_id=1", b"{}")
    assert bad.field == "national_id"
    assert "takes every field from the request body" in bad.message


def test_a_body_on_a_route_without_one_is_refused(routes: RestRoutes, pool: Any) -> None:
    bad = _refused(routes, pool, "GET", "/v1/people/1", b'{"national_id": "1"}')
    assert bad.message == (
        "GET /v1/people/{national_id} takes no request body; send the fields as query parameters"
    )


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        (b'{"aString": "x",}', "", "request body is not valid JSON: Expecting property name"),
        (b'{"aString": "x"', "", "at line 1 column 16"),
        (b"[1, 2]", "", "request body must be a JSON object, not an array"),
        (b'"text"', "", "request body must be a JSON object, not a string"),
        (b"\xff{}", "", "request body is not valid UTF-8 (invalid start byte at byte 0)"),
        (b'{"aString": "\xc3"}', "", "request body is not valid UTF-8"),
        (b'{"aDouble": NaN}', "", "NaN is not JSON"),
        (b'{"aString": "a", "aString": "b"}', "aString", "key 'aString' appears twice"),
        (b'{"colour": 1}', "colour", "request body: unknown field colour"),
        (b'{"date": {"yaer": 1}}', "date.yaer", "request body: unknown field date.yaer"),
        (b'{"dates": [{}, {"x": 1}]}', "dates[1].x", "unknown field dates[1].x"),
        (b'{"date": 5}', "date", "date must be a JSON object, not a number"),
        (b'{"tags": "a"}', "tags", "tags must be a JSON array, not a string"),
        (b'{"labels": []}', "labels", "labels must be a JSON object, not an array"),
        (b'{"aString": {}}', "aString", "aString must be one value, not an object"),
        (b'{"at": {"seconds": 1}}', "at", "at must be one value, not an object"),
        (b'{"extra": []}', "extra", "extra must be a JSON object, not an array"),
        (b'{"anInt32": 2147483648}', "anInt32", "field anInt32: Value out of range: 2147483648"),
        (b'{"anInt32": "abc"}', "anInt32", "field anInt32: not an integer: 'abc'"),
        (b'{"anInt32": 1.5}', "anInt32", "Couldn't parse integer: 1.5"),
        (b'{"aUint64": -1}', "aUint64", "field aUint64: Value out of range: -1"),
        (b'{"anInt64": "9223372036854775808"}', "anInt64", "Value out of range"),
        (b'{"aBool": "true"}', "aBool", "Expected true or false without quotes"),
        (b'{"color": "PURPLE"}', "color", "Invalid enum value PURPLE"),
        (b'{"date": {"year": "x"}}', "date.year", "field date.year: not an integer: 'x'"),
        (b'{"dates": [{"day": true}]}', "dates[0].day", "field dates[0].day: Bool value"),
        (b'{"at": "yesterday"}', "at", "field at:"),
        (b'{"byName": "x", "byNumber": 1}', "", "oneof"),
    ],
)
def test_a_bad_body_is_refused_naming_the_field(
    routes: RestRoutes, pool: Any, body: bytes, field: str, problem: str
) -> None:
    bad = _refused(routes, pool, "POST", "/v1/echo", body)
    assert bad.field == field
    assert problem in bad.message


def test_a_body_nested_too_deeply_is_refused(routes: RestRoutes, pool: Any) -> None:
    def nest(levels: int) -> bytes:
        return ('{"child":' * (levels - 1) + "{}" + "}" * (levels - 1)).encode()

    assert _call(routes, pool, "POST", "/v1/nodes", nest(8), max_depth=8).ByteSize() >= 0
    bad = _refused(routes, pool, "POST", "/v1/nodes", nest(9), max_depth=8)
    assert bad.message == "request body is nested too deeply (more than 8 levels)"
    deep_arrays = b'{"value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "nested too deeply" in _refused(routes, pool, "POST", "/v1/nodes", deep_arrays).message
    deep_struct = b'{"extra": ' + b'{"a":' * 20 + b"1" + b"}" * 20 + b"}"
    assert "nested too deeply" in _refused(routes, pool, "POST", "/v1/echo", deep_struct).message


def test_a_field_set_differently_in_path_and_body_is_refused(routes: RestRoutes, pool: Any) -> None:
    bad = _refused(routes, pool, "PATCH", "/v1/shelves/1/books/2", b'{"name": "shelves/9/books/9"}')
    assert bad.field == "book.name"
    assert bad.message == (
        "path field book.name is 'shelves/1/books/2' in the path, but the request body sets it "
        "to 'shelves/9/books/9'"
    )
    bad = _refused(routes, pool, "POST", "/v1/shelves/1/books/2:undelete", b'{"name": "x"}')
    assert bad.field == "name"


def test_a_body_field_that_is_not_json_is_refused(routes: RestRoutes, pool: Any) -> None:
    bad = _refused(routes, pool, "POST", "/v1/notes", b"remember")
    assert bad.message.startswith("request body is not valid JSON")
    bad = _refused(routes, pool, "POST", "/v1/notes", b'{"text": "x"}')
    assert bad.field == "text"
    assert "must be one value, not an object" in bad.message


def test_a_path_variable_naming_a_message_is_refused(pool: Any) -> None:
    binding = Binding("GET", PathTemplate.parse("/v1/{date}"), "", "")
    with pytest.raises(BadRequest) as caught:
        fill_request(_message(pool, "Everything"), binding, {"date": "x"}, b"", b"")
    assert caught.value.field == "date"
    assert caught.value.message == "path field date is a message"
    binding = Binding("GET", PathTemplate.parse("/v1/{nope}"), "", "")
    with pytest.raises(BadRequest, match=r"library\.v1\.Everything has no field nope"):
        fill_request(_message(pool, "Everything"), binding, {"nope": "x"}, b"", b"")
    binding = Binding("GET", PathTemplate.parse("/v1/{a_string}"), "", "")
    with pytest.raises(BadRequest, match="path field a_string is missing"):
        fill_request(_message(pool, "Everything"), binding, {}, b"", b"")


def test_well_known_types_in_the_path(pool: Any) -> None:
    binding = Binding("GET", PathTemplate.parse("/v1/{at}/{maybe_int}"), "", "")
    message = _message(pool, "Everything")
    fill_request(message, binding, {"at": "2024-03-20T10:00:00Z", "maybe_int": "7"}, b"", b"")
    assert _as_dict(message) == {"at": "2024-03-20T10:00:00Z", "maybe_int": 7}


@given(
    values=st.dictionaries(
        st.sampled_from(["a_string", "an_int32", "tags", "a_bool", "date.day"]),
        st.integers(min_value=0, max_value=2**31 - 1),
    )
)
def test_fill_request_raises_only_bad_request(pool: Any, values: dict[str, int]) -> None:
    """Whatever the query, the outcome is a message or BadRequest, never another error."""
    query = "&".join(f"{k}={v}" for k, v in values.items()).encode()
    binding = Binding("GET", PathTemplate.parse("/v1/search"), "", "")
    message = _message(pool, "Everything")
    with contextlib.suppress(BadRequest):
        fill_request(message, binding, {}, query, b"")


@given(body=st.binary(max_size=64))
def test_arbitrary_bodies_are_a_message_or_a_bad_request(pool: Any, body: bytes) -> None:
    binding = Binding("POST", PathTemplate.parse("/v1/echo"), "*", "")
    try:
        fill_request(_message(pool, "Everything"), binding, {}, b"", body)
    except BadRequest as e:
        assert e.message


@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["aString", "anInt32", "tags", "date", "year", "extra", "at", "x"]),
                inner,
                max_size=3,
            )
        ),
        max_leaves=8,
    )
)
def test_arbitrary_json_is_a_message_or_a_bad_request(pool: Any, body: Any) -> None:
    binding = Binding("POST", PathTemplate.parse("/v1/echo"), "*", "")
    try:
        fill_request(_message(pool, "Everything"), binding, {}, b"", json.dumps(body).encode())
    except BadRequest as e:
        assert e.message


# -- the response --------------------------------------------------------------------------


def test_the_response_is_json_format_output_compact_utf8(pool: Any) -> None:
    person = _message(pool, "Person")
    json_format.ParseDict({"nationalId": "1", "fullName": "علی رضایی"}, person)
    binding = Binding("GET", PathTemplate.parse("/v1/people/{national_id}"), "", "")
    out = response_json(person, binding)
    assert out == '{"nationalId":"1","fullName":"علی رضایی"}'.encode()
    assert json.loads(out) == json.loads(json_format.MessageToJson(person))


def test_response_body_sends_only_that_field(pool: Any) -> None:
    answer = _message(pool, "NoteAnswer")
    json_format.ParseDict(
        {"note": {"id": "5", "text": "x"}, "etag": "e", "tags": ["a", "b"]}, answer
    )
    rule = PathTemplate.parse("/v1/notes")
    assert response_json(answer, Binding("POST", rule, "text", "note")) == b'{"id":"5","text":"x"}'
    assert response_json(answer, Binding("GET", rule, "", "tags")) == b'["a","b"]'
    assert response_json(answer, Binding("GET", rule, "", "version")) == b"0"
    assert response_json(_message(pool, "NoteAnswer"), Binding("GET", rule, "", "note")) == b"{}"
    assert response_json(_message(pool, "NoteAnswer"), Binding("GET", rule, "", "tags")) == b"[]"
