"""``tabadol access``: agencies and operators manage who may call what through the broker's
Access service, each with its own certificate (docs/access.md).

The broker decides who the caller is from the certificate and applies every rule; this
command carries the request and shows the answer: lines for people, or with ``--json`` the
answer's proto3 JSON for machines. A refusal is the broker's status and message on one
line, exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabadol.errors import TabadolError

if TYPE_CHECKING:
    import grpc.aio
    from google.protobuf.timestamp_pb2 import Timestamp

    from tabadol.platform.v1 import access_pb2

STATES = ("pending", "awaiting_operator", "approved", "rejected", "withdrawn")
_FROM_NOW = re.compile(r"([1-9][0-9]{0,4})([dh])")
_NEVER = "never"

Render = Callable[[Any], str]


# -- the caller's certificate and the channel ------------------------------------------------


def _operator_credentials(directory: Path) -> tuple[bytes, bytes, bytes, str]:
    """ca.crt, operator.crt, operator.key of an operator's directory, and the trust domain
    its certificate names (the broker's TLS name is ``broker.<trust-domain>``)."""
    from cryptography import x509

    from tabadol.client.credentials import read_bundle
    from tabadol.identity import spiffe_ids

    ca_pem, cert_pem, key_pem = read_bundle(directory, "operator")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise TabadolError(f"{directory / 'operator.crt'}: not a certificate: {e}") from e
    for spiffe_id in spiffe_ids(cert):
        trust_domain, _, path = spiffe_id.removeprefix("spiffe://").partition("/")
        role, _, name = path.partition("/")
        if role == "operator" and name and trust_domain:
            return ca_pem, cert_pem, key_pem, trust_domain
    raise TabadolError(
        f"{directory / 'operator.crt'}: carries no spiffe://.../operator/<name> identity"
    )


def open_channel(broker: str, credentials: Path) -> grpc.aio.Channel:
    """A channel to the broker with an agency's credentials, as `tabadol call` opens it, or
    an operator's (``broker`` may list nodes separated by commas: the first that answers)."""
    import grpc
    import grpc.aio

    from tabadol.client import connect
    from tabadol.client.nodes import BrokerAddressError, broker_target
    from tabadol.protocol import KEEPALIVE_DIAL
    from tabadol.spiffe import broker_dns_name

    addresses = broker.split(",")
    try:
        if (credentials / "agency.crt").exists():
            return connect(addresses, credentials)
        if not (credentials / "operator.crt").exists():
            raise TabadolError(
                f"{credentials}: holds neither agency.crt (an agency's credentials) nor "
                "operator.crt (an operator's): give the directory that `tabadol pki issue "
                "--agency ID` or `--operator NAME` wrote"
            )
        ca_pem, cert_pem, key_pem, trust_domain = _operator_credentials(credentials)
        target = broker_target(addresses)
    except BrokerAddressError as e:
        raise TabadolError(f"--broker: {e}") from e
    return grpc.aio.secure_channel(
        target.uri,
        grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem),
        options=[("grpc.ssl_target_name_override", broker_dns_name(trust_domain)), *KEEPALIVE_DIAL],
    )


def refusal(broker: str, code: str, details: str) -> str:
    """The broker's status and message on one line; when the broker was not reached, its
    address."""
    from tabadol.describe import printable

    message = "; ".join(line.strip() for line in details.splitlines() if line.strip())
    if not message.startswith("Tabadol broker:") and code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        message = f"cannot reach the broker at {broker}: {message}"
    return f"{code}: {printable(message)}"


