"""``tabadol demo``: a whole exchange on one machine, a broker and four agencies.

Everything real: a PKI under ``DIR/pki``, a broker configuration at ``DIR/demo.toml``, the
registry in ``DIR/registry.db`` (SQLite, so the Access service can change it), each agency a
provider over mTLS, the broker's HTTP entry (Connect and REST/JSON), traffic of every RPC kind
sent through the broker, and one request for access, made through the Access service, for the
newcomer to approve.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shlex
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import grpc
import grpc.aio
from opentelemetry.sdk.trace import TracerProvider

from tabadol import config as config_module
from tabadol.agencies.cra.v1 import (
    mobile_ownership_pb2 as cra_pb,
)
from tabadol.agencies.cra.v1 import (
    mobile_ownership_pb2_grpc as cra_grpc,
)
from tabadol.agencies.nocr.v1 import (
    person_registry_pb2 as nocr_pb,
)
from tabadol.agencies.nocr.v1 import (
    person_registry_pb2_grpc as nocr_grpc,
)
from tabadol.agencies.post.v1 import (
    address_directory_pb2 as post_pb,
)
from tabadol.agencies.post.v1 import (
    address_directory_pb2_grpc as post_grpc,
)
from tabadol.agencies.tax.v1 import (
    invoice_registry_pb2_grpc as tax_grpc,
)
from tabadol.broker import Broker
from tabadol.broker.server import reload_from_file
from tabadol.client import ProviderServer, connect
from tabadol.client.tracing import tracer_provider
from tabadol.config import (
    AgencyEntry,
    BrokerConfig,
    GrantEntry,
    RegistryFile,
    ServiceEntry,
    parse_entries,
)
from tabadol.database import sqlite_path
from tabadol.demo_agencies import (
    AGENCIES,
    SERVICES,
    sample_invoice,
    sample_person,
    sample_postal_code,
)
from tabadol.errors import TabadolError
from tabadol.ops.server import OpsServer, open_accounts
from tabadol.ops.trust import OpsTrust
from tabadol.pki import CertificateAuthority
from tabadol.platform.v1 import access_pb2, access_pb2_grpc
from tabadol.registry.entries import digest, entries_data
from tabadol.registry.store import open_registry
from tabadol.type.v1 import date_pb2

log = logging.getLogger("tabadol.demo")

TRUST_DOMAIN = "tabadol.example"
AGENCY_NAMES = {
    "nocr": "National Organization for Civil Registration",
    "post": "National Post Company",
    "cra": "Communications Regulatory Authority",
    "tax": "Iranian National Tax Administration",
}
# Registry figures for the quarterly assessment, illustrative: (government services in all,
# in-person visits one exchange replaces, in-person visits a quarter before the exchange).
REGISTRY = {
    "nocr": (48, 0.8, 2_400_000),
    "post": (35, 0.5, 900_000),
    "cra": (22, 0.6, 600_000),
    "tax": (40, 0.7, 1_500_000),
}
# Who may call what, and why: each grant is a real inter-agency need (consumer, provider,
# methods, purpose, its legal reference; the references are illustrative).
GRANTS: list[tuple[str, str, list[str], str, str]] = [
    ("post", "nocr", ["InquirePerson"],
     "Verifying the addressee's identity for registered mail", "Postal Services Act art. 12"),
    ("tax", "nocr", ["*"],
     "Verifying sellers and buyers named on invoices", "Direct Taxation Act art. 169"),
    ("tax", "cra", ["MatchMobile"],
     "Checking that taxpayers own the mobile numbers they registered",
     "Direct Taxation Act art. 169"),
    ("tax", "post", ["LookupPostalCode"],
     "Verifying taxpayers' business addresses", "Direct Taxation Act art. 169"),
    ("nocr", "post", ["*"],
     "Keeping residents' registered addresses current, by region", "Civil Registration Act art. 4"),
    ("post", "tax", ["SubmitInvoices"],
     "Submitting the post's own sales invoices", "Direct Taxation Act art. 169"),
    ("cra", "nocr", ["InquirePerson"],
     "Identifying mobile subscribers at registration", "Telecommunications Act art. 8"),
]  # fmt: skip
# The request the newcomer approves: the regulator asks the post for its address lists,
# which the traffic shows it may not read yet.
REQUEST = (
    "cra", "post", "ListAddresses",
    "Checking mobile subscribers' registered addresses", "SIM Registration Regulation art. 6",
)  # fmt: skip
DEMO_AUTHOR = "tabadol demo"  # who the registry versions the demo commits name


DEMO_PERSON = "demo"  # the demo's operator and auditor: pki/operators/demo, pki/auditors/demo


def prepare(root: Path, contracts: Path) -> tuple[Path, Path]:
    """Absolute paths for the state directory and the contracts, which must exist; the
    demo PKI is made (once) under ``root/pki``."""
    if not contracts.exists():
        raise TabadolError(f"{contracts}: contracts not built; run `make protos` first")
    ensure_pki(root.resolve() / "pki")
    return root.resolve(), contracts.resolve()


def ensure_pki(pki_dir: Path) -> CertificateAuthority:
    """Create the demo PKI once; later runs reuse it. Besides the broker and the agencies:
    the ops console's certificate, and an operator and an auditor to log in with."""
    if (pki_dir / "ca.key").exists():
        ca = CertificateAuthority(pki_dir)
    else:
        ca = CertificateAuthority.init(pki_dir, TRUST_DOMAIN)
    if not (pki_dir / "broker.key").exists():
        ca.issue_broker()
    if not (pki_dir / "ops.key").exists():
        ca.issue_ops()
    for agency in AGENCIES:
        if not (pki_dir / "agencies" / agency / "agency.key").exists():
            ca.issue_agency(agency)
    for role in ("operator", "auditor"):
        if not (pki_dir / f"{role}s" / DEMO_PERSON / f"{role}.key").exists():
            ca.issue_person(role, DEMO_PERSON)
    if not (pki_dir / "crl.pem").exists():
        ca.write_crl()
    return ca


