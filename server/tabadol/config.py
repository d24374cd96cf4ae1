"""The broker configuration: one TOML file, validated once at load into typed objects.

Relative paths in the file are relative to the file's own directory, so a configuration
means the same thing whatever directory the broker is started from.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import tomllib
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tabadol.contracts import Contracts
from tabadol.database import is_database_url, resolve_sqlite_url, sqlite_path, transport_problem
from tabadol.errors import ConfigError, ContractError
from tabadol.gateway.http_rules import RestRoutes
from tabadol.samplers import check_exporter, parse_sampler
from tabadol.spiffe import AGENCY_ID_PATTERN, TRUST_DOMAIN_PATTERN

_HOST_PORT = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})")
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def _address(value: str, *, allow_zero: bool) -> str:
    match = _HOST_PORT.fullmatch(value)
    if not match:
        raise ValueError(f"{value!r} is not a host:port address")
    port = int(match["port"])
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"{value!r} has port {port} outside 1-65535")
    return value


ListenAddress = Annotated[str, AfterValidator(lambda v: _address(v, allow_zero=True))]
Endpoint = Annotated[str, AfterValidator(lambda v: _address(v, allow_zero=False))]


def _agency_id(value: str) -> str:
    if not AGENCY_ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"{value!r} is not an agency id (lower-case letters, digits and '-', "
            "starting with a letter)"
        )
    return value


AgencyId = Annotated[str, AfterValidator(_agency_id)]


def _trust_domain(value: str) -> str:
    if not TRUST_DOMAIN_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} is not a lower-case DNS-style trust domain")
    return value


TrustDomain = Annotated[str, AfterValidator(_trust_domain)]
LoosePath = Annotated[Path, Field(strict=False)]  # TOML has no path type: accept strings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BrokerSection(_Strict):
    listen: ListenAddress = "127.0.0.1:7443"
    trust_domain: TrustDomain
    pki_dir: LoosePath
    contracts: list[LoosePath] = Field(min_length=1)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024, le=2**31 - 1)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    metrics_listen: ListenAddress | None = "127.0.0.1:9464"
    # Provider endpoints: an active health check every so often, and an endpoint whose calls
    # fail to connect this many times in a row is set aside (1 s, doubling to 30 s).
    health_check_seconds: float = Field(default=2.0, gt=0)
    eject_after_failures: int = Field(default=3, ge=1)
    # Retries of idempotent calls: at most this share of calls (a budget, so a failing
    # provider is not hit twice as hard).
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1)
    max_concurrent_streams: int = Field(default=1000, ge=1)  # per consumer connection
    # Defaults for every service and consumer that sets none of its own (a [[service]] or a
    # [[limit]] setting replaces them): no stream lasts for ever, none idles for ever, and
    # no agency holds more than this many calls in flight, over all its connections.
    max_stream_seconds: float = Field(default=3600.0, gt=0)
    stream_idle_seconds: float = Field(default=300.0, gt=0)
    consumer_concurrency: int = Field(default=200, ge=1)
    instance: str | None = None  # names this broker in ledger records; default host:pid
    # When the CRL passes its next-update time while the broker runs: "refuse" every call
    # (fail closed, the default) or "serve" on with the stale CRL (logged, and a metric).
    stale_crl: Literal["refuse", "serve"] = "refuse"
    crl_warn_hours: float = Field(default=48.0, ge=0)  # warn this long before it goes stale


class LedgerSection(_Strict):
    """Where and how the broker accounts for every call (docs/ledger.md)."""

    # The SQLite ledger; with ``url``, the stem of this node's own files beside it (the
    # journal, the seals witness and the kept CRL), while the records go to PostgreSQL.
    path: LoosePath = Path("var/ledger.db")
    url: str | None = None  # postgresql://user@host:port/db: one ledger for every node
    mode: Literal["batched", "strict"] = "batched"
    batch_interval_ms: int = Field(default=100, ge=1, le=60_000)
    buffer_records: int = Field(default=100_000, ge=1)
    # Fail closed once a record has waited this long for the ledger (docs/ledger.md).
    max_unwritten_seconds: float = Field(default=5.0, gt=0, le=3600)
    payload_digests: bool = False
    # RFC 3161 timestamps on seals (docs/ledger.md, "Trusted timestamps"): the TSA's URL, and
    # its certificate with its CA chain up to the root (PEM), which every token must chain to.
    tsa_url: str | None = None
    tsa_certificate: LoosePath | None = None
    # A token dated later than this after its seal fixes the records only from its own date:
    # verify calls it BROKEN (raise it if your TSA can be down longer).
    tsa_max_delay_seconds: float = Field(default=86_400.0, gt=0)

    @field_validator("tsa_url")
    @classmethod
    def _tsa_url(cls, value: str | None) -> str | None:
        if value is not None:
            split = urllib.parse.urlsplit(value)
            try:
                port_ok = split.port is None or split.port > 0
            except ValueError:  # not a number, or out of range
                port_ok = False
            if split.scheme not in ("http", "https") or not split.hostname or not port_ok:
                raise ValueError(f"{value!r} is not a TSA URL: expected http(s)://HOST:PORT/PATH")
            if split.username is not None or split.password is not None:
                raise ValueError("a TSA URL must not hold a user name or password")
        return value

    @model_validator(mode="after")
    def _tsa_needs_its_certificate(self) -> LedgerSection:
        if self.tsa_url is not None and self.tsa_certificate is None:
            raise ValueError(
                "tsa_url needs tsa_certificate: the TSA's certificate and CA chain (PEM), "
                "to check every token it signs"
            )
        return self

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not is_database_url(value):
            raise ValueError(
                "expected postgresql://USER@HOST:PORT/DATABASE (leave it out for the SQLite "
                "ledger at path)"
            )
        return _safe_transport(value)

    @field_validator("max_unwritten_seconds")
    @classmethod
    def _longer_than_a_batch(cls, value: float, info: Any) -> float:
        interval = info.data.get("batch_interval_ms")
        if isinstance(interval, int) and value * 1000 <= 2 * interval:
            raise ValueError(
                f"{value:g} s must be more than two batch intervals ({2 * interval} ms): "
                "otherwise the broker refuses calls while the ledger works"
            )
        return value


class TracingSection(_Strict):
    """OpenTelemetry settings; any left out come from the standard OTEL_* variables."""

    enabled: bool = True
    service_name: str | None = None
    sampler: str | None = None
    sampler_arg: str | None = None
    exporter: str | None = None
    # https:// (default https://localhost:4317): mTLS with the broker's own certificate, to
    # a collector proving it is ops.<trust_domain>; http://: plaintext, for one of your own.
    otlp_endpoint: str | None = None

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        if value is not None:
            scheme, sep, rest = value.partition("://")
            host, _, port = rest.rstrip("/").rpartition(":")
            if not sep or scheme not in ("http", "https") or not host or not port.isdigit():
                raise ValueError(
                    f"{value!r} is not an OTLP endpoint: expected https://HOST:PORT "
                    "(or http://HOST:PORT for a collector of your own)"
                )
        return value

    @field_validator("exporter")
    @classmethod
    def _known_exporter(cls, value: str | None) -> str | None:
        return check_exporter(value) if value is not None else None

    @model_validator(mode="after")
    def _known_sampler(self) -> TracingSection:
        if self.sampler is not None:  # the ratio too: a typo must not wait for the broker
            parse_sampler(self.sampler, self.sampler_arg)
        return self


def _registry_url(value: str | None) -> str | None:
    """A PostgreSQL URL every node can reach safely, or ``sqlite:///PATH``: one node's file
    (relative to the configuration's directory; ``sqlite:////abs/path`` is absolute)."""
    if value is not None and value.startswith("sqlite:"):
        sqlite_path(value)  # ValueError: names no file
        return value
    if value is not None and not is_database_url(value):
        raise ValueError(
            "expected a postgresql://USER@HOST:PORT/DB URL, or sqlite:///PATH for a registry "
            "in one file on this node"
        )
    return _safe_transport(value)


def _safe_transport(url: str | None) -> str | None:
    if url is not None and (problem := transport_problem(url)):
        raise ValueError(problem)
    return url


def _https_url(value: str) -> str:
    if not re.fullmatch(r"https://[^\s/?#]+(/[^\s?#]*)?", value):
        raise ValueError(f"{value!r} is not an https:// URL")
    return value.rstrip("/")


class RegistrySection(_Strict):
    """Where the registry entries live: this file (no url) or a PostgreSQL database
    that every broker node follows (docs/registry.md)."""

    url: Annotated[str | None, AfterValidator(_registry_url)] = None
    poll_seconds: float = Field(
        default=1.0, gt=0, le=60
    )  # also polled, should a notification be lost
    # When the version in force could not be confirmed current for this long (the database
    # unreachable): "refuse" every new call (fail closed, the default) or "serve" on with it
    # (logged, and a metric).
    max_age_seconds: float = Field(default=3600.0, gt=0)
    stale: Literal["refuse", "serve"] = "refuse"


class AgencyEntry(_Strict):
    id: AgencyId
    name: str = Field(min_length=1)
    # For the quarterly e-service assessment (docs/reports.md):
    government_services: int | None = Field(default=None, ge=0)  # all its services, e- or not
    visits_per_exchange: float = Field(default=0.0, ge=0)  # in-person visits one exchange replaces
    in_person_visits_per_quarter: int | None = Field(default=None, ge=0)  # the baseline


class ServiceEntry(_Strict):
    name: str = Field(min_length=1)
    provider: AgencyId
    endpoints: list[Endpoint] = Field(min_length=1)
    # For this service only: a message limit under the broker's own, and stream limits in
    # place of the broker's defaults (longer ones too, for a service that needs them).
    max_message_bytes: int | None = Field(default=None, ge=1)
    max_stream_seconds: float | None = Field(default=None, gt=0)  # streams end after this
    stream_idle_seconds: float | None = Field(default=None, gt=0)  # ...or after this silence
    # Show the contract (GetContract, reflection) to every declared agency, granted or not,
    # so that it can read what it would ask a grant for. Off: only to agencies granted it.
    contract_public: bool = False
    # Grants on it need an operator's approval too, after the provider's (docs/access.md).
    sensitive: bool = False


class LimitEntry(_Strict):
    """A consumer's rate and concurrency limits, overall or for one service."""

    consumer: AgencyId
    service: str | None = None
    rate: float | None = Field(default=None, gt=0)  # calls per second
    burst: float | None = Field(default=None, ge=1)  # calls at once above the rate
    concurrency: int | None = Field(default=None, ge=1)  # calls in flight


_RECORD_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_METHODS = 256  # method names in one grant or request: a service has far fewer


def _distinct(methods: list[str]) -> list[str]:
    repeated = sorted(m for m, n in Counter(methods).items() if n > 1)
    if repeated:
        raise ValueError(f"lists {', '.join(map(repr, repeated[:5]))} more than once")
    return methods


Methods = Annotated[
    list[str], Field(min_length=1, max_length=MAX_METHODS), AfterValidator(_distinct)
]


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.utcoffset() is None:
        raise ValueError("needs a time zone, e.g. 2027-03-20T00:00:00Z")
    return value


AwareTime = Annotated[dt.datetime, Field(strict=False), AfterValidator(_aware)]  # JSON: a string


class GrantEntry(_Strict):
    consumer: AgencyId
    service: str = Field(min_length=1)
    methods: Methods
    # Set by the Access service; optional in a file (``grant_id`` derives one from the rest).
    id: str | None = Field(default=None, pattern=_RECORD_ID)
    purpose: str | None = Field(default=None, min_length=1, max_length=2000)  # legal basis
    purpose_reference: str | None = Field(default=None, min_length=1, max_length=200)
    expires_at: AwareTime | None = None  # no call is admitted by it from then on
    granted_by: str | None = None  # who granted it (an agency or operator identity)
    granted_at: AwareTime | None = None
    request: str | None = Field(default=None, pattern=_RECORD_ID)  # the request it answers


def grant_id(grant: GrantEntry) -> str:
    """The grant's id: its own, or for a grant written without one, a digest of the rest
    (the same grant written again keeps it)."""
    if grant.id is not None:
        return grant.id
    rest = grant.model_dump(mode="json", exclude={"id"}, exclude_none=True)
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "file-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


RequestState = Literal["pending", "awaiting_operator", "approved", "rejected", "withdrawn"]
OPEN_STATES: tuple[RequestState, ...] = ("pending", "awaiting_operator")


class RequestEntry(_Strict):
    """A consumer's request for access, and what became of it (docs/access.md)."""

    id: str = Field(pattern=_RECORD_ID)
    consumer: AgencyId
    service: str = Field(min_length=1)
    methods: Methods
    purpose: str = Field(min_length=1, max_length=2000)
    purpose_reference: str | None = Field(default=None, min_length=1, max_length=200)
    expires_at: AwareTime | None = None  # asked for; the provider may set another
    state: RequestState = "pending"
    requested_by: str
    requested_at: AwareTime
    decided_by: str | None = None  # the last who approved, rejected or withdrew it
    decided_at: AwareTime | None = None
    provider_approved_by: str | None = None  # on a sensitive service, before the operator
    reason: str | None = None  # why it was rejected or withdrawn
    grant: str | None = Field(default=None, pattern=_RECORD_ID)  # the grant it became


ENTRY_SECTIONS = ("agency", "service", "grant", "limit", "request")


class RegistryFile(_Strict):
    """The registry entries alone: a file for `tabadol registry import`, or a version in the
    registry database."""

    agency: list[AgencyEntry] = []
    service: list[ServiceEntry] = []
    grant: list[GrantEntry] = []
    limit: list[LimitEntry] = []
    request: list[RequestEntry] = []


class GatewaySection(_Strict):
    """The broker's HTTP entry for agencies without gRPC: Connect and REST/JSON on its own
    port, over the same mTLS and admission (docs/gateway.md). Absent: no HTTP entry."""

    listen: ListenAddress
    # How agencies reach it, for the OpenAPI documents' servers (default https://<listen>).
    public_url: Annotated[str | None, AfterValidator(_https_url)] = None
    max_body_bytes: int | None = Field(
        default=None, ge=1024, le=2**31 - 1
    )  # default: max_message_bytes
    max_json_depth: int = Field(default=32, ge=2, le=100)


class ConfigFile(RegistryFile):
    broker: BrokerSection
    tracing: TracingSection = TracingSection()
    ledger: LedgerSection = LedgerSection()
    registry: RegistrySection = RegistrySection()
    gateway: GatewaySection | None = None

    @model_validator(mode="after")
    def _node_named_for_a_shared_ledger(self) -> ConfigFile:
        if self.ledger.url is not None and not self.broker.instance:
            raise ValueError(
                "[ledger] url needs [broker] instance: a name for this node, the same at "
                "every start (its chain in the shared ledger is named after it)"
            )
        return self

    @model_validator(mode="after")
    def _gateway_on_its_own_port(self) -> ConfigFile:
        if self.gateway is None or self.gateway.listen.endswith(":0"):
            return self
        taken = {"[broker] listen": self.broker.listen}
        if self.broker.metrics_listen is not None:
            taken["[broker] metrics_listen"] = self.broker.metrics_listen
        for setting, address in taken.items():
            if address == self.gateway.listen:
                raise ValueError(
                    f"[gateway] listen {address} is also {setting}: the HTTP entry needs a "
                    "port of its own"
                )
        return self


@dataclass(frozen=True)
class BrokerConfig:
    """A configuration that has passed every check, with its contracts loaded."""

    path: Path
    broker: BrokerSection
    tracing: TracingSection
    ledger: LedgerSection
    agencies: dict[str, AgencyEntry]
    services: dict[str, ServiceEntry]
    grants: tuple[GrantEntry, ...]
    contracts: Contracts
    limits: tuple[LimitEntry, ...] = ()
    registry: RegistrySection = field(default_factory=RegistrySection)
    registry_version: int | None = None  # the database version applied; None: from the file
    requests: tuple[RequestEntry, ...] = ()
    gateway: GatewaySection | None = None


def _describe_location(loc: tuple[Any, ...], data: dict[str, Any]) -> str:
    """Turn a pydantic location like ('grant', 2, 'methods') into '[[grant]] #3 (...) methods'."""
    if len(loc) >= 2 and loc[0] in ENTRY_SECTIONS and isinstance(loc[1], int):
        section, index = loc[0], loc[1]
        entry = data.get(section, [])[index] if index < len(data.get(section, [])) else {}
        return f"{_entry_label(section, index, entry)}{' ' + '.'.join(map(str, loc[2:])) if loc[2:] else ''}"
    if loc and loc[0] in ("broker", "tracing", "ledger", "registry", "gateway"):
        return f"[{loc[0]}]" + (f" {'.'.join(map(str, loc[1:]))}" if loc[1:] else "")
    return ".".join(map(str, loc)) or "(top level)"


def _entry_label(section: str, index: int, entry: Any) -> str:
    key = {"agency": "id", "service": "name", "grant": "consumer", "limit": "consumer"}.get(
        section, "id"
    )
    name = entry.get(key) if isinstance(entry, dict) else None
    suffix = f" ({key} {name!r})" if isinstance(name, str) else ""
    return f"[[{section}]] #{index + 1}{suffix}"


_M = TypeVar("_M", bound=BaseModel)


def _toml(text: str, path: Path | str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except RecursionError:
        raise ConfigError(f"{path}: not a broker configuration: nested too deeply") from None


def _validate(model: type[_M], data: Any, path: Path | str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = _describe_location(tuple(err["loc"]), data if isinstance(data, dict) else {})
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (a typo?)"
            problems.append(f"{path}: {where}: {msg}")
        raise ConfigError("\n".join(problems)) from None


def parse(text: str, path: Path) -> ConfigFile:
    """Parse and shape-check the TOML text; ConfigError lists every problem found."""
    return _validate(ConfigFile, _toml(text, path), path)


def parse_entries(data: Any, source: Path | str) -> RegistryFile:
    """Shape-check registry entries (from a file or a database version), with the same
    messages as a configuration file's; ``source`` names where they came from."""
    return _validate(RegistryFile, data, source)


def read_registry_file(path: Path) -> RegistryFile:
    """The entries of a registry-only TOML file, or of a whole broker configuration (whose
    other sections are left aside); ConfigError as for a configuration file."""
    path = path.resolve()
    data = _toml(_read_text(path, "the registry file"), path)
    if "broker" in data:
        cfg = _validate(ConfigFile, data, path)  # a whole configuration: all of it must hold
        return RegistryFile(**{name: getattr(cfg, name) for name in ENTRY_SECTIONS})
    return parse_entries(data, path)


def check(cfg: ConfigFile, path: Path, contracts: Contracts) -> list[str]:
    """Cross-entry checks against each other and the contracts; returns the problems."""
    return check_entries(cfg, path, contracts, cfg.broker.max_message_bytes)


def check_entries(
    cfg: RegistryFile, path: Path | str, contracts: Contracts, max_message_bytes: int
) -> list[str]:
    """``check`` for entries alone, against the contracts and the broker's message limit."""
    problems: list[str] = []

    def problem(section: str, index: int, entry: BaseModel, text: str) -> None:
        label = _entry_label(section, index, entry.model_dump())
        problems.append(f"{path}: {label}: {text}")

    for dup, n in Counter(a.id for a in cfg.agency).items():
        if n > 1:
            problems.append(f"{path}: [[agency]] id {dup!r} is defined {n} times")
    for dup, n in Counter(s.name for s in cfg.service).items():
        if n > 1:
            problems.append(f"{path}: [[service]] {dup!r} is defined {n} times")
    agencies = {a.id for a in cfg.agency}
    for i, svc in enumerate(cfg.service):
        if svc.provider not in agencies:
            problem("service", i, svc, f"provider {svc.provider!r} is not a declared [[agency]]")
        if svc.name not in contracts.services:
            problem("service", i, svc, f"service {svc.name!r} is not in the loaded contracts")
        for dup, n in Counter(svc.endpoints).items():
            if n > 1:
                problem("service", i, svc, f"endpoint {dup!r} is listed {n} times")
    services = {s.name for s in cfg.service}
    asks: list[tuple[str, int, GrantEntry | RequestEntry]] = [
        *(("grant", i, g) for i, g in enumerate(cfg.grant)),
        *(("request", i, r) for i, r in enumerate(cfg.request)),
    ]
    for section, i, ask in asks:
        if isinstance(ask, RequestEntry) and ask.state not in OPEN_STATES:
            continue  # closed: what it named may have gone since, as the history shows
        if ask.consumer not in agencies:
            problem(section, i, ask, f"consumer {ask.consumer!r} is not a declared [[agency]]")
        if ask.service not in services:
            problem(section, i, ask, f"service {ask.service!r} is not a declared [[service]]")
            continue
        contract = contracts.services.get(ask.service)
        if contract is None:
            continue
        unknown = [m for m in ask.methods if m != "*" and m not in contract.methods]
        if unknown:
            named = ", ".join(map(repr, unknown[:5])) + (
                f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            )
            problem(
                section,
                i,
                ask,
                f"method {named} {'is' if len(unknown) == 1 else 'are'} not in service "
                f"{ask.service!r} (it has: {', '.join(sorted(contract.methods))})",
            )
    for dup, n in Counter(g.id for g in cfg.grant if g.id is not None).items():
        if n > 1:
            problems.append(f"{path}: [[grant]] id {dup!r} is used {n} times")
    for dup, n in Counter(r.id for r in cfg.request).items():
        if n > 1:
            problems.append(f"{path}: [[request]] id {dup!r} is used {n} times")
    for i, limit in enumerate(cfg.limit):
        if limit.consumer not in agencies:
            problem("limit", i, limit, f"consumer {limit.consumer!r} is not a declared [[agency]]")
        if limit.service is not None and limit.service not in services:
            problem("limit", i, limit, f"service {limit.service!r} is not a declared [[service]]")
        if limit.rate is None and limit.concurrency is None:
            problem("limit", i, limit, "sets neither rate nor concurrency")
    for (consumer, scope), n in Counter((lim.consumer, lim.service) for lim in cfg.limit).items():
        if n > 1:
            where = f"service {scope!r}" if scope else "all services"
            problems.append(f"{path}: [[limit]] for {consumer!r} on {where} is defined {n} times")
    for i, svc in enumerate(cfg.service):
        if svc.max_message_bytes and svc.max_message_bytes > max_message_bytes:
            problem(
                "service", i, svc,
                f"max_message_bytes {svc.max_message_bytes} is above the broker's "
                f"{max_message_bytes}, which bounds every message",
            )  # fmt: skip
    return problems


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from e


def load(path: Path) -> BrokerConfig:
    """Read, validate and resolve a broker configuration file.

    With ``[registry] url`` the result has no entries: they come from the database
    (``apply_entries``), and entries in the file are an error.
    """
    path = path.resolve()
    cfg = parse(_read_text(path, "the configuration"), path)
    if cfg.registry.url is not None:
        present = [f"[[{name}]]" for name in ENTRY_SECTIONS if getattr(cfg, name)]
        if present:
            raise ConfigError(
                f"{path}: {', '.join(present)} entries are in the file, but with [registry] url "
                "set the registry entries live in the registry database; import them with "
                f"`tabadol registry import --config {path} FILE` and remove them from here"
            )
    base = path.parent
    broker = cfg.broker.model_copy(
        update={
            "pki_dir": base / cfg.broker.pki_dir,
            "contracts": [base / p for p in cfg.broker.contracts],
        }
    )
    try:
        contracts = Contracts.load(broker.contracts)
        RestRoutes.from_contracts(contracts)  # a google.api.http rule that cannot be served
    except ContractError as e:
        raise ConfigError(f"{path}: [broker] contracts: {e}") from e
    problems = check(cfg, path, contracts)
    if problems:
        raise ConfigError("\n".join(problems))
    return BrokerConfig(
        path=path,
        broker=broker,
        tracing=cfg.tracing,
        ledger=cfg.ledger.model_copy(
            update={
                "path": base / cfg.ledger.path,
                "tsa_certificate": cfg.ledger.tsa_certificate and base / cfg.ledger.tsa_certificate,
            }
        ),
        agencies={a.id: a for a in cfg.agency},
        services={s.name: s for s in cfg.service},
        grants=tuple(cfg.grant),
        contracts=contracts,
        limits=tuple(cfg.limit),
        registry=cfg.registry.model_copy(
            update={"url": cfg.registry.url and resolve_sqlite_url(cfg.registry.url, base)}
        ),
        requests=tuple(cfg.request),
        gateway=cfg.gateway,
    )


def apply_entries(
    cfg: BrokerConfig, entries: RegistryFile, source: Path | str, version: int | None = None
) -> BrokerConfig:
    """``cfg`` with these registry entries in place of its own, checked exactly as a file's
    against ``cfg``'s contracts; ConfigError lists the problems, naming ``source``."""
    problems = check_entries(entries, source, cfg.contracts, cfg.broker.max_message_bytes)
    if problems:
        raise ConfigError("\n".join(problems))
    return replace(
        cfg,
        agencies={a.id: a for a in entries.agency},
        services={s.name: s for s in entries.service},
        grants=tuple(entries.grant),
        limits=tuple(entries.limit),
        requests=tuple(entries.request),
        registry_version=version,
    )
