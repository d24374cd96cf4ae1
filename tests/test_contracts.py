"""Specification of the contracts the broker knows: services and methods from FileDescriptorSets."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tabadol.contracts import Contracts, MethodContract, RpcKind
from tabadol.errors import ContractError
from tests.support.echo import (
    BIDI,
    CLIENT_STREAM,
    SERVER_STREAM,
    SERVICE,
    UNARY,
    echo_file_descriptor,
    write_echo_contracts,
)


def other_file(name: str = "tabadol/test/v1/other.proto") -> descriptor_pb2.FileDescriptorProto:
    """A second contract file with one unary service, tabadol.test.v1.Other."""
    fd = descriptor_pb2.FileDescriptorProto(name=name, package="tabadol.test.v1", syntax="proto3")
    fd.message_type.add(name="Empty")
    fd.service.add(name="Other").method.add(
        name="Ping", input_type=".tabadol.test.v1.Empty", output_type=".tabadol.test.v1.Empty"
    )
    return fd


def write_set(path: Path, *files: descriptor_pb2.FileDescriptorProto) -> Path:
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=list(files)).SerializeToString())
    return path


@pytest.mark.parametrize(
    ("client_streaming", "server_streaming", "kind"),
    [
        (False, False, RpcKind.UNARY),
        (False, True, RpcKind.SERVER_STREAMING),
        (True, False, RpcKind.CLIENT_STREAMING),
        (True, True, RpcKind.BIDI_STREAMING),
    ],
)
def test_rpc_kind_follows_the_streaming_flags(
    client_streaming: bool, server_streaming: bool, kind: RpcKind
) -> None:
    assert RpcKind.of(client_streaming, server_streaming) is kind


def test_each_echo_method_has_the_kind_its_flags_declare() -> None:
    contracts = Contracts.from_files([echo_file_descriptor()])

    service = contracts.services[SERVICE]
    assert service.file == "tabadol/test/v1/echo.proto"
    assert {name: m.kind for name, m in service.methods.items()} == {
        "Unary": RpcKind.UNARY,
        "ServerStream": RpcKind.SERVER_STREAMING,
        "ClientStream": RpcKind.CLIENT_STREAMING,
        "Bidi": RpcKind.BIDI_STREAMING,
    }


def test_method_path_is_the_grpc_http2_path() -> None:
    method = MethodContract("tabadol.test.v1.Echo", "Unary", RpcKind.UNARY)

    assert method.path == "/tabadol.test.v1.Echo/Unary"


@pytest.mark.parametrize(
    ("path", "name", "kind"),
    [
        (UNARY, "Unary", RpcKind.UNARY),
        (SERVER_STREAM, "ServerStream", RpcKind.SERVER_STREAMING),
        (CLIENT_STREAM, "ClientStream", RpcKind.CLIENT_STREAMING),
        (BIDI, "Bidi", RpcKind.BIDI_STREAMING),
    ],
)
def test_method_is_found_by_its_grpc_path(path: str, name: str, kind: RpcKind) -> None:
    contracts = Contracts.from_files([echo_file_descriptor()])

    method = contracts.method(path)

    assert method == MethodContract(SERVICE, name, kind)
    assert method is not None and method.path == path


@pytest.mark.parametrize(
    "path",
    [
        f"/{SERVICE}/Missing",
        f"/{SERVICE}/unary",
        "/tabadol.test.v1.Missing/Unary",
        f"/{SERVICE}",
        f"/{SERVICE}/Unary/extra",
        "/",
        "",
    ],
)
def test_unknown_method_path_finds_nothing(path: str) -> None:
    assert Contracts.from_files([echo_file_descriptor()]).method(path) is None


def test_service_without_a_package_is_named_by_itself() -> None:
    fd = descriptor_pb2.FileDescriptorProto(name="bare.proto", syntax="proto3")
    fd.message_type.add(name="M")
    fd.service.add(name="Bare").method.add(name="Do", input_type=".M", output_type=".M")

    contracts = Contracts.from_files([fd])

    assert contracts.method("/Bare/Do") == MethodContract("Bare", "Do", RpcKind.UNARY)


def test_services_of_several_files_are_all_known() -> None:
    contracts = Contracts.from_files([echo_file_descriptor(), other_file()])

    assert set(contracts.services) == {SERVICE, "tabadol.test.v1.Other"}
    assert set(contracts.files) == {"tabadol/test/v1/echo.proto", "tabadol/test/v1/other.proto"}


def test_same_file_twice_with_the_same_content_is_loaded_once() -> None:
    contracts = Contracts.from_files([echo_file_descriptor(), echo_file_descriptor()])

    assert list(contracts.files) == ["tabadol/test/v1/echo.proto"]
    assert list(contracts.services) == [SERVICE]


def test_same_file_twice_with_different_content_is_an_error() -> None:
    changed = echo_file_descriptor()
    changed.service[0].method[0].server_streaming = True

    with pytest.raises(ContractError) as excinfo:
        Contracts.from_files([echo_file_descriptor(), changed])

    assert str(excinfo.value) == (
        "tabadol/test/v1/echo.proto is defined twice with different contents"
    )


def test_same_service_in_two_different_files_is_an_error() -> None:
    # Otherwise the later file silently replaces the earlier file's methods and kinds.
    impostor = echo_file_descriptor()
    impostor.name = "tabadol/test/v1/echo_copy.proto"
    del impostor.service[0].method[1:]

    with pytest.raises(ContractError, match=SERVICE):
        Contracts.from_files([echo_file_descriptor(), impostor])


# --- Contracts.load: from files on disk -----------------------------------------------------


def test_load_reads_every_descriptor_set_given(tmp_path: Path) -> None:
    echo = write_echo_contracts(tmp_path / "echo.pb")
    other = write_set(tmp_path / "other.pb", other_file())

    contracts = Contracts.load([echo, other])

    assert set(contracts.services) == {SERVICE, "tabadol.test.v1.Other"}
    assert contracts.method(BIDI) == MethodContract(SERVICE, "Bidi", RpcKind.BIDI_STREAMING)


def test_load_of_nothing_knows_no_services() -> None:
    assert dict(Contracts.load([]).services) == {}


def test_missing_contracts_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.pb"

    with pytest.raises(ContractError) as excinfo:
        Contracts.load([path])

    assert str(excinfo.value) == f"{path}: cannot read contracts: No such file or directory"


def test_unreadable_contracts_file_is_named(tmp_path: Path) -> None:
    # A directory cannot be read as a file even by root, unlike a file with mode 000.
    path = tmp_path / "contracts.pb"
    path.mkdir()

    with pytest.raises(ContractError) as excinfo:
        Contracts.load([write_echo_contracts(tmp_path / "echo.pb"), path])

    assert str(excinfo.value) == f"{path}: cannot read contracts: Is a directory"


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xfe\x00 not protobuf", b"syntax = 'proto3';\nservice Echo {}\n", bytes(range(256))],
)
def test_garbage_bytes_are_not_a_descriptor_set(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "garbage.pb"
    path.write_bytes(garbage)

    with pytest.raises(ContractError) as excinfo:
        Contracts.load([path])

    assert str(excinfo.value).startswith(f"{path}: not a FileDescriptorSet: ")


def test_two_sets_disagreeing_about_one_file_are_an_error(tmp_path: Path) -> None:
    changed = echo_file_descriptor()
    changed.service[0].method[0].client_streaming = True
    first = write_echo_contracts(tmp_path / "echo.pb")
    second = write_set(tmp_path / "echo-changed.pb", changed)

    with pytest.raises(
        ContractError, match=r"echo\.proto is defined twice with different contents"
    ):
        Contracts.load([first, second])


def test_two_sets_sharing_an_identical_import_load_together(tmp_path: Path) -> None:
    first = write_set(tmp_path / "a.pb", echo_file_descriptor())
    second = write_set(tmp_path / "b.pb", echo_file_descriptor(), other_file())

    contracts = Contracts.load([first, second])

    assert set(contracts.services) == {SERVICE, "tabadol.test.v1.Other"}