def demo_config(
    listen: str,
    pki_dir: Path,
    contracts: Path,
    otlp: str,
    metrics_listen: str,
    gateway_listen: str,
) -> str:
    """The broker's own settings; its registry entries are in ``registry.db`` beside it."""
    lines = [
        "# Written by `tabadol demo`; rewritten on every run. The registry entries (agencies,",
        "# services, grants, requests) are in registry.db: `tabadol registry export --config`",
        "# this file shows them, `tabadol registry history` who changed what.",
        "[broker]",
        f'listen = "{listen}"',
        f'trust_domain = "{TRUST_DOMAIN}"',
        f'pki_dir = "{pki_dir}"',
        f'contracts = ["{contracts}"]',
        f'metrics_listen = "{metrics_listen}"',
        "",
        "[gateway]  # Connect and REST/JSON for agencies without gRPC (docs/gateway.md)",
        f'listen = "{gateway_listen}"',
        "",
        "[registry]",
        'url = "sqlite:///registry.db"',
        "",
        "[ledger]",
        'path = "ledger.db"',
        "",
        "[tracing]",
        f'otlp_endpoint = "https://{otlp}"',  # mTLS, with broker.crt
        "",
    ]
    return "\n".join(lines)


def demo_entries(endpoints: Mapping[str, str]) -> RegistryFile:
    """The demo's exchange as it first starts: four agencies, their services at
    ``endpoints`` (by agency) and the grants between them."""
    agencies = []
    for agency, name in AGENCY_NAMES.items():
        services, visits, baseline = REGISTRY[agency]
        agencies.append(
            AgencyEntry(
                id=agency,
                name=name,
                government_services=services,
                visits_per_exchange=visits,
                in_person_visits_per_quarter=baseline,
            )
        )
    return RegistryFile(
        agency=agencies,
        service=[
            ServiceEntry(name=service, provider=agency, endpoints=[endpoints[agency]])
            for agency, service in SERVICES.items()
        ],
        grant=[
            GrantEntry(
                consumer=consumer,
                service=SERVICES[provider],
                methods=methods,
                purpose=purpose,
                purpose_reference=reference,
            )
            for consumer, provider, methods, purpose, reference in GRANTS
        ],
    )


def moved_providers(entries: RegistryFile, endpoints: Mapping[str, str]) -> RegistryFile | None:
    """A registry the demo made on an earlier run, with its providers at this run's
    ``endpoints``; None when it already has them there. Nothing else changes: a grant given
    or revoked, a request made or answered, stays as it was."""
    ours = {SERVICES[a]: [endpoint] for a, endpoint in endpoints.items()}
    if all(ours.get(s.name, s.endpoints) == s.endpoints for s in entries.service):
        return None
    moved = [
        s.model_copy(update={"endpoints": ours[s.name]}) if s.name in ours else s
        for s in entries.service
    ]
    return entries.model_copy(update={"service": moved})


