"""Specification of the broker configuration: what loads, and how every problem is reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from tabadol.config import DEFAULT_MAX_MESSAGE_BYTES, load, parse
from tabadol.errors import ConfigError
from tests.support.echo import SERVICE, write_echo_contracts

BROKER = """
[broker]
listen = "127.0.0.1:0"
trust_domain = "tabadol.test"
pki_dir = "pki"
contracts = ["contracts/echo.pb"]
"""

AGENCIES = """
[[agency]]
id = "nocr"
name = "National Organization for Civil Registration"

[[agency]]
id = "post"
name = "Post Company"
"""

ECHO_SERVICE = f"""
[[service]]
name = "{SERVICE}"
provider = "nocr"
endpoints = ["127.0.0.1:50051", "[::1]:50051"]
"""

GRANTS = f"""
[[grant]]
consumer = "post"
service = "{SERVICE}"
methods = ["Unary", "Bidi"]

[[grant]]
consumer = "nocr"
service = "{SERVICE}"
methods = ["*"]
"""

VALID = BROKER + AGENCIES + ECHO_SERVICE + GRANTS


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A directory holding the echo contracts at contracts/echo.pb, as BROKER refers to them."""
    (tmp_path / "contracts").mkdir()
    write_echo_contracts(tmp_path / "contracts" / "echo.pb")
    return tmp_path


def write_config(directory: Path, text: str) -> Path:
    path = directory / "broker.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(directory: Path, text: str) -> str:
    """The message of the ConfigError that loading ``text`` raises."""
    path = write_config(directory, text)
    with pytest.raises(ConfigError) as excinfo:
        load(path)
    return str(excinfo.value)


# --- A valid file ---------------------------------------------------------------------------


def test_valid_file_loads_into_typed_objects(config_dir: Path) -> None:
    cfg = load(write_config(config_dir, VALID))

    assert cfg.broker.trust_domain == "tabadol.test"
    assert cfg.broker.listen == "127.0.0.1:0"
    assert set(cfg.agencies) == {"nocr", "post"}
    assert cfg.agencies["post"].name == "Post Company"
    assert cfg.services[SERVICE].provider == "nocr"
    assert cfg.services[SERVICE].endpoints == ["127.0.0.1:50051", "[::1]:50051"]
    assert [(g.consumer, g.methods) for g in cfg.grants] == [
        ("post", ["Unary", "Bidi"]),
        ("nocr", ["*"]),
    ]
    assert SERVICE in cfg.contracts.services


def test_relative_paths_are_resolved_against_the_files_directory(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = write_config(config_dir, VALID)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))

    cfg = load(path)

    base = config_dir.resolve()
    assert cfg.path == path.resolve()
    assert cfg.broker.pki_dir == base / "pki"
    assert cfg.broker.contracts == [base / "contracts" / "echo.pb"]


def test_absolute_paths_are_kept_as_they_are(config_dir: Path) -> None:
    contracts = (config_dir / "contracts" / "echo.pb").resolve()
    text = VALID.replace('"contracts/echo.pb"', f'"{contracts}"').replace(
        'pki_dir = "pki"', 'pki_dir = "/srv/tabadol/pki"'
    )

    cfg = load(write_config(config_dir, text))

    assert cfg.broker.pki_dir == Path("/srv/tabadol/pki")
    assert cfg.broker.contracts == [contracts]


def test_unset_broker_settings_take_their_defaults(config_dir: Path) -> None:
    text = VALID.replace('listen = "127.0.0.1:0"\n', "")

    cfg = load(write_config(config_dir, text))

    assert cfg.broker.listen == "127.0.0.1:7443"
    assert cfg.broker.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert cfg.broker.shutdown_grace_seconds == 10.0


def test_a_file_with_no_agencies_services_or_grants_is_valid(config_dir: Path) -> None:
    cfg = load(write_config(config_dir, BROKER))

    assert cfg.agencies == {}
    assert cfg.services == {}
    assert cfg.grants == ()


# --- The file itself ------------------------------------------------------------------------


def test_missing_configuration_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    message = str(excinfo.value)
    assert str(path.resolve()) in message
    assert "cannot read the configuration" in message
    assert "No such file or directory" in message