def _run(
    args: argparse.Namespace,
    method: str,
    request: Any,
    render: Render,
    kept: Callable[[Any], Any] | None = None,
) -> int:
    """Call ``method`` of the Access service and print its answer (``kept`` of it, as text
    or JSON alike), or the refusal (exit 1)."""
    import grpc.aio
    from google.protobuf import json_format

    from tabadol.platform.v1 import access_pb2_grpc

    async def ask() -> Any:
        async with open_channel(args.broker, args.credentials) as channel:
            stub = access_pb2_grpc.AccessStub(channel)
            return await getattr(stub, method)(request, timeout=args.timeout)

    try:
        answer = asyncio.run(ask())
    except grpc.aio.AioRpcError as e:
        print(f"tabadol: {refusal(args.broker, e.code().name, e.details() or '')}", file=sys.stderr)
        return 1
    if kept is not None:
        answer = kept(answer)
    if args.json:
        print(json.dumps(json_format.MessageToDict(answer), indent=2, ensure_ascii=False))
    else:
        print(render(answer), end="")
    return 0


# -- reading what people type -----------------------------------------------------------------


def expiry(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``--expires``: ``90d`` or ``12h`` from now; a date (its 00:00 in Asia/Tehran, the
    exchange's days); or an ISO date-time (Asia/Tehran unless it names its zone)."""
    from tabadol.ledger.rollup import DAY_ZONE

    if found := _FROM_NOW.fullmatch(text):
        unit = "days" if found[2] == "d" else "hours"
        return (now or dt.datetime.now(dt.UTC)) + dt.timedelta(**{unit: int(found[1])})
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give 90d or 12h (from now), a date such as 2027-03-20 "
            "(its 00:00 in Asia/Tehran) or an ISO date-time such as 2027-03-20T12:00:00Z"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=DAY_ZONE)


def _timestamp(moment: dt.datetime | None) -> Timestamp | None:
    from google.protobuf.timestamp_pb2 import Timestamp

    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(dt.UTC))
    return stamp


def _whole(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {high}")
        return int(text)

    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0")
    return value


# -- showing the answers (pure) ----------------------------------------------------------------


def when(stamp: Timestamp) -> str:
    """A time of the registry, in the exchange's zone with its offset."""
    from tabadol.ledger.rollup import DAY_ZONE

    return f"{stamp.ToDatetime(dt.UTC).astimezone(DAY_ZONE):%Y-%m-%d %H:%M:%S %z}"


def _methods(methods: Iterable[str]) -> str:
    listed = list(methods)
    return "every method" if "*" in listed else ", ".join(listed)


def _purpose(purpose: access_pb2.Purpose) -> str:
    return f"{purpose.text} ({purpose.reference})" if purpose.reference else purpose.text


def _expires(grant: access_pb2.Grant) -> str:
    if not grant.HasField("expires_at"):
        return _NEVER
    return f"{when(grant.expires_at)}{' (expired)' if grant.expired else ''}"


def _state(request: access_pb2.AccessRequest) -> str:
    from tabadol.platform.v1 import access_pb2

    return access_pb2.RequestState.Name(request.state).removeprefix("REQUEST_STATE_").lower()


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, the last one left as it is; every cell made
    safe to print (it is the agencies' text)."""
    from tabadol.describe import printable

    cells = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]])
        for row in cells
    ]
    return "".join(line.rstrip() + "\n" for line in lines)


def grants_text(answer: access_pb2.ListGrantsResponse) -> str:
    if not answer.grants:
        return f"no grants to show (registry version {answer.registry_version})\n"
    rows = [("GRANT", "CONSUMER", "PROVIDER", "SERVICE", "METHODS", "EXPIRES", "PURPOSE")]
    rows += [
        (
            g.id,
            g.consumer,
            g.provider,
            g.service,
            _methods(g.methods),
            _expires(g),
            _purpose(g.purpose),
        )
        for g in answer.grants
    ]
    return (
        table(rows) + f"{len(answer.grants)} grant(s), registry version {answer.registry_version}\n"
    )


