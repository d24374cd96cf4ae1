"""Specification of contracts that carry HTTP rules (google.api.http): the demo routes, and a
toolchain that accepts the google/api imports and treats them as no agency's files."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2, descriptor_pool

from tabadol.catalogue import Catalogue
from tabadol.contracts import Contracts, well_known
from tabadol.describe import describe
from tabadol.errors import ContractError
from tabadol.governance import BreakingKind, breaking_changes, lint, load_contracts, own_files
from tabadol.governance.load import googleapis_root
from tabadol.platform.v1 import discovery_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
NOCR = "tabadol/agencies/nocr/v1/person_registry.proto"
NOCR_SERVICE = "tabadol.agencies.nocr.v1.PersonRegistry"
IMPORTS = {"google/api/annotations.proto", "google/api/http.proto"}
FILE = "tabadol/test/v1/lookup.proto"

LOOKUP = """\
syntax = "proto3";

// Contracts for the tests.
package tabadol.test.v1;
{imports}
// Looks records up.
service Lookup {{
  // One record.
  rpc Find(FindRequest) returns (FindResponse){rule}
}}

// What to find.
message FindRequest {{
  // The record's id.
  string id = 1;
}}

// What was found.
message FindResponse {{
  // The record's id.
  string id = 1;
}}
"""


def lookup(*, with_rule: bool = True, rule: str = 'get: "/v1/records/{id}"') -> str:
    if not with_rule:
        return LOOKUP.format(imports="", rule=";")
    return LOOKUP.format(
        imports='\nimport "google/api/annotations.proto";\n',
        rule=f" {{\n    option (google.api.http) = {{{rule}}};\n  }}",
    )


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def http_rule(method: descriptor_pb2.MethodDescriptorProto) -> http_pb2.HttpRule | None:
    # Re-parsed so that the extension resolves whichever pool the descriptor came from.
    options = descriptor_pb2.MethodOptions.FromString(method.options.SerializeToString())
    if not options.HasExtension(annotations_pb2.http):
        return None
    rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
    return rule


def route(rule: http_pb2.HttpRule) -> tuple[str, str, str, str]:
    verb = rule.WhichOneof("pattern")
    if verb == "custom":
        return (rule.custom.kind, rule.custom.path, rule.body, rule.response_body)
    return (verb.upper(), getattr(rule, verb), rule.body, rule.response_body)


def routes_of(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, list[tuple[str, ...]]]:
    """Every method of the project's own contracts, with its routes (none for no rule)."""
    found: dict[str, list[tuple[str, ...]]] = {}
    for fd in files:
        if well_known(fd.name) or fd.package.startswith("tabadol.platform."):
            continue
        for svc in fd.service:
            for method in svc.method:
                rule = http_rule(method)
                bindings = [] if rule is None else [rule, *rule.additional_bindings]
                found[f"/{fd.package}.{svc.name}/{method.name}"] = [route(b) for b in bindings]
    return found


def test_the_demo_contracts_carry_their_http_routes() -> None:
    assert routes_of(load_contracts(PROTOS)) == {
        "/tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson": [
            ("GET", "/v1/people/{national_id}", "", ""),
            ("POST", "/v1/people:inquire", "*", ""),
        ],
        "/tabadol.agencies.nocr.v1.PersonRegistry/VerifyPeople": [],
        "/tabadol.agencies.post.v1.AddressDirectory/LookupPostalCode": [
            ("GET", "/v1/postal-codes/{postal_code}", "", ""),
        ],
        "/tabadol.agencies.post.v1.AddressDirectory/ListAddresses": [
            ("GET", "/v1/provinces/{region.province}/addresses", "", ""),
        ],
        "/tabadol.agencies.cra.v1.MobileOwnership/MatchMobile": [
            ("POST", "/v1/mobile-ownership:match", "*", ""),
        ],
        "/tabadol.agencies.tax.v1.InvoiceRegistry/SubmitInvoices": [],
        "/tabadol.conformance.v1.TestService/EmptyCall": [
            ("GET", "/v1/conformance/empty", "", ""),
            ("PURGE", "/v1/conformance/empty", "", ""),
        ],
        "/tabadol.conformance.v1.TestService/UnaryCall": [
            ("POST", "/v1/conformance/unary", "*", ""),
            ("PUT", "/v1/conformance/payloads/{response_size}", "payload", "payload"),
            ("GET", "/v1/conformance/statuses/{response_status.code}", "", ""),
        ],
        "/tabadol.conformance.v1.TestService/StreamingOutputCall": [
            ("POST", "/v1/conformance/streaming-output", "*", ""),
        ],
        "/tabadol.conformance.v1.TestService/StreamingInputCall": [],
        "/tabadol.conformance.v1.TestService/FullDuplexCall": [],
        "/tabadol.conformance.v1.TestService/UnimplementedCall": [
            ("POST", "/v1/conformance/unimplemented", "", ""),
        ],
    }