def test_text_that_is_not_toml_is_reported_with_the_file(config_dir: Path) -> None:
    path = write_config(config_dir, "[broker\ntrust_domain = tabadol.test\n")

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    message = str(excinfo.value)
    assert message.startswith(f"{path.resolve()}: not valid TOML")


def test_bytes_that_are_not_utf8_are_reported_with_the_file(config_dir: Path) -> None:
    path = config_dir / "broker.toml"
    path.write_bytes(b"[broker]\ntrust_domain = '\xff\xfe'\n")

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    assert str(excinfo.value).startswith(f"{path.resolve()}: not UTF-8 text")


# --- Shape of each entry --------------------------------------------------------------------


def test_unknown_key_in_broker_section_is_reported_as_a_possible_typo(config_dir: Path) -> None:
    path = write_config(
        config_dir, VALID.replace("trust_domain =", "trust_domian = 'x'\ntrust_domain =")
    )

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    assert str(excinfo.value) == f"{path.resolve()}: [broker] trust_domian: unknown key (a typo?)"


def test_unknown_key_in_an_entry_names_the_entry(config_dir: Path) -> None:
    text = VALID.replace('name = "Post Company"', 'name = "Post Company"\nnmae = "typo"')

    message = load_error(config_dir, text)

    assert "[[agency]] #2 (id 'post') nmae: unknown key (a typo?)" in message


def test_missing_trust_domain_is_reported(config_dir: Path) -> None:
    path = write_config(config_dir, VALID.replace('trust_domain = "tabadol.test"\n', ""))

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    message = str(excinfo.value)
    assert message.startswith(f"{path.resolve()}: [broker] trust_domain:")
    assert "Field required" in message


def test_missing_broker_section_is_reported(config_dir: Path) -> None:
    message = load_error(config_dir, AGENCIES)

    assert "broker.toml: [broker]: Field required" in message


def test_a_string_where_a_list_of_contracts_belongs_is_reported(config_dir: Path) -> None:
    text = VALID.replace('contracts = ["contracts/echo.pb"]', 'contracts = "contracts/echo.pb"')

    message = load_error(config_dir, text)

    assert "[broker] contracts:" in message


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("localhost", "'localhost' is not a host:port address"),
        ("1.2.3.4:99999", "'1.2.3.4:99999' has port 99999 outside 1-65535"),
        ("1.2.3.4:0", "'1.2.3.4:0' has port 0 outside 1-65535"),
        ("http://1.2.3.4:80", "'http://1.2.3.4:80' is not a host:port address"),
        pytest.param("127.0.0.1:80\n", "is not a host:port address", id="trailing-newline"),
    ],
)
def test_bad_endpoint_address_names_the_service_and_the_address(
    config_dir: Path, endpoint: str, problem: str
) -> None:
    text = VALID.replace('"[::1]:50051"', repr(endpoint).replace("'", '"'))
    path = write_config(config_dir, text)

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    message = str(excinfo.value)
    assert message.startswith(f"{path.resolve()}: [[service]] #1 (name '{SERVICE}') endpoints.1:")
    assert problem in message


def test_listen_address_may_use_port_zero_but_not_a_bare_host(config_dir: Path) -> None:
    assert load(write_config(config_dir, VALID)).broker.listen == "127.0.0.1:0"

    message = load_error(config_dir, VALID.replace('"127.0.0.1:0"', '"0.0.0.0"'))

    assert "[broker] listen: '0.0.0.0' is not a host:port address" in message


@pytest.mark.parametrize(
    "agency_id",
    ["NOCR", "1nocr", "no_cr", "", "a" * 64, pytest.param("nocr\n", id="trailing-newline")],
)
def test_bad_agency_id_is_refused_with_the_rule_it_breaks(config_dir: Path, agency_id: str) -> None:
    text = VALID.replace('id = "post"', f"id = {agency_id!r}".replace("'", '"'))

    message = load_error(config_dir, text)

    assert f"[[agency]] #2 (id {agency_id!r}) id: {agency_id!r} is not an agency id" in message
    assert "lower-case letters, digits and '-'" in message


