"""Breaking-change detection between two versions of the contracts, and loading them from disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, timestamp_pb2

from tabadol.errors import ContractError
from tabadol.governance import (
    Breaking,
    BreakingKind,
    breaking_changes,
    load_contracts,
    own_files,
)

PROTOS = Path(__file__).resolve().parent.parent / "protos"
FILE = "tabadol/test/v1/registry.proto"

BASE = """\
syntax = "proto3";

// Contracts for the tests.
package tabadol.test.v1;

// Looks records up.
service Registry {
  // One record.
  rpc Inquire(InquireRequest) returns (Record);
  // Every change to a record.
  rpc Watch(InquireRequest) returns (stream Record);
}

// Unused by the service: nothing refers to it.
service Archive {
  // Stores a receipt.
  rpc Store(Receipt) returns (Receipt);
}

message InquireRequest {
  string national_id = 1;
}

message Record {
  string national_id = 1;
  int32 age = 2;
  repeated string aliases = 3;
  oneof contact {
    string email = 4;
    string phone = 5;
  }
  optional string note = 6;
  Status status = 7;
  Address address = 8;
  reserved 9, 10 to 12;
  reserved "legacy";
  map<string, int32> scores = 13;

  message Address {
    string city = 1;
    Kind kind = 2;

    enum Kind {
      KIND_UNSPECIFIED = 0;
      KIND_HOME = 1;
      KIND_WORK = 2;
    }
  }
}

message Receipt {
  string id = 1;
}

message Memo {
  string text = 1;
}

enum Status {
  reserved 5, 7 to 9;
  reserved "STATUS_OLD";
  STATUS_UNSPECIFIED = 0;
  STATUS_ACTIVE = 1;
  STATUS_CLOSED = 2;
}