def request_text(r: access_pb2.AccessRequest) -> str:
    """A request in a few lines: what is asked, why, and what became of it."""
    from tabadol.describe import printable

    lines = [
        f"{r.id}  {_state(r)}  {r.consumer!r} asks {r.provider or '?'!r} for "
        f"{_methods(r.methods)} of {r.service}",
        f"    purpose: {_purpose(r.purpose)}",
        f"    requested {when(r.requested_at)} by {r.requested_by}"
        + (f"; expiry asked: {when(r.expires_at)}" if r.HasField("expires_at") else ""),
    ]
    if r.provider_approved_by:
        lines.append(f"    approved by the provider: {r.provider_approved_by}")
    if _state(r) in ("approved", "rejected", "withdrawn") and r.decided_by:
        lines.append(
            f"    {_state(r)} {when(r.decided_at)} by {r.decided_by}"
            + (f": {r.reason}" if r.reason else "")
        )
    if r.grant_id:
        lines.append(f"    grant: {r.grant_id}")
    return "".join(printable(line) + "\n" for line in lines)


def requests_text(answer: access_pb2.ListRequestsResponse) -> str:
    shown = list(answer.requests)
    if not shown:
        return f"no requests to show (registry version {answer.registry_version})\n"
    blocks = "\n".join(request_text(r) for r in shown)
    return blocks + f"\n{len(shown)} request(s), registry version {answer.registry_version}\n"


def audit_text(answer: access_pb2.ListAuditEntriesResponse) -> str:
    from tabadol.describe import printable

    if not answer.entries:
        return "no registry versions to show\n"
    lines = []
    for entry in answer.entries:
        lines.append(f"version {entry.version}  {when(entry.at)}  {entry.actor}")
        lines.append(f"  {entry.reason or '(no reason given)'}")
        lines += [f"  {change}" for change in entry.changes]
    if answer.more:
        lines.append(f"more follow: --after {answer.entries[-1].version}")
    return "".join(printable(line) + "\n" for line in lines)


def _version(version: int) -> str:
    return f" (registry version {version})"


def _grant_line(lead: str, g: access_pb2.Grant) -> str:
    from tabadol.describe import printable

    until = f" until {when(g.expires_at)}" if g.HasField("expires_at") else ""
    return printable(
        f"{lead}: {g.consumer!r} may call {_methods(g.methods)} of {g.service}"
        f"{until}; purpose: {_purpose(g.purpose)}"
    )


# -- the commands --------------------------------------------------------------------------------


def _cmd_request(args: argparse.Namespace) -> int:
    from tabadol.platform.v1 import access_pb2 as pb

    request = pb.RequestAccessRequest(
        service=args.service,
        methods=args.method,
        purpose=pb.Purpose(text=args.purpose, reference=args.reference),
        expires_at=_timestamp(args.expires),
    )

    def render(answer: pb.RequestAccessResponse) -> str:
        return (
            request_text(answer.request)
            + f"requested{_version(answer.registry_version)}; the provider approves or "
            "rejects it: follow it with `tabadol access list requests`\n"
        )

    return _run(args, "RequestAccess", request, render)


def _cmd_list(args: argparse.Namespace) -> int:
    from tabadol.platform.v1 import access_pb2 as pb

    if args.what == "grants":
        if args.state is not None:
            raise TabadolError("--state is for `tabadol access list requests`: grants have none")
        request = pb.ListGrantsRequest(service=args.service, consumer=args.consumer)
        return _run(args, "ListGrants", request, grants_text)
    state = f"REQUEST_STATE_{(args.state or 'unspecified').upper()}"
    asked = pb.ListRequestsRequest(service=args.service, state=state)

    def of_the_consumer(answer: pb.ListRequestsResponse) -> pb.ListRequestsResponse:
        if args.consumer:
            shown = [r for r in answer.requests if r.consumer == args.consumer]
            del answer.requests[:]
            answer.requests.extend(shown)
        return answer

    return _run(args, "ListRequests", asked, requests_text, of_the_consumer)


def _cmd_approve(args: argparse.Namespace) -> int:
    from tabadol.platform.v1 import access_pb2 as pb

    request = pb.ApproveRequestRequest(
        request_id=args.request_id, expires_at=_timestamp(args.expires)
    )

    def render(answer: pb.ApproveRequestResponse) -> str:
        if answer.HasField("grant"):
            return (
                _grant_line(
                    f"approved request {args.request_id} as grant {answer.grant.id}", answer.grant
                )
                + _version(answer.registry_version)
                + "\n"
            )
        return (
            request_text(answer.request)
            + f"approved by the provider{_version(answer.registry_version)}; {answer.request.service} "
            "is sensitive: an operator approves it too before it becomes a grant\n"
        )

    return _run(args, "ApproveRequest", request, render)