def test_max_message_bytes_below_the_minimum_is_reported(config_dir: Path) -> None:
    text = VALID.replace(
        'trust_domain = "tabadol.test"', 'trust_domain = "tabadol.test"\nmax_message_bytes = 10'
    )

    message = load_error(config_dir, text)

    assert "[broker] max_message_bytes:" in message
    assert "1024" in message


# --- Entries against each other and the contracts -------------------------------------------


def test_duplicate_agency_ids_are_reported(config_dir: Path) -> None:
    path = write_config(config_dir, VALID + '\n[[agency]]\nid = "post"\nname = "Post again"\n')

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    assert str(excinfo.value) == f"{path.resolve()}: [[agency]] id 'post' is defined 2 times"


def test_duplicate_service_names_are_reported(config_dir: Path) -> None:
    path = write_config(config_dir, VALID + ECHO_SERVICE)

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    assert str(excinfo.value) == f"{path.resolve()}: [[service]] '{SERVICE}' is defined 2 times"


def test_duplicate_endpoint_of_a_service_is_reported(config_dir: Path) -> None:
    text = VALID.replace('"[::1]:50051"', '"127.0.0.1:50051"')

    message = load_error(config_dir, text)

    assert (
        f"[[service]] #1 (name '{SERVICE}'): endpoint '127.0.0.1:50051' is listed 2 times"
        in message
    )


def test_service_provider_must_be_a_declared_agency(config_dir: Path) -> None:
    path = write_config(config_dir, VALID.replace('provider = "nocr"', 'provider = "cra"'))

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    assert str(excinfo.value) == (
        f"{path.resolve()}: [[service]] #1 (name '{SERVICE}'): "
        "provider 'cra' is not a declared [[agency]]"
    )


def test_service_must_be_in_the_contracts(config_dir: Path) -> None:
    text = (
        VALID
        + """
[[service]]
name = "tabadol.test.v1.Missing"
provider = "post"
endpoints = ["127.0.0.1:1"]
"""
    )
    path = write_config(config_dir, text)

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    assert str(excinfo.value) == (
        f"{path.resolve()}: [[service]] #2 (name 'tabadol.test.v1.Missing'): "
        "service 'tabadol.test.v1.Missing' is not in the loaded contracts"
    )


def test_grant_for_an_unknown_consumer_names_the_grant(config_dir: Path) -> None:
    path = write_config(config_dir, VALID.replace('consumer = "post"', 'consumer = "tax"'))

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    assert str(excinfo.value) == (
        f"{path.resolve()}: [[grant]] #1 (consumer 'tax'): "
        "consumer 'tax' is not a declared [[agency]]"
    )


def test_grant_for_an_undeclared_service_names_the_grant(config_dir: Path) -> None:
    text = (
        VALID
        + '\n[[grant]]\nconsumer = "post"\nservice = "tabadol.test.v1.Nope"\nmethods = ["Unary"]\n'
    )
    path = write_config(config_dir, text)

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    assert str(excinfo.value) == (
        f"{path.resolve()}: [[grant]] #3 (consumer 'post'): "
        "service 'tabadol.test.v1.Nope' is not a declared [[service]]"
    )


def test_grant_naming_a_method_the_service_lacks_lists_the_methods_it_has(config_dir: Path) -> None:
    text = (
        BROKER + AGENCIES + ECHO_SERVICE + GRANTS.replace('methods = ["*"]', 'methods = ["Unray"]')
    )
    text = text.replace('consumer = "nocr"', 'consumer = "post"')
    path = write_config(config_dir, text)

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    assert str(excinfo.value) == (
        f"{path.resolve()}: [[grant]] #2 (consumer 'post'): method 'Unray' is not in service "
        f"'{SERVICE}' (it has: Bidi, ClientStream, ServerStream, Unary)"
    )


def test_grant_with_no_methods_is_reported(config_dir: Path) -> None:
    message = load_error(config_dir, VALID.replace('methods = ["*"]', "methods = []"))

    assert "[[grant]] #2 (consumer 'nocr') methods:" in message