def test_every_route_is_documented_for_http_callers() -> None:
    # The comment on the option, inside the method block: what an HTTP/JSON caller sends.
    option_path = (4, annotations_pb2.http.number)  # MethodDescriptorProto.options, the rule
    for fd in load_contracts(PROTOS):
        comments = {tuple(loc.path): loc.leading_comments for loc in fd.source_code_info.location}
        for i, svc in enumerate(fd.service):
            for j, method in enumerate(svc.method):
                if http_rule(method) is None:
                    continue
                comment = comments.get((6, i, 2, j, *option_path), "")
                assert comment.startswith(" Over HTTP/JSON: "), f"{svc.name}/{method.name}"


def test_the_http_imports_are_no_agency_s_files(tmp_path: Path) -> None:
    files = load_contracts(PROTOS)
    fds = tmp_path / "contracts.pb"
    fds.write_bytes(descriptor_pb2.FileDescriptorSet(file=files).SerializeToString())

    names = {fd.name for fd in files}
    assert IMPORTS | {"google/protobuf/descriptor.proto"} <= names
    assert own_files(fds) == own_files(PROTOS)
    assert not any(name.startswith("google/") for name in own_files(fds))
    assert lint(load_contracts(fds), targets=own_files(fds)) == []


def test_a_directory_with_its_own_copy_of_google_api_lints_only_its_contracts(
    tmp_path: Path,
) -> None:
    # buf users vendor google/api/*.proto beside their contracts; the copy is not theirs.
    vendored = {name: (googleapis_root() / name).read_text() for name in IMPORTS}
    root = write_tree(tmp_path, {FILE: lookup(), **vendored})

    assert own_files(root) == {FILE}
    assert lint(load_contracts(root), targets=own_files(root)) == []


def test_a_compiled_rule_reads_back_from_the_descriptor(tmp_path: Path) -> None:
    files = load_contracts(write_tree(tmp_path, {FILE: lookup()}))
    (lookup_file,) = [fd for fd in files if fd.name == FILE]

    rule = http_rule(lookup_file.service[0].method[0])

    assert rule is not None and route(rule) == ("GET", "/v1/records/{id}", "", "")


def test_adding_an_http_rule_breaks_no_consumer(tmp_path: Path) -> None:
    old = load_contracts(write_tree(tmp_path / "old", {FILE: lookup(with_rule=False)}))
    new = load_contracts(write_tree(tmp_path / "new", {FILE: lookup()}))

    assert breaking_changes(old, new) == []


def changes(tmp_path: Path, old_rule: str, new_rule: str) -> list[tuple[str, str]]:
    old = load_contracts(write_tree(tmp_path / "old", {FILE: lookup(rule=old_rule)}))
    new = load_contracts(write_tree(tmp_path / "new", {FILE: lookup(rule=new_rule)}))
    return [(b.kind, str(b)) for b in breaking_changes(old, new)]


def test_an_additional_binding_breaks_no_consumer(tmp_path: Path) -> None:
    old = 'get: "/v1/records/{id}"'
    new = 'get: "/v1/records/{id}" additional_bindings {post: "/v1/records:find" body: "*"}'

    assert changes(tmp_path, old, new) == []