def ensure_registry(cfg: BrokerConfig, endpoints: Mapping[str, str]) -> str:
    """The demo's registry in the database ``cfg`` names, as a version committed by
    ``tabadol demo``: the demo's exchange on the first run, and on later runs the registry
    as it was left, with the providers moved to this run's ports. Returns its URL."""
    if cfg.registry.url is None:
        raise TabadolError(
            f"{cfg.path}: [registry] url is not set: the demo's registry is a database"
        )
    store = open_registry(cfg.registry.url)
    try:
        current = store.current()
        if current is None:
            entries = demo_entries(endpoints)
            reason = (
                "the demo's exchange: four agencies, their services and the grants between them"
            )
        else:
            label = f"registry version {current.number} of {store.where}"
            found = moved_providers(parse_entries(current.entries, label), endpoints)
            if found is None:
                return cfg.registry.url
            entries, reason = found, "the demo's providers started on new ports"
        config_module.apply_entries(cfg, entries, "the demo's registry entries")  # as a file's
        data = entries_data(entries)
        store.commit(data, DEMO_AUTHOR, reason, digest(data))
    finally:
        store.close()
    return cfg.registry.url


async def send_traffic(
    broker_address: str,
    pki_dir: Path,
    rng: random.Random,
    tracers: Mapping[str, TracerProvider | None],
) -> list[str]:
    """One exchange of every RPC kind, plus two that the platform refuses; returns a report."""
    report: list[str] = []

    def channel(agency: str) -> grpc.aio.Channel:
        return connect(
            broker_address, pki_dir / "agencies" / agency, tracer_provider=tracers[agency]
        )

    async def attempt(
        label: str, action: Callable[[], Awaitable[str]], granted: str | None = None
    ) -> None:
        """``granted``: the label when it succeeds, if that is news."""
        try:
            report.append(f"  {'OK':<17} {granted or label}: {await action()}")
        except grpc.aio.AioRpcError as e:
            report.append(f"  {e.code().name:<17} {label}: {e.details()}")

    person = sample_person(rng)
    birth = date_pb2.Date(
        year=person.birth_date.year, month=person.birth_date.month, day=person.birth_date.day
    )
    async with (
        channel("post") as post,
        channel("tax") as tax,
        channel("nocr") as nocr,
        channel("cra") as cra,
    ):
        registry_for_post = nocr_grpc.PersonRegistryStub(post)

        async def inquire() -> str:
            found = await registry_for_post.InquirePerson(
                nocr_pb.InquirePersonRequest(national_id=person.national_id, birth_date=birth),
                timeout=5,
            )
            return f"{found.first_name} {found.last_name}, born in {found.birth_place}"

        async def verify_batch() -> str:
            people = [sample_person(rng) for _ in range(5)]
            queries = [
                nocr_pb.VerifyPersonRequest(
                    reference=f"q{i}",
                    national_id=p.national_id,
                    birth_date=date_pb2.Date(
                        year=p.birth_date.year, month=p.birth_date.month, day=p.birth_date.day
                    ),
                )
                for i, p in enumerate(people)
            ]
            queries.append(nocr_pb.VerifyPersonRequest(reference="bad", national_id="0012345678"))
            call = nocr_grpc.PersonRegistryStub(tax).VerifyPeople(iter(queries), timeout=10)
            verdicts = [nocr_pb.Verdict.Name(r.verdict) async for r in call]
            return f"{len(verdicts)} verdicts: {', '.join(verdicts)}"

        async def lookup() -> str:
            address = await post_grpc.AddressDirectoryStub(tax).LookupPostalCode(
                post_pb.LookupPostalCodeRequest(postal_code=sample_postal_code(rng)), timeout=5
            )
            return f"{address.postal_code}: {address.street}, {address.city}"

        async def list_addresses() -> str:
            call = post_grpc.AddressDirectoryStub(nocr).ListAddresses(
                post_pb.ListAddressesRequest(
                    region=post_pb.Region(province="Fars", city="Shiraz"), max_results=250
                ),
                timeout=10,
            )
            count = sum([1 async for _ in call])
            return f"{count} addresses streamed for Shiraz"

        async def match_mobile() -> str:
            result = await cra_grpc.MobileOwnershipStub(tax).MatchMobile(
                cra_pb.MatchMobileRequest(national_id=person.national_id, mobile=person.mobile),
                timeout=5,
            )
            return cra_pb.MatchResult.Name(result.result)

        async def submit() -> str:
            invoices = [sample_invoice(rng) for _ in range(20)]
            receipt = await tax_grpc.InvoiceRegistryStub(post).SubmitInvoices(
                iter(invoices), timeout=10
            )
            return f"receipt {receipt.receipt_id[:8]}: {receipt.accepted_count} accepted"

        async def bad_national_id() -> str:
            await registry_for_post.InquirePerson(
                nocr_pb.InquirePersonRequest(national_id="0012345678", birth_date=birth), timeout=5
            )
            return "unexpectedly accepted"

        async def not_granted() -> str:
            call = post_grpc.AddressDirectoryStub(cra).ListAddresses(
                post_pb.ListAddressesRequest(
                    region=post_pb.Region(province="Tehran"), max_results=100
                ),
                timeout=5,
            )
            return f"{sum([1 async for _ in call])} addresses streamed for Tehran"

        await attempt("post -> nocr InquirePerson (unary)", inquire)
        await attempt("tax  -> nocr VerifyPeople (bidi stream)", verify_batch)
        await attempt("tax  -> post LookupPostalCode (unary)", lookup)
        await attempt("nocr -> post ListAddresses (server stream)", list_addresses)
        await attempt("tax  -> cra  MatchMobile (unary)", match_mobile)
        await attempt("post -> tax  SubmitInvoices (client stream)", submit)
        await attempt("post -> nocr InquirePerson with a bad check digit", bad_national_id)
        await attempt(
            "cra  -> post ListAddresses without a grant",
            not_granted,
            granted="cra  -> post ListAddresses, granted on request",
        )
    return report