def _cmd_reject(args: argparse.Namespace) -> int:
    from tabadol.platform.v1 import access_pb2 as pb

    request = pb.RejectRequestRequest(request_id=args.request_id, reason=args.reason)
    return _run(
        args,
        "RejectRequest",
        request,
        lambda a: request_text(a.request) + f"rejected{_version(a.registry_version)}\n",
    )


def _cmd_withdraw(args: argparse.Namespace) -> int:
    from tabadol.platform.v1 import access_pb2 as pb

    request = pb.WithdrawRequestRequest(request_id=args.request_id, reason=args.reason)
    return _run(
        args,
        "WithdrawRequest",
        request,
        lambda a: request_text(a.request) + f"withdrawn{_version(a.registry_version)}\n",
    )


def _cmd_grant(args: argparse.Namespace) -> int:
    from tabadol.platform.v1 import access_pb2 as pb

    request = pb.GrantAccessRequest(
        consumer=args.consumer,
        service=args.service,
        methods=args.method,
        purpose=pb.Purpose(text=args.purpose, reference=args.reference),
        expires_at=_timestamp(args.expires),
    )

    def render(answer: pb.GrantAccessResponse) -> str:
        if answer.HasField("grant"):
            return (
                _grant_line(f"granted {answer.grant.id}", answer.grant)
                + _version(answer.registry_version)
                + "\n"
            )
        return (
            request_text(answer.request)
            + f"{answer.request.service} is sensitive: the grant awaits an operator's "
            f"approval{_version(answer.registry_version)}\n"
        )

    return _run(args, "GrantAccess", request, render)


def _cmd_revoke(args: argparse.Namespace) -> int:
    from tabadol.describe import printable
    from tabadol.platform.v1 import access_pb2 as pb

    request = pb.RevokeAccessRequest(grant_id=args.grant_id, reason=args.reason)

    def render(answer: pb.RevokeAccessResponse) -> str:
        g = answer.grant
        revoked = f"revoked grant {g.id}: {g.consumer!r} on {_methods(g.methods)} of {g.service}"
        return (
            f"{printable(revoked)}{_version(answer.registry_version)}\n"
            "every broker node stops admitting its calls within the registry's propagation "
            "bound\n"
        )

    return _run(args, "RevokeAccess", request, render)


def _cmd_onboard(args: argparse.Namespace) -> int:
    from tabadol.describe import printable
    from tabadol.platform.v1 import access_pb2 as pb

    request = pb.OnboardAgencyRequest(id=args.agency, name=args.name, reason=args.reason)

    def render(answer: pb.OnboardAgencyResponse) -> str:
        declared = f"declared agency {args.agency!r} ({answer.spiffe_id})"
        return (
            f"{printable(declared)}{_version(answer.registry_version)}\n"
            "issue its certificate where the platform CA's key is, and hand the directory "
            f"to the agency over a secure channel:\n  {printable(answer.issue_certificate)}\n"
        )

    return _run(args, "OnboardAgency", request, render)


def _cmd_publish(args: argparse.Namespace) -> int:
    from tabadol.describe import printable
    from tabadol.platform.v1 import access_pb2 as pb

    contract = b""
    if args.contract is not None:
        try:
            contract = args.contract.read_bytes()
        except OSError as e:
            raise TabadolError(f"--contract {args.contract}: cannot read: {e.strerror}") from e
    request = pb.PublishServiceRequest(
        name=args.service,
        provider=args.provider,
        endpoints=args.endpoint,
        sensitive=args.sensitive,
        contract_public=args.contract_public,
        reason=args.reason,
        contract=contract,
    )

    def render(answer: pb.PublishServiceResponse) -> str:
        findings = "".join(f"contract: {printable(f)}\n" for f in answer.contract_findings)
        return findings + (
            f"published {args.service} by {args.provider!r} at {', '.join(args.endpoint)}"
            f"{_version(answer.registry_version)}\n"
        )

    return _run(args, "PublishService", request, render)