def test_a_route_removed_or_moved_breaks_http_callers(tmp_path: Path) -> None:
    old = 'get: "/v1/records/{id}" additional_bindings {post: "/v1/records:find" body: "*"}'
    new = 'get: "/v1/entries/{id}"'

    assert changes(tmp_path, old, new) == [
        (
            BreakingKind.HTTP_ROUTE_REMOVED,
            "tabadol.test.v1.Lookup/Find: method tabadol.test.v1.Lookup/Find lost its HTTP route "
            "GET /v1/records/{id}; agencies calling it over HTTP/JSON now get 404 "
            "[HTTP_ROUTE_REMOVED]",
        ),
        (
            BreakingKind.HTTP_ROUTE_REMOVED,
            "tabadol.test.v1.Lookup/Find: method tabadol.test.v1.Lookup/Find lost its HTTP route "
            "POST /v1/records:find; agencies calling it over HTTP/JSON now get 404 "
            "[HTTP_ROUTE_REMOVED]",
        ),
    ]


def test_a_route_whose_body_or_response_body_changes_breaks_http_callers(tmp_path: Path) -> None:
    old = 'post: "/v1/records:find" body: "*"'
    new = 'post: "/v1/records:find" body: "id" response_body: "id"'

    assert [kind for kind, _ in changes(tmp_path, old, new)] == [
        BreakingKind.HTTP_ROUTE_CHANGED,
        BreakingKind.HTTP_ROUTE_CHANGED,
    ]
    assert "changed its body from '*' to 'id'" in changes(tmp_path / "again", old, new)[0][1]


def test_a_custom_verb_is_a_route_of_its_own(tmp_path: Path) -> None:
    old = 'custom: {kind: "PURGE" path: "/v1/records/{id}"}'
    new = 'delete: "/v1/records/{id}"'

    ((kind, text),) = changes(tmp_path, old, new)

    assert kind == BreakingKind.HTTP_ROUTE_REMOVED and "PURGE /v1/records/{id}" in text


def test_copies_of_a_well_known_file_from_different_protoc_releases_load_together() -> None:
    files = {fd.name: fd for fd in load_contracts(PROTOS)}
    other_release = descriptor_pb2.FileDescriptorProto()
    other_release.CopyFrom(files["google/protobuf/descriptor.proto"])
    other_release.ClearField("source_code_info")
    other_release.options.java_package = "com.example.elsewhere"

    contracts = Contracts.from_files([*files.values(), other_release])

    assert contracts.files["google/protobuf/descriptor.proto"] is not other_release
    assert NOCR_SERVICE in contracts.services


def test_an_agency_file_defined_twice_differently_is_still_an_error() -> None:
    files = {fd.name: fd for fd in load_contracts(PROTOS)}
    changed = descriptor_pb2.FileDescriptorProto()
    changed.CopyFrom(files[NOCR])
    changed.service[0].method[0].server_streaming = True

    with pytest.raises(ContractError, match="defined twice with different contents"):
        Contracts.from_files([*files.values(), changed])


def test_a_caller_s_catalogue_carries_the_http_imports_so_a_pool_can_be_built() -> None:
    # Reflection serves a service's file with every file it imports: a client (grpcurl, or
    # `tabadol call`) needs google/api/*.proto to build its descriptor pool.
    contracts = Contracts.from_files(load_contracts(PROTOS))
    catalogue = Catalogue(contracts.files, [NOCR_SERVICE])

    closure = catalogue.closure(NOCR)
    pool = descriptor_pool.DescriptorPool()
    for fd in closure:
        pool.Add(fd)

    assert {fd.name for fd in closure} >= IMPORTS
    assert all(catalogue.visible_file(name) for name in IMPORTS)
    assert pool.FindMethodByName(f"{NOCR_SERVICE}.InquirePerson").input_type.name == (
        "InquirePersonRequest"
    )


def test_describe_shows_the_service_and_not_the_http_imports() -> None:
    contracts = Contracts.from_files(load_contracts(PROTOS))
    closure = Catalogue(contracts.files, [NOCR_SERVICE]).closure(NOCR)
    methods = [
        discovery_pb2.Method(name="InquirePerson", allowed=True),
        discovery_pb2.Method(name="VerifyPeople", allowed=True),
    ]

    text = describe(descriptor_pb2.FileDescriptorSet(file=closure), NOCR_SERVICE, methods, "nocr")

    assert "rpc InquirePerson(tabadol.agencies.nocr.v1.InquirePersonRequest) returns" in text
    assert "google.api" not in text and "HttpRule" not in text