_OPEN = (access_pb2.REQUEST_STATE_PENDING, access_pb2.REQUEST_STATE_AWAITING_OPERATOR)


async def ask_for_access(
    broker_address: str, pki_dir: Path
) -> access_pb2.AccessRequest | access_pb2.Grant:
    """The consumer's open request of ``REQUEST``, made through the Access service with its
    own certificate unless one is open already; or the grant it holds, once approved."""
    consumer, provider, method, purpose, reference = REQUEST
    service = SERVICES[provider]
    async with connect(broker_address, pki_dir / "agencies" / consumer) as channel:
        access = access_pb2_grpc.AccessStub(channel)
        held = await access.ListGrants(
            access_pb2.ListGrantsRequest(service=service, consumer=consumer), timeout=10
        )
        for grant in held.grants:
            if not grant.expired and {method, "*"} & set(grant.methods):
                return grant
        listed = await access.ListRequests(
            access_pb2.ListRequestsRequest(service=service), timeout=10
        )
        for request in listed.requests:
            if request.consumer == consumer and request.state in _OPEN:
                return request
        made = await access.RequestAccess(
            access_pb2.RequestAccessRequest(
                service=service,
                methods=[method],
                purpose=access_pb2.Purpose(text=purpose, reference=reference),
            ),
            timeout=10,
        )
        return made.request


def access_block(
    asked: access_pb2.AccessRequest | access_pb2.Grant | str,
    broker_address: str,
    root: Path,
    contracts: Path,
) -> list[str]:
    """What to do with the request: the commands that approve it, then the call it allows
    (``asked``: the request, the grant it became, or why it could not be made)."""
    consumer, provider, method, purpose, reference = REQUEST
    if isinstance(asked, str):
        return [f"{consumer} could not ask {provider} for access to {method}: {asked}"]
    as_provider = ["--broker", broker_address, "--credentials", str(_credentials(root, provider))]
    call = shlex.join(
        [
            ".venv/bin/tabadol", "call", "--broker", broker_address,
            "--credentials", str(_credentials(root, consumer)), "--contracts", str(contracts),
            f"{SERVICES[provider]}/{method}",
            '{"region": {"province": "Tehran", "city": "Tehran"}, "max_results": 3}',
        ]
    )  # fmt: skip
    if isinstance(asked, access_pb2.Grant):
        return [
            f"{consumer}'s request for {provider}'s {method} was approved on an earlier run "
            f"(grant {asked.id}); its call:\n",
            f"  {call}",
        ]
    return [
        f"An access request awaits you, as the {AGENCY_NAMES[provider]}: {consumer} asks for "
        f'{method},\nfor "{purpose}" ({reference}).\nSee it and approve it:\n',
        "  " + shlex.join([".venv/bin/tabadol", "access", "list", "requests", *as_provider]),
        "  " + shlex.join([".venv/bin/tabadol", "access", "approve", asked.id, *as_provider]),
        f"\nThen the call refused above succeeds, as {consumer}:\n",
        f"  {call}",
    ]


