"""Style rules for contracts: each rule fires on a bad example, on the right line, and not on a good one."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tabadol.errors import ContractError
from tabadol.governance import RULES, Finding, lint, load_contracts, own_files

PROTOS = Path(__file__).resolve().parent.parent / "protos"
FILE = "tabadol/test/v1/records.proto"

GOOD = """\
syntax = "proto3";

// Contracts for the lint tests.
package tabadol.test.v1;

// A registry of records.
service RecordRegistry {
  // Returns one record.
  rpc GetRecord(GetRecordRequest) returns (Record);
}

// Which record to return.
message GetRecordRequest {
  // The record's id.
  string record_id = 1;
}

// A record.
message Record {
  // The record's id.
  string record_id = 1;

  // Its state.
  RecordState state = 2;

  // Labels by name.
  map<string, string> labels = 3;

  // A part of a record.
  message Part {
    // The part's title.
    string title = 1;

    // What the part holds.
    enum Kind {
      // Not set.
      KIND_UNSPECIFIED = 0;
      // A header.
      KIND_HEADER = 1;
    }
  }

  // Its parts.
  repeated Part parts = 4;

  // How to reach the owner.
  oneof contact {
    // By email.
    string email_address = 5;
  }
}

// The state of a record.
enum RecordState {
  // Not set.
  RECORD_STATE_UNSPECIFIED = 0;
  // Open for changes.
  RECORD_STATE_OPEN = 1;
}
"""


def lint_tree(root: Path, files: dict[str, str]) -> list[Finding]:
    _write(root, files)
    return lint(load_contracts(root), targets=own_files(root))


def edit(text: str, old: str, new: str) -> str:
    """`text` with every `old` replaced (so that a renamed type is renamed where it is used too)."""
    assert old in text, f"{old!r} is not in the text"
    return text.replace(old, new)


def line_of(text: str, marker: str) -> int:
    """The 1-based line on which `marker` occurs once in `text`."""
    assert text.count(marker) == 1, f"{marker!r} must occur exactly once"
    return text[: text.index(marker)].count("\n") + 1


def test_the_good_example_is_clean(tmp_path: Path) -> None:
    assert lint_tree(tmp_path, {FILE: GOOD}) == []


# (text in GOOD, replacement, the rule that fires, the line it fires on, words of its message)
CASES = [
    pytest.param(
        "package tabadol.test.v1;",
        "package tabadol.test.current;",
        "PACKAGE_VERSION_SUFFIX",
        "package tabadol.test.current;",
        ["tabadol.test.current", ".v1"],
        id="package without a version",
    ),
    pytest.param(
        "service RecordRegistry {",
        "service Record_Registry {",
        "SERVICE_PASCAL_CASE",
        "service Record_Registry {",
        ["tabadol.test.v1.Record_Registry", "PascalCase", "RecordRegistry"],
        id="service with an underscore",
    ),
    pytest.param(
        "rpc GetRecord(",
        "rpc get_record(",
        "RPC_PASCAL_CASE",
        "rpc get_record(",
        ["RecordRegistry/get_record", "PascalCase", "GetRecord"],
        id="method in snake case",
    ),
    pytest.param(
        "GetRecordRequest",
        "getRecordRequest",
        "MESSAGE_PASCAL_CASE",
        "message getRecordRequest {",
        ["tabadol.test.v1.getRecordRequest", "GetRecordRequest"],
        id="message in camel case",
    ),
    pytest.param(
        "string record_id = 1;\n}",
        "string recordId = 1;\n}",
        "FIELD_LOWER_SNAKE_CASE",
        "string recordId = 1;",
        ["tabadol.test.v1.GetRecordRequest.recordId", "lower_snake_case", "record_id"],
        id="field in camel case",
    ),
    pytest.param(
        "string title = 1;",
        "string Title = 1;",
        "FIELD_LOWER_SNAKE_CASE",
        "string Title = 1;",
        ["tabadol.test.v1.Record.Part.Title", "title"],
        id="nested message field capitalised",
    ),
    pytest.param(
        "enum Kind {",
        "enum KIND {",
        "ENUM_PASCAL_CASE",
        "enum KIND {",
        ["tabadol.test.v1.Record.Part.KIND", "PascalCase", "Kind"],
        id="nested enum in capitals",
    ),
    pytest.param(
        "RECORD_STATE_OPEN = 1;",
        "RECORD_STATE_Open = 1;",
        "ENUM_VALUE_UPPER_SNAKE_CASE",
        "RECORD_STATE_Open = 1;",
        ["RecordState.RECORD_STATE_Open", "UPPER_SNAKE_CASE", "RECORD_STATE_OPEN"],
        id="enum value in mixed case",
    ),
    pytest.param(
        "RECORD_STATE_OPEN = 1;",
        "STATE_OPEN = 1;",
        "ENUM_VALUE_PREFIX",
        "STATE_OPEN = 1;",
        ["RecordState.STATE_OPEN", "RECORD_STATE_"],
        id="enum value without the enum's name",
    ),
    pytest.param(
        "KIND_HEADER = 1;",
        "PART_HEADER = 1;",
        "ENUM_VALUE_PREFIX",
        "PART_HEADER = 1;",
        ["Record.Part.Kind.PART_HEADER", "KIND_"],
        id="nested enum value prefixed with its parent's name",
    ),
    pytest.param(
        "RECORD_STATE_UNSPECIFIED = 0;",
        "RECORD_STATE_NONE = 0;",
        "ENUM_ZERO_VALUE_SUFFIX",
        "RECORD_STATE_NONE = 0;",
        ["RECORD_STATE_UNSPECIFIED", "RECORD_STATE_NONE"],
        id="zero value not UNSPECIFIED",
    ),
    pytest.param(
        "// A registry of records.\n",
        "",
        "COMMENT_SERVICE",
        "service RecordRegistry {",
        ["service tabadol.test.v1.RecordRegistry", "no leading comment"],
        id="service undocumented",
    ),
    pytest.param(
        "  // Returns one record.\n",
        "",
        "COMMENT_RPC",
        "rpc GetRecord(",
        ["method tabadol.test.v1.RecordRegistry/GetRecord"],
        id="method undocumented",
    ),
    pytest.param(
        "// Which record to return.\n",
        "",
        "COMMENT_MESSAGE",
        "message GetRecordRequest {",
        ["message tabadol.test.v1.GetRecordRequest"],
        id="message undocumented",
    ),
    pytest.param(
        "  // A part of a record.\n",
        "",
        "COMMENT_MESSAGE",
        "message Part {",
        ["message tabadol.test.v1.Record.Part"],
        id="nested message undocumented",
    ),
    pytest.param(
        "    // The part's title.\n",
        "",
        "COMMENT_FIELD",
        "string title = 1;",
        ["field tabadol.test.v1.Record.Part.title"],
        id="nested field undocumented",
    ),
    pytest.param(
        "    // By email.\n",
        "",
        "COMMENT_FIELD",
        "string email_address = 5;",
        ["field tabadol.test.v1.Record.email_address"],
        id="oneof member undocumented",
    ),
    pytest.param(
        "  // Its state.\n  RecordState state = 2;",
        "  RecordState state = 2; // Its state.",
        "COMMENT_FIELD",
        "RecordState state = 2;",
        ["field tabadol.test.v1.Record.state"],
        id="a trailing comment is not documentation",
    ),
    pytest.param(
        "  // Its state.\n  RecordState state = 2;",
        "  // Its state.\n\n  RecordState state = 2;",
        "COMMENT_FIELD",
        "RecordState state = 2;",
        ["field tabadol.test.v1.Record.state"],
        id="a comment detached by a blank line is not documentation",
    ),
    pytest.param(
        "  // Its state.\n  RecordState state = 2;",
        "  //\n  RecordState state = 2;",
        "COMMENT_FIELD",
        "RecordState state = 2;",
        ["field tabadol.test.v1.Record.state"],
        id="an empty comment is not documentation",
    ),
    pytest.param(
        "    // What the part holds.\n",
        "",
        "COMMENT_ENUM",
        "enum Kind {",
        ["enum tabadol.test.v1.Record.Part.Kind"],
        id="nested enum undocumented",
    ),
    pytest.param(
        "// The state of a record.\n",
        "",
        "COMMENT_ENUM",
        "enum RecordState {",
        ["enum tabadol.test.v1.RecordState"],
        id="enum undocumented",
    ),
    pytest.param(
        "  // Open for changes.\n",
        "",
        "COMMENT_ENUM_VALUE",
        "RECORD_STATE_OPEN = 1;",
        ["enum value tabadol.test.v1.RecordState.RECORD_STATE_OPEN"],
        id="enum value undocumented",
    ),
]


@pytest.mark.parametrize(("old", "new", "rule", "marker", "words"), CASES)
def test_each_rule_fires_on_the_line_of_the_offending_element(
    tmp_path: Path, old: str, new: str, rule: str, marker: str, words: list[str]
) -> None:
    text = edit(GOOD, old, new)
    # The unversioned package moves to its own directory, so only the version rule fires.
    name = "tabadol/test/current/records.proto" if rule == "PACKAGE_VERSION_SUFFIX" else FILE

    found = lint_tree(tmp_path, {name: text})

    assert [(f.file, f.line, f.rule) for f in found] == [(name, line_of(text, marker), rule)]
    for word in words:
        assert word in found[0].message
    assert str(found[0]) == f"{name}:{found[0].line}: {found[0].message} ({rule})"


def test_every_rule_has_a_failing_example() -> None:
    tested = {param.values[2] for param in CASES} | {"PACKAGE_DIRECTORY_MATCH"}
    assert tested == set(RULES)


def test_a_file_outside_its_package_directory(tmp_path: Path) -> None:
    found = lint_tree(tmp_path, {"tabadol/other/v1/records.proto": GOOD})

    assert found == [
        Finding(
            "tabadol/other/v1/records.proto",
            4,
            "PACKAGE_DIRECTORY_MATCH",
            "package tabadol.test.v1 should be in directory tabadol/test/v1/, "
            "not tabadol/other/v1/",
        )
    ]


def test_a_file_without_a_package(tmp_path: Path) -> None:
    text = edit(GOOD, "package tabadol.test.v1;\n", "")

    found = lint_tree(tmp_path, {"records.proto": text})

    assert [(f.rule, f.line) for f in found] == [("PACKAGE_VERSION_SUFFIX", 0)]
    assert "declares no package" in found[0].message


@pytest.mark.parametrize("version", ["v1", "v2", "v10", "v1beta1", "v2alpha"])
def test_major_versions_and_stability_suffixes_are_accepted(tmp_path: Path, version: str) -> None:
    text = edit(GOOD, "package tabadol.test.v1;", f"package tabadol.test.{version};")

    assert lint_tree(tmp_path, {f"tabadol/test/{version}/records.proto": text}) == []


@pytest.mark.parametrize("enum", ["HTTPMethod", "Ipv4Kind", "LifeStatus"])
def test_enum_value_prefix_splits_words(tmp_path: Path, enum: str) -> None:
    prefix = {"HTTPMethod": "HTTP_METHOD", "Ipv4Kind": "IPV4_KIND", "LifeStatus": "LIFE_STATUS"}[
        enum
    ]
    text = (
        edit(GOOD, "enum RecordState {", f"enum {enum} {{")
        .replace("RECORD_STATE_", f"{prefix}_")
        .replace("RecordState state", f"{enum} state")
    )

    assert lint_tree(tmp_path, {FILE: text}) == []


def test_map_entries_written_by_protoc_are_not_linted(tmp_path: Path) -> None:
    files = load_contracts(_write(tmp_path, {FILE: GOOD}))
    record = next(m for fd in files for m in fd.message_type if m.name == "Record")

    assert [m.name for m in record.nested_type] == ["LabelsEntry", "Part"]
    assert lint(files) == []


def test_imports_are_linted_only_when_targeted(tmp_path: Path) -> None:
    sloppy = 'syntax = "proto3";\n\npackage tabadol.shared.v1;\n\nmessage shared_thing {\n  int32 n = 1;\n}\n'
    importing = edit(
        GOOD,
        "package tabadol.test.v1;\n",
        'package tabadol.test.v1;\n\nimport "tabadol/shared/v1/shared.proto";\n',
    )
    files = load_contracts(
        _write(tmp_path, {FILE: importing, "tabadol/shared/v1/shared.proto": sloppy})
    )

    assert lint(files, targets={FILE}) == []
    assert {f.file for f in lint(files)} == {"tabadol/shared/v1/shared.proto"}


def test_only_selects_rules(tmp_path: Path) -> None:
    text = edit(
        GOOD, "// A registry of records.\nservice RecordRegistry {", "service record_registry {"
    )
    files = load_contracts(_write(tmp_path, {FILE: text}))

    assert [f.rule for f in lint(files)] == ["COMMENT_SERVICE", "SERVICE_PASCAL_CASE"]
    assert [f.rule for f in lint(files, only=["SERVICE_PASCAL_CASE"])] == ["SERVICE_PASCAL_CASE"]


def test_an_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="COMMENT_ONEOF"):
        lint([], only=["COMMENT_ONEOF"])


def test_an_unknown_target_is_refused() -> None:
    with pytest.raises(ContractError, match=r"tabadol/absent\.proto"):
        lint([], targets={"tabadol/absent.proto"})


def test_without_source_info_lines_are_zero_and_the_message_says_why() -> None:
    fd = descriptor_pb2.FileDescriptorProto(name="a/v1/a.proto", package="a.v1", syntax="proto3")
    fd.message_type.add(name="A")

    assert lint([fd]) == [
        Finding(
            "a/v1/a.proto",
            0,
            "COMMENT_MESSAGE",
            "message a.v1.A has no leading comment; document it for its consumers "
            "(no source info: compile with --include_source_info)",
        )
    ]


def test_findings_are_sorted_by_file_then_line(tmp_path: Path) -> None:
    text = edit(GOOD, "  // Open for changes.\n", "")
    text = edit(text, "// A registry of records.\n", "")
    found = lint_tree(
        tmp_path,
        {
            FILE: text,
            "tabadol/test/v1/a.proto": 'syntax = "proto3";\n\npackage tabadol.test.v1;\n\nmessage A {}\n',
        },
    )

    assert [(f.file, f.line, f.rule) for f in found] == [
        ("tabadol/test/v1/a.proto", 5, "COMMENT_MESSAGE"),
        (FILE, 6, "COMMENT_SERVICE"),
        (FILE, line_of(text, "RECORD_STATE_OPEN"), "COMMENT_ENUM_VALUE"),
    ]


def test_the_project_contracts_lint_clean() -> None:
    assert lint(load_contracts(PROTOS), targets=own_files(PROTOS)) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root