def test_missing_contracts_file_names_the_configuration_and_the_contracts_file(
    config_dir: Path,
) -> None:
    path = write_config(config_dir, VALID.replace("contracts/echo.pb", "contracts/absent.pb"))

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    message = str(excinfo.value)
    absent = config_dir.resolve() / "contracts" / "absent.pb"
    assert message.startswith(
        f"{path.resolve()}: [broker] contracts: {absent}: cannot read contracts"
    )
    assert "No such file or directory" in message


def test_contracts_file_that_is_not_a_descriptor_set_is_reported(config_dir: Path) -> None:
    (config_dir / "contracts" / "echo.pb").write_bytes(b"\xff\xfe definitely not protobuf")
    path = write_config(config_dir, VALID)

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    message = str(excinfo.value)
    assert message.startswith(f"{path.resolve()}: [broker] contracts: ")
    assert "echo.pb: not a FileDescriptorSet" in message


# --- Several problems at once ---------------------------------------------------------------


def test_several_shape_problems_are_reported_together(config_dir: Path) -> None:
    text = (
        VALID.replace(
            'trust_domain = "tabadol.test"\n', 'trust_domain = "tabadol.test"\nlisten_on = "x"\n'
        )
        .replace('"[::1]:50051"', '"localhost"')
        .replace('id = "post"', 'id = "Post"')
    )
    path = write_config(config_dir, text)

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    lines = str(excinfo.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path.resolve()}: ") for line in lines)
    assert any("[broker] listen_on: unknown key" in line for line in lines)
    assert any(f"[[service]] #1 (name '{SERVICE}') endpoints.1:" in line for line in lines)
    assert any("[[agency]] #2 (id 'Post') id:" in line for line in lines)


def test_several_cross_entry_problems_are_reported_together(config_dir: Path) -> None:
    text = (
        VALID.replace('provider = "nocr"', 'provider = "cra"')
        .replace('consumer = "post"', 'consumer = "tax"')
        .replace('methods = ["*"]', 'methods = ["Nothing"]')
    )
    path = write_config(config_dir, text)

    with pytest.raises(ConfigError) as excinfo:
        load(path)

    lines = str(excinfo.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path.resolve()}: ") for line in lines)
    assert any("[[service]] #1" in line and "provider 'cra'" in line for line in lines)
    assert any("[[grant]] #1 (consumer 'tax')" in line for line in lines)
    assert any("[[grant]] #2 (consumer 'nocr')" in line and "'Nothing'" in line for line in lines)


# --- parse() on its own ---------------------------------------------------------------------


def test_parse_names_the_path_it_is_given_without_touching_the_disk() -> None:
    path = Path("/nowhere/broker.toml")

    with pytest.raises(ConfigError) as excinfo:
        parse("[broker]\npki_dir = 'p'\ncontracts = ['c']\n", path)

    assert str(excinfo.value).startswith("/nowhere/broker.toml: [broker] trust_domain:")


def test_parse_keeps_paths_as_written() -> None:
    cfg = parse(BROKER, Path("/nowhere/broker.toml"))

    assert cfg.broker.pki_dir == Path("pki")
    assert cfg.broker.contracts == [Path("contracts/echo.pb")]


@pytest.mark.parametrize(
    ("tracing", "words"),
    [
        ('sampler = "sometimes"', "unknown sampler 'sometimes'"),
        ('sampler = "traceidratio"\nsampler_arg = "half"', "sampler ratio 'half' is not a number"),
        ('sampler = "parentbased_traceidratio"\nsampler_arg = "1.5"', "outside 0..1"),
        ('exporter = "zipkin"', "unknown traces exporter 'zipkin'"),
    ],
)
def test_a_tracing_setting_the_sdk_would_not_understand_is_refused_at_load(
    config_dir: Path, tracing: str, words: str
) -> None:
    message = load_error(config_dir, VALID + f"\n[tracing]\n{tracing}\n")
    assert words in message and "[tracing]" in message


def test_a_sampler_ratio_in_range_loads(config_dir: Path) -> None:
    path = write_config(
        config_dir, VALID + '\n[tracing]\nsampler = "traceidratio"\nsampler_arg = "0.25"\n'
    )
    assert load(path).tracing.sampler_arg == "0.25"
