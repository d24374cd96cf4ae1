"""Publishing contracts: a provider cannot break its consumers within a major version."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tabadol import config
from tabadol.cli import main
from tabadol.client import connect
from tabadol.errors import ConfigError
from tabadol.pki import CertificateAuthority
from tests.conftest import RunningProvider, start_broker
from tests.support.echo import BIDI, echo_file_descriptor


def without_bidi(path: Path) -> Path:
    """The echo contract with its Bidi method removed: a breaking change."""
    fd = echo_file_descriptor()
    methods = [m for m in fd.service[0].method if m.name != "Bidi"]
    del fd.service[0].method[:]
    fd.service[0].method.extend(methods)
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[fd]).SerializeToString())
    return path


async def test_a_reload_that_would_break_consumers_is_refused_and_the_old_contract_serves_on(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    broker = await start_broker(tmp_path, pki.dir, echo_contracts, [echo_provider.address])
    try:
        text = (tmp_path / "broker.toml").read_text()
        broken = without_bidi(tmp_path / "broken.pb")
        (tmp_path / "broker.toml").write_text(text.replace(str(echo_contracts), str(broken)))
        with pytest.raises(ConfigError) as err:
            broker.reload(config.load(tmp_path / "broker.toml"))
        message = str(err.value)
        assert "would break consumers" in message and "new major version" in message
        assert "tabadol.test.v1.Echo/Bidi" in message and "METHOD_REMOVED" in message
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            call = channel.stream_stream(BIDI)(iter([b"still"]), timeout=10)
            assert [m async for m in call] == [b"still"]
    finally:
        await broker.stop(0)


def test_contracts_check_explains_each_breaking_change_and_passes_additions(
    tmp_path: Path, echo_contracts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = without_bidi(tmp_path / "broken.pb")
    assert main(["contracts", "check", str(echo_contracts), str(broken)]) == 1
    out = capsys.readouterr()
    assert "tabadol.test.v1.Echo/Bidi" in out.out and "METHOD_REMOVED" in out.out
    assert "1 breaking change(s)" in out.err

    grown = tmp_path / "grown.pb"
    fd = echo_file_descriptor()
    fd.message_type[0].field.add(name="note", number=2, type=9, label=1)  # a new string field
    grown.write_bytes(
        descriptor_pb2.FileDescriptorSet(file=[fd, echo_file_descriptor("v2")]).SerializeToString()
    )
    assert main(["contracts", "check", str(echo_contracts), str(grown)]) == 0
    assert "no breaking changes" in capsys.readouterr().err


def test_contracts_lint_passes_the_projects_own_protos(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["contracts", "lint", "protos"]) == 0
    assert "0 finding(s)" in capsys.readouterr().err


def test_contracts_check_on_a_missing_path_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["contracts", "check", str(tmp_path / "absent"), "protos"]) == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err