def _cmd_retire(args: argparse.Namespace) -> int:
    from tabadol.platform.v1 import access_pb2 as pb

    request = pb.RetireServiceRequest(name=args.service, reason=args.reason)

    def render(answer: pb.RetireServiceResponse) -> str:
        gone = ", ".join(answer.revoked_grants) or "none"
        return (
            f"retired {args.service}{_version(answer.registry_version)}; grants revoked with "
            f"it: {gone}\n"
        )

    return _run(args, "RetireService", request, render)


def _cmd_limit(args: argparse.Namespace) -> int:
    from tabadol.platform.v1 import access_pb2 as pb

    given = [args.rate, args.burst, args.concurrency]
    if args.clear and any(v is not None for v in given):
        raise TabadolError(
            "--clear removes the limit: give it without --rate, --burst or --concurrency"
        )
    if not args.clear and args.rate is None and args.concurrency is None:
        raise TabadolError("give --rate (and --burst), --concurrency, or --clear")
    request = pb.SetLimitRequest(
        consumer=args.consumer,
        service=args.service,
        rate=args.rate or 0,
        burst=args.burst or 0,
        concurrency=args.concurrency or 0,
        clear=args.clear,
        reason=args.reason,
    )
    scope = args.service or "all services"
    if args.clear:
        done = f"cleared the limit of {args.consumer!r} on {scope}"
    else:
        parts = [
            f"{args.rate:g} calls/s" if args.rate else "",
            f"burst {args.burst:g}" if args.burst else "",
            f"{args.concurrency} in flight" if args.concurrency else "",
        ]
        done = f"limited {args.consumer!r} on {scope} to {', '.join(p for p in parts if p)}"
    return _run(args, "SetLimit", request, lambda a: f"{done}{_version(a.registry_version)}\n")


def _cmd_audit(args: argparse.Namespace) -> int:
    from tabadol.platform.v1 import access_pb2 as pb

    request = pb.ListAuditEntriesRequest(after_version=args.after, limit=args.limit)
    return _run(args, "ListAuditEntries", request, audit_text)


# -- the parser ------------------------------------------------------------------------------------