def _credentials(root: Path, agency: str) -> Path:
    return root / "pki" / "agencies" / agency


def example_call(
    broker_address: str, root: Path, contracts: Path, person_id: str, birth: str
) -> str:
    y, m, d = birth.split("/")
    body = f'{{"national_id": "{person_id}", "birth_date": {{"year": {int(y)}, "month": {int(m)}, "day": {int(d)}}}}}'
    argv = [
        ".venv/bin/tabadol",
        "call",
        "--broker",
        broker_address,
        "--credentials",
        str(_credentials(root, "post")),
        "--contracts",
        str(contracts),
        "tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson",
        body,
    ]
    return shlex.join(argv)


def example_curl(gateway_url: str, root: Path, person_id: str, birth: str) -> str:
    """The same inquiry over REST/JSON, as an agency's web application makes it: curl with
    the post's certificate, verifying the broker's certificate by the name it dials."""
    y, m, d = birth.split("/")
    query = f"birth_date.year={int(y)}&birth_date.month={int(m)}&birth_date.day={int(d)}"
    url = f"{gateway_url}/v1/people/{person_id}?{query}"
    held = _credentials(root, "post")
    argv = [
        "curl",
        "--cacert",
        str(root / "pki" / "ca.crt"),
        "--cert",
        str(held / "agency.crt"),
        "--key",
        str(held / "agency.key"),
        url,
    ]
    return shlex.join(argv)