enum Channel {
  CHANNEL_UNSPECIFIED = 0;
  CHANNEL_SMS = 1;
}
"""


def compile_tree(root: Path, files: dict[str, str]) -> list[descriptor_pb2.FileDescriptorProto]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return load_contracts(root)


def edit(text: str, *replacements: tuple[str, str]) -> str:
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} must occur exactly once"
        text = text.replace(old, new)
    return text


def changes(tmp_path: Path, old: str, new: str) -> list[Breaking]:
    before = compile_tree(tmp_path / "old", {FILE: old})
    after = compile_tree(tmp_path / "new", {FILE: new})
    return breaking_changes(before, after)


# (old text, new text) in BASE, then the one breaking change expected and words its message says.
CASES = [
    pytest.param(
        ("service Archive {", "service Archives {"),
        BreakingKind.SERVICE_REMOVED,
        "tabadol.test.v1.Archive",
        ["Archive", "removed or renamed", "UNIMPLEMENTED"],
        id="service renamed",
    ),
    pytest.param(
        ("rpc Inquire(", "rpc Lookup("),
        BreakingKind.METHOD_REMOVED,
        "tabadol.test.v1.Registry/Inquire",
        ["Registry/Inquire", "removed or renamed"],
        id="method renamed",
    ),
    pytest.param(
        ("returns (stream Record)", "returns (Record)"),
        BreakingKind.METHOD_STREAMING_CHANGED,
        "tabadol.test.v1.Registry/Watch",
        ["server streaming to unary"],
        id="server streaming made unary",
    ),
    pytest.param(
        ("rpc Watch(InquireRequest)", "rpc Watch(stream InquireRequest)"),
        BreakingKind.METHOD_STREAMING_CHANGED,
        "tabadol.test.v1.Registry/Watch",
        ["server streaming to bidi streaming"],
        id="client streaming added",
    ),
    pytest.param(
        ("rpc Inquire(InquireRequest)", "rpc Inquire(Receipt)"),
        BreakingKind.METHOD_INPUT_TYPE_CHANGED,
        "tabadol.test.v1.Registry/Inquire",
        ["request type", "tabadol.test.v1.InquireRequest to tabadol.test.v1.Receipt"],
        id="request type changed",
    ),
    pytest.param(
        (
            "rpc Inquire(InquireRequest) returns (Record)",
            "rpc Inquire(InquireRequest) returns (Receipt)",
        ),
        BreakingKind.METHOD_OUTPUT_TYPE_CHANGED,
        "tabadol.test.v1.Registry/Inquire",
        ["response type", "tabadol.test.v1.Record to tabadol.test.v1.Receipt"],
        id="response type changed",
    ),
    pytest.param(
        ("message Memo {", "message Note {"),
        BreakingKind.MESSAGE_REMOVED,
        "tabadol.test.v1.Memo",
        ["message tabadol.test.v1.Memo", "removed or renamed"],
        id="message renamed",
    ),
    pytest.param(
        ("  int32 age = 2;\n", ""),
        BreakingKind.FIELD_REMOVED,
        "tabadol.test.v1.Record.age",
        ["age (2)", "removed", 'reserved 2; reserved "age";'],
        id="field removed suggests reserved",
    ),
    pytest.param(
        ("int32 age = 2;", "int32 age = 14;"),
        BreakingKind.FIELD_RENUMBERED,
        "tabadol.test.v1.Record.age",
        ["age", "renumbered from 2 to 14"],
        id="field renumbered",
    ),
    pytest.param(
        ("int32 age = 2;", "int32 age_years = 2;"),
        BreakingKind.FIELD_RENAMED,
        "tabadol.test.v1.Record.age",
        ["renamed from age to age_years", "JSON", "grpc-gateway"],
        id="field renamed at the same number",
    ),
    pytest.param(
        ("int32 age = 2;", 'int32 age = 2 [json_name = "ageYears"];'),
        BreakingKind.FIELD_JSON_NAME_CHANGED,
        "tabadol.test.v1.Record.age",
        ["JSON name from age to ageYears"],
        id="json_name changed",
    ),
    pytest.param(
        ("int32 age = 2;", "int64 age = 2;"),
        BreakingKind.FIELD_TYPE_CHANGED,
        "tabadol.test.v1.Record.age",
        ["age (2)", "changed type from int32 to int64"],
        id="wire-compatible scalar type change is still reported",
    ),
    pytest.param(
        ("Address address = 8;", "Receipt address = 8;"),
        BreakingKind.FIELD_TYPE_CHANGED,
        "tabadol.test.v1.Record.address",
        ["from tabadol.test.v1.Record.Address to tabadol.test.v1.Receipt"],
        id="message type name changed",
    ),
    pytest.param(
        ("Status status = 7;", "Channel status = 7;"),
        BreakingKind.FIELD_TYPE_CHANGED,
        "tabadol.test.v1.Record.status",
        ["from tabadol.test.v1.Status to tabadol.test.v1.Channel"],
        id="enum type name changed",
    ),
    pytest.param(
        ("map<string, int32> scores", "map<string, int64> scores"),
        BreakingKind.FIELD_TYPE_CHANGED,
        "tabadol.test.v1.Record.scores",
        ["from map<string, int32> to map<string, int64>"],
        id="map value type changed",
    ),
    pytest.param(
        ("int32 age = 2;", "repeated int32 age = 2;"),
        BreakingKind.FIELD_CARDINALITY_CHANGED,
        "tabadol.test.v1.Record.age",
        ["age (2)", "cardinality from singular (no presence) to repeated"],
        id="singular made repeated",
    ),
    pytest.param(
        ("optional string note = 6;", "string note = 6;"),
        BreakingKind.FIELD_CARDINALITY_CHANGED,
        "tabadol.test.v1.Record.note",
        ["note (6)", "from optional (explicit presence) to singular (no presence)"],
        id="proto3 optional dropped",
    ),
    pytest.param(
        ("    string email = 4;\n", ""),
        BreakingKind.FIELD_REMOVED,
        "tabadol.test.v1.Record.email",
        ["email (4)", "reserved 4"],
        id="oneof member removed",
    ),
    pytest.param(
        ("  oneof contact {\n    string email = 4;\n", "  string email = 4;\n  oneof contact {\n"),
        BreakingKind.FIELD_ONEOF_CHANGED,
        "tabadol.test.v1.Record.email",
        ["email (4)", "moved out of oneof contact"],
        id="field moved out of a oneof",
    ),
    pytest.param(
        ("  reserved 9, 10 to 12;\n", "  string extra = 11;\n"),
        BreakingKind.RESERVED_FIELD_NUMBER_USED,
        "tabadol.test.v1.Record.extra",
        ["extra", "number 11", "reserved"],
        id="field added at a reserved number",
    ),
    pytest.param(
        ('  reserved "legacy";\n', "  string legacy = 20;\n"),
        BreakingKind.RESERVED_FIELD_NAME_USED,
        "tabadol.test.v1.Record.legacy",
        ["legacy", "reserved"],
        id="field added with a reserved name",
    ),
    pytest.param(
        ("enum Channel {", "enum Channels {"),
        BreakingKind.ENUM_REMOVED,
        "tabadol.test.v1.Channel",
        ["enum tabadol.test.v1.Channel", "removed or renamed"],
        id="enum renamed",
    ),
    pytest.param(
        ("  STATUS_CLOSED = 2;\n", ""),
        BreakingKind.ENUM_VALUE_REMOVED,
        "tabadol.test.v1.Status.STATUS_CLOSED",
        ["STATUS_CLOSED (2)", 'reserved 2; reserved "STATUS_CLOSED";'],
        id="enum value removed suggests reserved",
    ),
    pytest.param(
        ("STATUS_CLOSED = 2;", "STATUS_CLOSED = 3;"),
        BreakingKind.ENUM_VALUE_RENUMBERED,
        "tabadol.test.v1.Status.STATUS_CLOSED",
        ["STATUS_CLOSED", "renumbered from 2 to 3"],
        id="enum value renumbered",
    ),
    pytest.param(
        ("STATUS_CLOSED = 2;", "STATUS_ENDED = 2;"),
        BreakingKind.ENUM_VALUE_RENAMED,
        "tabadol.test.v1.Status.STATUS_CLOSED",
        ["renamed from STATUS_CLOSED to STATUS_ENDED", "JSON"],
        id="enum value renamed at the same number",
    ),
    pytest.param(
        (
            ("  reserved 5, 7 to 9;\n", ""),
            ("  STATUS_CLOSED = 2;\n", "  STATUS_CLOSED = 2;\n  STATUS_REOPENED = 9;\n"),
        ),
        BreakingKind.RESERVED_ENUM_NUMBER_USED,
        "tabadol.test.v1.Status.STATUS_REOPENED",
        ["STATUS_REOPENED", "number 9", "reserved"],
        id="enum value added at a reserved number (range end is inclusive)",
    ),
    pytest.param(
        (
            ('  reserved "STATUS_OLD";\n', ""),
            ("  STATUS_CLOSED = 2;\n", "  STATUS_CLOSED = 2;\n  STATUS_OLD = 3;\n"),
        ),
        BreakingKind.RESERVED_ENUM_NAME_USED,
        "tabadol.test.v1.Status.STATUS_OLD",
        ["STATUS_OLD", "reserved"],
        id="enum value added with a reserved name",
    ),
    pytest.param(
        ("    string city = 1;", "    bytes city = 1;"),
        BreakingKind.FIELD_TYPE_CHANGED,
        "tabadol.test.v1.Record.Address.city",
        ["city (1) of tabadol.test.v1.Record.Address", "from string to bytes"],
        id="nested message field type changed",
    ),
    pytest.param(
        ("      KIND_WORK = 2;\n", ""),
        BreakingKind.ENUM_VALUE_REMOVED,
        "tabadol.test.v1.Record.Address.Kind.KIND_WORK",
        ["KIND_WORK (2) of tabadol.test.v1.Record.Address.Kind"],
        id="nested enum value removed",
    ),
]


@pytest.mark.parametrize(("replacement", "kind", "location", "words"), CASES)
def test_each_breaking_change_is_reported_once_with_its_reason(
    tmp_path: Path,
    replacement: tuple[str, str] | tuple[tuple[str, str], ...],
    kind: BreakingKind,
    location: str,
    words: list[str],
) -> None:
    pairs = replacement if isinstance(replacement[0], tuple) else (replacement,)
    found = changes(tmp_path, BASE, edit(BASE, *pairs))

    assert [(b.kind, b.location) for b in found] == [(kind, location)], found
    for word in words:
        assert word in found[0].message
    assert str(found[0]) == f"{location}: {found[0].message} [{kind}]"


def test_removing_a_message_also_reports_the_method_that_used_it(tmp_path: Path) -> None:
    new = edit(
        BASE,
        ("message Receipt {\n  string id = 1;\n}\n", ""),
        ("rpc Store(Receipt) returns (Receipt)", "rpc Store(InquireRequest) returns (Record)"),
    )

    found = changes(tmp_path, BASE, new)

    assert [(b.kind, b.location) for b in found] == [
        (BreakingKind.METHOD_INPUT_TYPE_CHANGED, "tabadol.test.v1.Archive/Store"),
        (BreakingKind.METHOD_OUTPUT_TYPE_CHANGED, "tabadol.test.v1.Archive/Store"),
        (BreakingKind.MESSAGE_REMOVED, "tabadol.test.v1.Receipt"),
    ]


def test_moving_a_field_into_a_oneof_is_breaking(tmp_path: Path) -> None:
    outside = edit(
        BASE,
        ("  oneof contact {\n    string email = 4;\n", "  string email = 4;\n  oneof contact {\n"),
    )

    found = changes(tmp_path, outside, BASE)

    assert [(b.kind, b.location) for b in found] == [
        (BreakingKind.FIELD_ONEOF_CHANGED, "tabadol.test.v1.Record.email")
    ]
    assert "moved into oneof contact" in found[0].message


def test_renaming_a_oneof_moves_every_member(tmp_path: Path) -> None:
    found = changes(tmp_path, BASE, edit(BASE, ("  oneof contact {", "  oneof reach {")))

    assert [(b.kind, b.location) for b in found] == [
        (BreakingKind.FIELD_ONEOF_CHANGED, "tabadol.test.v1.Record.email"),
        (BreakingKind.FIELD_ONEOF_CHANGED, "tabadol.test.v1.Record.phone"),
    ]
    assert "moved from oneof contact to oneof reach" in found[0].message


def test_proto3_optional_added_is_a_cardinality_change_not_a_oneof(tmp_path: Path) -> None:
    found = changes(tmp_path, BASE, edit(BASE, ("int32 age = 2;", "optional int32 age = 2;")))

    assert [(b.kind, b.location) for b in found] == [
        (BreakingKind.FIELD_CARDINALITY_CHANGED, "tabadol.test.v1.Record.age")
    ]
    assert "to optional (explicit presence)" in found[0].message


def test_swapping_two_field_numbers_reports_both_renumberings(tmp_path: Path) -> None:
    new = edit(
        BASE, ("string email = 4;", "string email = 5;"), ("string phone = 5;", "string phone = 4;")
    )

    found = changes(tmp_path, BASE, new)

    assert [(b.kind, b.location) for b in found] == [
        (BreakingKind.FIELD_RENUMBERED, "tabadol.test.v1.Record.email"),
        (BreakingKind.FIELD_RENUMBERED, "tabadol.test.v1.Record.phone"),
    ]


def test_a_number_taken_over_by_another_existing_field_is_a_removal(tmp_path: Path) -> None:
    new = edit(BASE, ("  string national_id = 1;\n  int32 age = 2;", "  int32 age = 1;"))

    found = changes(tmp_path, BASE, new)

    assert [(b.kind, b.location) for b in found] == [
        (BreakingKind.FIELD_RENUMBERED, "tabadol.test.v1.Record.age"),
        (BreakingKind.FIELD_REMOVED, "tabadol.test.v1.Record.national_id"),
    ]
    assert "now used by age" in found[1].message


def test_removed_field_already_reserved_is_still_breaking(tmp_path: Path) -> None:
    new = edit(BASE, ("  int32 age = 2;\n", "  reserved 2;\n"))

    found = changes(tmp_path, BASE, new)

    assert [(b.kind, b.location) for b in found] == [
        (BreakingKind.FIELD_REMOVED, "tabadol.test.v1.Record.age")
    ]
    assert "number 2 is reserved now" in found[0].message


def test_removed_nested_message_is_reported_by_its_full_name(tmp_path: Path) -> None:
    nested = "  message Address {\n    string city = 1;\n    Kind kind = 2;\n"
    new = edit(
        BASE,
        (nested, "  message Place {\n    string city = 1;\n    Kind kind = 2;\n"),
        ("  Address address = 8;", "  Place address = 8;"),
    )

    found = changes(tmp_path, BASE, new)

    assert [(b.kind, b.location) for b in found] == [
        (BreakingKind.MESSAGE_REMOVED, "tabadol.test.v1.Record.Address"),
        (BreakingKind.FIELD_TYPE_CHANGED, "tabadol.test.v1.Record.address"),
    ]


def test_removed_message_is_reported_once_not_with_its_fields_and_nested_types(
    tmp_path: Path,
) -> None:
    old = edit(
        BASE,
        ("message Receipt {\n", "message Receipt {\n  message Line {\n    int32 n = 1;\n  }\n"),
    )
    new = edit(
        BASE,
        ("message Receipt {\n  string id = 1;\n}\n", ""),
        ("rpc Store(Receipt) returns (Receipt)", "rpc Store(Record) returns (Record)"),
    )

    found = [b for b in changes(tmp_path, old, new) if b.kind == BreakingKind.MESSAGE_REMOVED]

    assert [b.location for b in found] == ["tabadol.test.v1.Receipt"]


def test_removed_package_is_not_excused_by_a_new_major_version(tmp_path: Path) -> None:
    v2 = edit(BASE, ("package tabadol.test.v1;", "package tabadol.test.v2;"))
    before = compile_tree(tmp_path / "old", {FILE: BASE})
    after = compile_tree(tmp_path / "new", {"tabadol/test/v2/registry.proto": v2})

    found = breaking_changes(before, after)

    assert [(b.kind, b.location) for b in found] == [
        (BreakingKind.PACKAGE_REMOVED, "tabadol.test.v1")
    ]
    assert "tabadol.test.v2 beside it does not replace it" in found[0].message


def test_renamed_package_is_reported_once_not_element_by_element(tmp_path: Path) -> None:
    renamed = edit(BASE, ("package tabadol.test.v1;", "package tabadol.exam.v1;"))
    before = compile_tree(tmp_path / "old", {FILE: BASE})
    after = compile_tree(tmp_path / "new", {"tabadol/exam/v1/registry.proto": renamed})

    found = breaking_changes(before, after)

    assert [(b.kind, b.location) for b in found] == [
        (BreakingKind.PACKAGE_REMOVED, "tabadol.test.v1")
    ]
    assert "removed or renamed" in found[0].message
    assert "beside it" not in found[0].message


COMPATIBLE = [
    pytest.param(
        ("  map<string, int32>", "  string city = 14;\n  map<string, int32>"), id="new field"
    ),
    pytest.param(
        (
            "  // Every change",
            "  // Many.\n  rpc InquireMany(stream InquireRequest) returns (stream Record);\n  // Every change",
        ),
        id="new method",
    ),
    pytest.param(
        (
            "message InquireRequest {",
            "// New.\nservice Audit {\n  rpc Log(Receipt) returns (Receipt);\n}\n\nmessage InquireRequest {",
        ),
        id="new service",
    ),
    pytest.param(
        ("  STATUS_CLOSED = 2;\n", "  STATUS_CLOSED = 2;\n  STATUS_SUSPENDED = 3;\n"),
        id="new enum value",
    ),
    pytest.param(
        ("message Receipt {", "message Journal {\n  string who = 1;\n}\n\nmessage Receipt {"),
        id="new message",
    ),
    pytest.param(
        (
            "    string city = 1;",
            "    string city = 1;\n    message Geo {\n      double lat = 1;\n    }",
        ),
        id="new nested message",
    ),
    pytest.param(
        ("enum Channel {", "enum Tier {\n  TIER_UNSPECIFIED = 0;\n}\n\nenum Channel {"),
        id="new enum",
    ),
    pytest.param(
        ("    string phone = 5;", "    string phone = 5;\n    string fax = 15;"),
        id="new oneof member",
    ),
    pytest.param(
        ("// Looks records up.\n", "// Finds records, by national id, in the registry.\n"),
        id="comment changed",
    ),
    pytest.param(
        ('  reserved "legacy";', '  reserved "legacy";\n  reserved 30;'), id="new reserved range"
    ),
    pytest.param(
        ("message Receipt {", "message Receipt {\n  // Issued when.\n  int64 issued_at = 2;"),
        id="new field, out of order",
    ),
]


@pytest.mark.parametrize("replacement", COMPATIBLE)
def test_compatible_additions_are_not_breaking(
    tmp_path: Path, replacement: tuple[str, str]
) -> None:
    assert changes(tmp_path, BASE, edit(BASE, replacement)) == []


def test_identical_contracts_have_no_breaking_changes(tmp_path: Path) -> None:
    assert changes(tmp_path, BASE, BASE) == []


def test_a_v2_package_beside_v1_is_compatible(tmp_path: Path) -> None:
    v2 = edit(
        BASE, ("package tabadol.test.v1;", "package tabadol.test.v2;"), ("  int32 age = 2;\n", "")
    )
    before = compile_tree(tmp_path / "old", {FILE: BASE})
    after = compile_tree(tmp_path / "new", {FILE: BASE, "tabadol/test/v2/registry.proto": v2})

    assert breaking_changes(before, after) == []


def test_moving_a_message_to_another_file_of_the_same_package_is_compatible(
    tmp_path: Path,
) -> None:
    receipt = "message Receipt {\n  string id = 1;\n}\n"
    moved = edit(
        BASE,
        (receipt, ""),
        (
            "package tabadol.test.v1;\n",
            'package tabadol.test.v1;\n\nimport "tabadol/test/v1/receipt.proto";\n',
        ),
    )
    before = compile_tree(tmp_path / "old", {FILE: BASE})
    after = compile_tree(
        tmp_path / "new",
        {
            FILE: moved,
            "tabadol/test/v1/receipt.proto": f'syntax = "proto3";\n\npackage tabadol.test.v1;\n\n{receipt}',
        },
    )

    assert breaking_changes(before, after) == []


def test_no_longer_importing_a_protoc_bundled_file_is_not_a_removal() -> None:
    ours = descriptor_pb2.FileDescriptorProto(name="a/v1/a.proto", package="a.v1", syntax="proto3")
    ours.message_type.add(name="A")
    bundled = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(bundled)

    assert breaking_changes([ours, bundled], [ours]) == []


def test_descriptors_built_in_code_need_no_protoc() -> None:
    def contract(response: str) -> descriptor_pb2.FileDescriptorProto:
        fd = descriptor_pb2.FileDescriptorProto(name="a/v1/a.proto", package="a.v1")
        fd.message_type.add(name="A")
        fd.message_type.add(name="B")
        svc = fd.service.add(name="S")
        svc.method.add(name="M", input_type=".a.v1.A", output_type=response)
        return fd

    found = breaking_changes([contract(".a.v1.A")], [contract(".a.v1.B")])

    assert found == [
        Breaking(
            BreakingKind.METHOD_OUTPUT_TYPE_CHANGED,
            "a.v1.S/M",
            found[0].message,
        )
    ]
    assert "from a.v1.A to a.v1.B" in found[0].message


def test_findings_are_sorted_by_location(tmp_path: Path) -> None:
    new = edit(
        BASE,
        ("enum Channel {", "enum Channels {"),
        ("  int32 age = 2;\n", ""),
        ("rpc Inquire(", "rpc Lookup("),
    )

    found = changes(tmp_path, BASE, new)

    assert [b.location for b in found] == [
        "tabadol.test.v1.Channel",
        "tabadol.test.v1.Record.age",
        "tabadol.test.v1.Registry/Inquire",
    ]


def test_the_project_contracts_are_compatible_with_themselves() -> None:
    contracts = load_contracts(PROTOS)

    assert breaking_changes(contracts, contracts) == []


# Loading


def test_a_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    broken = (
        'syntax = "proto3";\n\npackage tabadol.test.v1;\nmessage Broken {\n  string id = 1\n}\n'
    )
    (tmp_path / "tabadol/test/v1").mkdir(parents=True)
    (tmp_path / "tabadol/test/v1/broken.proto").write_text(broken)

    with pytest.raises(ContractError) as raised:
        load_contracts(tmp_path)

    assert str(tmp_path) in str(raised.value)
    assert "tabadol/test/v1/broken.proto:6:" in str(raised.value)
    assert 'Expected ";"' in str(raised.value)


def test_an_unknown_import_names_the_file(tmp_path: Path) -> None:
    text = 'syntax = "proto3";\n\npackage tabadol.test.v1;\n\nimport "tabadol/missing/v1/gone.proto";\n'
    with pytest.raises(ContractError, match=r"tabadol/missing/v1/gone\.proto"):
        compile_tree(tmp_path, {FILE: text})


def test_a_directory_without_protos_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match=r"no \.proto files"):
        load_contracts(tmp_path)


def test_a_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="no such file"):
        load_contracts(tmp_path / "absent")


def test_a_file_that_is_not_a_descriptor_set_is_an_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\xff\xff not protobuf")

    with pytest.raises(ContractError, match="not a FileDescriptorSet"):
        load_contracts(junk)


def test_a_directory_and_its_descriptor_set_load_the_same_files(tmp_path: Path) -> None:
    importing = edit(
        BASE,
        (
            "package tabadol.test.v1;\n",
            'package tabadol.test.v1;\n\nimport "google/protobuf/timestamp.proto";\n',
        ),
    )
    importing = edit(
        importing,
        ("  string id = 1;\n}", "  string id = 1;\n  google.protobuf.Timestamp at = 2;\n}"),
    )
    files = compile_tree(tmp_path / "src", {FILE: importing})
    fds = tmp_path / "contracts.pb"
    fds.write_bytes(descriptor_pb2.FileDescriptorSet(file=files).SerializeToString())

    assert sorted(fd.name for fd in files) == ["google/protobuf/timestamp.proto", FILE]
    assert load_contracts(fds) == files
    assert own_files(tmp_path / "src") == {FILE}
    assert own_files(fds) == {FILE}


def test_compiled_contracts_carry_comments() -> None:
    files = {fd.name: fd for fd in load_contracts(PROTOS)}
    nocr = files["tabadol/agencies/nocr/v1/person_registry.proto"]

    comments = [
        loc.leading_comments for loc in nocr.source_code_info.location if list(loc.path) == [6, 0]
    ]
    assert comments and "person registry" in comments[0]