def add_access_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tabadol access ...`` (docs/access.md)."""
    access = sub.add_parser(
        "access",
        help="request, grant, approve and revoke access through the broker (agencies, operators)",
        description="Manage who may call what, through the broker's Access service, with your "
        "own certificate: an agency's credentials directory (ca.crt, agency.crt, agency.key) "
        "or an operator's (ca.crt, operator.crt, operator.key). The broker decides who you are "
        "from the certificate and checks every rule; each change is a new registry version "
        "naming you, the action and its reason. A refusal prints the broker's status and "
        "message and exits 1 (docs/access.md).",
    )
    actions = access.add_subparsers(dest="access_command", required=True, metavar="ACTION")

    def action(
        name: str, func: Callable[[argparse.Namespace], int], help: str, description: str
    ) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help, description=description)
        parser.add_argument(
            "--broker",
            required=True,
            help="broker address, e.g. 127.0.0.1:7443, or the nodes' IP addresses separated "
            "by commas",
        )
        parser.add_argument(
            "--credentials",
            type=Path,
            required=True,
            metavar="DIR",
            help="your agency's credentials directory, or an operator's (pki/operators/NAME)",
        )
        parser.add_argument(
            "--json", action="store_true", help="print the broker's answer as JSON (proto3 JSON)"
        )
        parser.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
        parser.set_defaults(func=func)
        return parser

    def methods(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--method",
            action="append",
            required=True,
            metavar="NAME",
            help="a method name of the service, e.g. InquirePerson (repeatable), or '*' for "
            "every method",
        )

    def purpose(parser: argparse.ArgumentParser, who: str) -> None:
        parser.add_argument(
            "--purpose",
            required=True,
            metavar="TEXT",
            help=f"the legal basis on which {who}, in words",
        )
        parser.add_argument(
            "--reference",
            default="",
            metavar="REF",
            help="the law or agreement, e.g. 'Postal Act art. 12': the provider receives it "
            "with every call the grant admits (x-tabadol-purpose)",
        )

    expires_help = (
        "when the grant stops admitting calls: 90d or 12h from now, a date such as 2027-03-20 "
        "(its 00:00 in Asia/Tehran) or an ISO date-time (Asia/Tehran unless it names its zone)"
    )

    req = action(
        "request",
        _cmd_request,
        help="ask a service's provider for access to some of its methods (agencies)",
        description="Ask the provider of SERVICE for access to its methods, as the agency "
        "whose credentials are given. The request is pending until the provider approves "
        "or rejects it (on a sensitive service, an operator approves it too); `list "
        "requests` follows it.",
    )
    req.add_argument("--service", required=True, help="the fully-qualified service name")
    methods(req)
    purpose(req, "your agency asks")
    req.add_argument(
        "--expires", type=expiry, metavar="WHEN", help="the expiry you ask for: " + expires_help
    )

    lst = action(
        "list",
        _cmd_list,
        help="the grants or the requests you may see",
        description="List grants (the default) or requests: an agency sees those on the "
        "services it provides and those it holds or made; an operator sees all of them.",
    )
    lst.add_argument("what", nargs="?", choices=["grants", "requests"], default="grants")
    lst.add_argument("--service", default="", help="only those on this service")
    lst.add_argument("--consumer", default="", metavar="AGENCY", help="only those of this consumer")
    lst.add_argument("--state", choices=STATES, help="requests only: only those in this state")

    approve = action(
        "approve",
        _cmd_approve,
        help="approve a pending request for a service you provide: it becomes a grant",
        description="Approve REQUEST_ID, a request for a service your agency provides (or, "
        "on a sensitive service, as an operator after the provider). The consumer may call "
        "the methods once every broker node has the new registry version, within seconds.",
    )
    approve.add_argument("request_id", metavar="REQUEST_ID")
    approve.add_argument(
        "--expires",
        type=expiry,
        metavar="WHEN",
        help=expires_help + " (default: the expiry asked for)",
    )

    reject = action(
        "reject",
        _cmd_reject,
        help="reject a pending request for a service you provide, with a reason",
        description="Reject REQUEST_ID, a request for a service your agency provides (or, "
        "as an operator, any request). The consumer sees the reason.",
    )
    reject.add_argument("request_id", metavar="REQUEST_ID")
    reject.add_argument("--reason", required=True, help="why (the consumer sees it)")

    grant = action(
        "grant",
        _cmd_grant,
        help="grant a consumer access to methods of a service you provide",
        description="Grant CONSUMER access to methods of SERVICE, which your agency "
        "provides (operators: any service). On a sensitive service an agency's grant "
        "becomes a request awaiting an operator's approval.",
    )
    grant.add_argument("--consumer", required=True, metavar="AGENCY", help="the consumer agency")
    grant.add_argument("--service", required=True, help="the fully-qualified service name")
    methods(grant)
    purpose(grant, "the consumer may call them")
    grant.add_argument(
        "--expires", type=expiry, metavar="WHEN", help=expires_help + " (default: never)"
    )

    revoke = action(
        "revoke",
        _cmd_revoke,
        help="revoke a grant on a service you provide, with a reason",
        description="Revoke GRANT_ID (see `list grants`), a grant on a service your agency "
        "provides. Every broker node stops admitting the calls it allowed within the "
        "registry's propagation bound. The reason is kept in the audit trail.",
    )
    revoke.add_argument("grant_id", metavar="GRANT_ID")
    revoke.add_argument("--reason", required=True, help="why (required; kept in the audit trail)")

    withdraw = action(
        "withdraw",
        _cmd_withdraw,
        help="withdraw a pending request your agency made",
        description="Withdraw REQUEST_ID, an open request your agency made.",
    )
    withdraw.add_argument("request_id", metavar="REQUEST_ID")
    withdraw.add_argument("--reason", default="", help="why, if you want to say")

    onboard = action(
        "onboard",
        _cmd_onboard,
        help="declare a new agency (operators)",
        description="Declare agency ID in the registry. Its certificate is then issued where "
        "the platform CA's key is, with the command this prints (`tabadol pki issue --agency "
        "ID`), and handed to the agency over a secure channel.",
    )
    onboard.add_argument(
        "--agency", required=True, metavar="ID", help="lower-case letters, digits and dashes"
    )
    onboard.add_argument("--name", required=True, help="the agency's name")
    onboard.add_argument("--reason", default="", help="why (kept in the audit trail)")

    publish = action(
        "publish",
        _cmd_publish,
        help="route a service of the loaded contracts to its provider's endpoints (operators)",
        description="Publish SERVICE (which the broker's loaded contracts must define) at its "
        "provider's endpoints, or change where it is routed. With --contract, the provider's "
        "contract as built must break none of the published contract's consumers "
        "(`tabadol contracts check`); the contract's lint findings are printed.",
    )
    publish.add_argument("--service", required=True, help="the fully-qualified service name")
    publish.add_argument("--provider", required=True, metavar="AGENCY", help="the provider agency")
    publish.add_argument(
        "--endpoint", action="append", required=True, metavar="HOST:PORT",
        help="a provider endpoint (repeatable)",
    )  # fmt: skip
    publish.add_argument(
        "--sensitive",
        action="store_true",
        help="grants on it need an operator's approval as well as the provider's",
    )
    publish.add_argument(
        "--contract-public",
        action="store_true",
        help="every declared agency may read its contract, granted or not",
    )
    publish.add_argument(
        "--contract",
        type=Path,
        metavar="FILE.pb",
        help="the provider's contract as built (a FileDescriptorSet), checked against the "
        "published one",
    )
    publish.add_argument("--reason", default="", help="why (kept in the audit trail)")

    retire = action(
        "retire",
        _cmd_retire,
        help="stop routing a service (operators)",
        description="Retire SERVICE: it is no longer routed, its grants and limits go with it "
        "and its open requests are rejected.",
    )
    retire.add_argument("--service", required=True, help="the fully-qualified service name")
    retire.add_argument("--reason", required=True, help="why (required; kept in the audit trail)")

    limit = action(
        "limit",
        _cmd_limit,
        help="set or clear a consumer's rate and concurrency limits (operators)",
        description="Set CONSUMER's limits, on one service or on all services together, "
        "replacing the ones it had there; or --clear them.",
    )
    limit.add_argument("--consumer", required=True, metavar="AGENCY", help="the consumer agency")
    limit.add_argument("--service", default="", help="the service (default: all services together)")
    limit.add_argument("--rate", type=_positive, metavar="N", help="calls per second")
    limit.add_argument("--burst", type=_positive, metavar="N", help="calls at once above the rate")
    limit.add_argument(
        "--concurrency", type=_whole(1, 2**31 - 1), metavar="N", help="calls in flight at once"
    )
    limit.add_argument("--clear", action="store_true", help="remove the limit instead")
    limit.add_argument("--reason", default="", help="why (kept in the audit trail)")

    audit = action(
        "audit",
        _cmd_audit,
        help="the audit trail: every registry version, who, when, why and what changed (operators)",
        description="Show registry versions oldest first: who committed each (a SPIFFE ID, or "
        "the user of `tabadol registry import`), when, the action and its reason, and each "
        "entry it changed. `tabadol registry verify` checks the trail's chain.",
    )
    audit.add_argument(
        "--after", type=_whole(0, 2**63 - 1), default=0, metavar="N", help="only versions above N"
    )
    audit.add_argument(
        "--limit",
        type=_whole(1, 1000),
        default=100,
        metavar="N",
        help="at most N versions (default 100)",
    )