def _gateway_url(listen: str, port: int) -> str:
    """How to reach the HTTP entry: by ``localhost`` (a name the demo's broker certificate
    has) when it listens on a loopback or wildcard address, else by its host."""
    host = listen.rpartition(":")[0]
    if host.strip("[]") in ("", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost"):
        host = "localhost"
    return f"https://{host}:{port}"


def _agency_tracers(otlp: str, pki_dir: Path) -> dict[str, TracerProvider | None]:
    """One tracer provider per agency, so each shows as its own service in the viewer; each
    exports over mTLS with the agency's own certificate, as the collector requires."""
    tracers: dict[str, TracerProvider | None] = {}
    for agency in AGENCIES:
        built = tracer_provider(
            agency,
            service_name=agency,
            otlp_endpoint=f"https://{otlp}",
            credentials=pki_dir / "agencies" / agency,
        )
        tracers[agency] = built[0] if built else None
    return tracers


async def run_demo(
    root: Path,
    *,
    listen: str,
    contracts: Path,
    ops_http: str,
    ops_otlp: str,
    metrics_listen: str = "127.0.0.1:9464",
    gateway_listen: str = "127.0.0.1:8443",
    traffic_every: float = 30.0,
    once: bool = False,
) -> None:
    """Start everything, send traffic, print where things are, and run until stopped.

    ``root`` and ``contracts`` are absolute paths (see `prepare`)."""
    pki_dir = root / "pki"
    ensure_pki(pki_dir)
    trust = OpsTrust.load(pki_dir, TRUST_DOMAIN)
    ops = OpsServer(root / "ops" / "traces.db", trust=trust, http=ops_http, otlp=ops_otlp)
    await ops.start()
    tracers = _agency_tracers(ops.otlp_address, pki_dir)
    providers: dict[str, ProviderServer] = {}
    broker: Broker | None = None
    try:
        for agency, register in AGENCIES.items():
            provider = ProviderServer(
                pki_dir / "agencies" / agency, tracer_provider=tracers[agency]
            )
            register(provider.server)
            await provider.start()
            providers[agency] = provider

        config_path = root / "demo.toml"
        config_path.write_text(
            demo_config(
                listen, pki_dir, contracts, ops.otlp_address, metrics_listen, gateway_listen
            )
        )
        cfg = config_module.load(config_path)
        registry_url = ensure_registry(cfg, {a: p.address for a, p in providers.items()})
        broker = Broker(cfg)
        await broker.start()
        # `kill -HUP`: a renewal or revocation reaches the demo as it reaches a real broker.
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, _reload, broker, config_path, ops.trust
        )
        ops.show_ledger(open_accounts(config_path))
        broker_address = f"{listen.rsplit(':', 1)[0]}:{broker.port}"
        gateway_url = _gateway_url(gateway_listen, broker.gateway_port)
        for provider in providers.values():
            provider.follow_broker(broker_address)  # revoked broker certificates, refused
        rng = random.Random()
        report = await send_traffic(broker_address, pki_dir, rng, tracers)
        try:
            asked: access_pb2.AccessRequest | access_pb2.Grant | str
            asked = await ask_for_access(broker_address, pki_dir)
        except grpc.aio.AioRpcError as e:
            asked = f"{e.code().name}: {e.details()}"
        person = sample_person(rng)
        print("Tabadol demo is running.\n")
        print(f"  broker       {broker_address}  (config {config_path})")
        print(
            f"  gateway      {gateway_url}  (Connect and REST/JSON; GET /openapi.json: what "
            "you may call)"
        )
        for agency, provider in providers.items():
            print(f"  {agency:<12} {provider.address}  provides {SERVICES[agency]}")
        print(f"  PKI          {pki_dir}  (agency credentials in {pki_dir / 'agencies'}/<id>/)")
        try:
            console = ops.login_link("operator", DEMO_PERSON)
            how = "a one-time login link, valid 15 minutes"
        except TabadolError:
            console = ops.http_url  # not loopback: certificates only
            how = "log in with a client certificate"
        print(f"  ops console  {console}")
        print(f"               ({how}; OTLP/gRPC collector on {ops.otlp_address})")
        print(
            f"               (or import {pki_dir / 'operators' / DEMO_PERSON} or "
            f"{pki_dir / 'auditors' / DEMO_PERSON} into your browser)"
        )
        metrics_url = f"https://{metrics_listen.rsplit(':', 1)[0]}:{broker.metrics.port}/metrics"
        scraper = pki_dir / "operators" / DEMO_PERSON  # operators and auditors only
        print(f"  metrics      {metrics_url}")
        print(
            f"               (curl --cacert {pki_dir / 'ca.crt'} --cert {scraper / 'operator.crt'}"
            f" --key {scraper / 'operator.key'} {metrics_url})"
        )
        history = f".venv/bin/tabadol registry history --config {config_path}"
        print(f"  registry     {sqlite_path(registry_url)}  (audit trail: {history})")
        print(f"  ledger       {broker.config.ledger.path}")
        print("\nSample traffic through the broker:")
        print("\n".join(report))
        print("\nTry a call yourself, as the National Post asking the civil registry:\n")
        example = example_call(
            broker_address, root, contracts, person.national_id, str(person.birth_date)
        )
        print(f"  {example}")
        print("\nor over REST/JSON, as a web application would (docs/gateway.md):\n")
        curl = example_curl(gateway_url, root, person.national_id, str(person.birth_date))
        print(f"  {curl}")
        print(f"\nThen find it in the ops console: {ops.http_url}/search?service=post\n")
        print("\n".join(access_block(asked, broker_address, root, contracts)))
        print("\nPress Ctrl-C to stop.", flush=True)
        if not once:
            await _keep_running(broker_address, pki_dir, rng, tracers, traffic_every)
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if broker is not None:
            await broker.stop(1)
        for provider in providers.values():
            await provider.stop(1)
        for tracer in tracers.values():
            if tracer is not None:
                await asyncio.to_thread(tracer.shutdown)
        await ops.stop()


def _reload(broker: Broker, config_path: Path, trust: OpsTrust) -> None:
    """SIGHUP: the broker's configuration and CRL from the demo's file, and the CRL for the
    ops console; each logs what it did."""
    reload_from_file(broker, config_path)
    try:
        trust.refresh_crl(force=True)
    except TabadolError as e:
        log.error("the ops console kept its CRL: %s", e)


async def _keep_running(
    broker_address: str,
    pki_dir: Path,
    rng: random.Random,
    tracers: Mapping[str, TracerProvider | None],
    traffic_every: float,
) -> None:
    """Until SIGINT or SIGTERM; a round of traffic every ``traffic_every`` seconds (0: none)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), traffic_every if traffic_every > 0 else None)
        except TimeoutError:
            await send_traffic(broker_address, pki_dir, rng, tracers)
