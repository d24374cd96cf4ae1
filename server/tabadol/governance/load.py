"""Contracts from disk: a FileDescriptorSet, or a directory of .proto files compiled in-process."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from importlib import resources, util
from pathlib import Path
from types import ModuleType

from google.protobuf import descriptor_pb2

from tabadol.contracts import Contracts, well_known
from tabadol.errors import ContractError

log = logging.getLogger(__name__)

# protoc reports from C++ straight to file descriptor 2; only one compilation may borrow it.
_STDERR_LOCK = threading.Lock()


def load_contracts(path: Path) -> list[descriptor_pb2.FileDescriptorProto]:
    """Every file of a FileDescriptorSet, or of a .proto directory compiled with its imports."""
    if path.is_dir():
        return _compile(path, sorted(proto_files(path)))
    if path.exists():
        return list(Contracts.load([path]).files.values())
    raise ContractError(f"{path}: no such file or directory")


def own_files(path: Path) -> set[str]:
    """Names of the files that belong to `path`, as opposed to the imports compiled with them.

    For a directory, its .proto files; for a FileDescriptorSet, every file. Either way without
    the well-known files (google/protobuf/..., google/api/...), which no agency owns, even
    when a directory carries a copy of them.
    """
    names = proto_files(path) if path.is_dir() else {fd.name for fd in load_contracts(path)}
    return {name for name in names if not well_known(name)}


def googleapis_root() -> Path:
    """The directory holding google/api/*.proto (googleapis-common-protos), for ``-I``."""
    spec = util.find_spec("google.api.annotations_pb2")
    if spec is None or spec.origin is None:
        raise ContractError(
            "compiling contracts with HTTP rules needs google/api/annotations.proto: "
            "pip install googleapis-common-protos"
        )
    return Path(spec.origin).parents[2]


def proto_files(root: Path) -> set[str]:
    """The .proto files under `root`, named as protoc names them with ``-I<root>``."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*.proto") if p.is_file()}


def _compile(root: Path, names: list[str]) -> list[descriptor_pb2.FileDescriptorProto]:
    if not names:
        raise ContractError(f"{root}: no .proto files to compile")
    protoc = _protoc()
    with tempfile.TemporaryDirectory(prefix="tabadol-contracts-") as tmp:
        out = Path(tmp) / "contracts.pb"
        code, report = _run_protoc(
            protoc,
            [
                "protoc",
                f"-I{root}",
                # google/protobuf/*.proto, which every protoc ships with
                f"-I{resources.files('grpc_tools') / '_proto'}",
                # google/api/*.proto: the HTTP rules (google.api.http) of a contract
                f"-I{googleapis_root()}",
                "--include_imports",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *names,
            ],
        )
        if code != 0:
            raise ContractError(
                f"{root}: protoc cannot compile the contracts:\n{report or f'exit status {code}'}"
            )
        if report:
            log.warning("%s: protoc: %s", root, report)
        fds = descriptor_pb2.FileDescriptorSet()
        fds.ParseFromString(out.read_bytes())
    return list(fds.file)


def _protoc() -> ModuleType:
    try:
        # grpcio-tools is a development dependency; reading a FileDescriptorSet needs none.
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError as e:
        raise ContractError(
            "compiling .proto files needs grpcio-tools (pip install 'tabadol[dev]'); "
            "or pass a FileDescriptorSet built by `make protos`"
        ) from e
    return protoc  # type: ignore[no-any-return]


def _run_protoc(protoc: ModuleType, args: list[str]) -> tuple[int, str]:
    """protoc's exit status and what it wrote on stderr (errors and warnings)."""
    with tempfile.TemporaryFile() as sink, _STDERR_LOCK:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            code: int = protoc.main(args)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        return code, sink.read().decode("utf-8", "replace").strip()
