"""The Access page's JSON API: grants, access requests and the audit trail, read and changed
through the access desk (``tabadol.access.desk``) as the viewer the gate let in.

The desk judges every action; here a viewer becomes the desk's actor, a JSON body the
desk's arguments, and the desk's answer or refusal JSON with an HTTP status. The desk is
synchronous (its stores are): each call runs in a worker thread.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tabadol.access.desk import AccessDesk, AccessError, Actor, AuditEntry, Outcome, Snapshot
from tabadol.config import OPEN_STATES, GrantEntry, RequestEntry, grant_id
from tabadol.gateway.wire import REST_STATUS
from tabadol.ops import jaeger
from tabadol.ops.access import ACCESS_API, AUDIT_API, Family, Viewer
from tabadol.status import Code

# The desk's refusals as HTTP statuses, as the HTTP entry maps them; a change that conflicts
# with the registry's state is 409 here (the page offers the action again once it may go).
HTTP_STATUS = REST_STATUS | {Code.FAILED_PRECONDITION: 409}
MAX_BODY_BYTES = 64 * 1024  # a request's purpose is at most 2000 characters
AUDIT_PAGE = 50


def actor_of(viewer: Viewer, trust_domain: str) -> Actor:
    """The desk's actor for a viewer: an agency or an operator, as the gate identified it."""
    if viewer.role == "agency":
        return Actor.agency(trust_domain, viewer.name)
    if viewer.role == "operator":
        return Actor.operator(trust_domain, viewer.name)
    raise AccessError(Code.PERMISSION_DENIED, f"{viewer} acts on no grant or request")


def status_of(e: AccessError) -> int:
    return HTTP_STATUS.get(e.code, 500)


def _time(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat() if value is not None else None


def grant_json(
    grant: GrantEntry, snap: Snapshot, viewer: Viewer, now: dt.datetime
) -> dict[str, Any]:
    provider = snap.provider_of(grant.service)
    revocable = viewer.role == "operator" or viewer.agency == provider
    return {
        "id": grant_id(grant),
        "consumer": grant.consumer,
        "provider": provider,
        "service": grant.service,
        "methods": grant.methods,
        "purpose": grant.purpose or "",
        "reference": grant.purpose_reference or "",
        "expiresAt": _time(grant.expires_at),
        "expired": grant.expires_at is not None and grant.expires_at <= now,
        "grantedBy": grant.granted_by or "",
        "grantedAt": _time(grant.granted_at),
        "request": grant.request or "",
        "actions": ["revoke"] if revocable else [],
    }


def request_actions(request: RequestEntry, snap: Snapshot, viewer: Viewer) -> list[str]:
    """The buttons a request's row offers this viewer; the desk judges each again."""
    if request.state not in OPEN_STATES:
        return []
    service = next((s for s in snap.entries.service if s.name == request.service), None)
    provider = service.provider if service is not None else ""
    sensitive = service is not None and service.sensitive
    actions = []
    if viewer.role == "operator":
        if request.state == "awaiting_operator" or not sensitive:
            actions.append("approve")
        actions.append("reject")
    elif viewer.agency == provider:
        if request.state == "pending":
            actions.append("approve")
        actions.append("reject")
    if viewer.agency == request.consumer:
        actions.append("withdraw")
    return actions


def request_json(request: RequestEntry, snap: Snapshot, viewer: Viewer) -> dict[str, Any]:
    return {
        "id": request.id,
        "consumer": request.consumer,
        "provider": snap.provider_of(request.service),
        "service": request.service,
        "methods": request.methods,
        "purpose": request.purpose,
        "reference": request.purpose_reference or "",
        "expiresAt": _time(request.expires_at),
        "state": request.state,
        "requestedBy": request.requested_by,
        "requestedAt": _time(request.requested_at),
        "decidedBy": request.decided_by or "",
        "decidedAt": _time(request.decided_at),
        "providerApprovedBy": request.provider_approved_by or "",
        "reason": request.reason or "",
        "grant": request.grant or "",
        "actions": request_actions(request, snap, viewer),
    }


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "version": entry.version,
        "at": _time(entry.at),
        "actor": entry.actor,
        "reason": entry.reason,
        "changes": [str(c) for c in entry.changes],
        "digest": entry.digest,
        "chain": entry.chain,
    }


def outcome_json(
    outcome: Outcome, snap: Snapshot, viewer: Viewer, now: dt.datetime
) -> dict[str, Any]:
    """What a change did, its rows read with the registry version that holds it."""
    return {
        "registryVersion": outcome.version,
        "grant": grant_json(outcome.grant, snap, viewer, now) if outcome.grant else None,
        "request": request_json(outcome.request, snap, viewer) if outcome.request else None,
        "revoked": list(outcome.revoked),
    }


# -- a change's JSON body ---------------------------------------------------------------------


def _invalid(message: str) -> AccessError:
    return AccessError(Code.INVALID_ARGUMENT, message)


def _text(body: dict[str, Any], name: str, required: bool = False) -> str:
    value = body.get(name, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise _invalid(f"{name}: expected a string, not {type(value).__name__}")
    if required and not value.strip():
        raise _invalid(f"{name} is required")
    return value.strip()


def _methods(body: dict[str, Any]) -> list[str]:
    value = body.get("methods")
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise _invalid('methods: expected a list of method names, e.g. ["Lookup"] or ["*"]')
    methods = [m.strip() for m in value if m.strip()]
    if not methods:
        raise _invalid('methods: name at least one method, or "*" for every method')
    return methods


def _expiry(body: dict[str, Any]) -> dt.datetime | None:
    value = _text(body, "expiresAt")
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise _invalid(
            f"expiresAt: {value!r} is not an ISO 8601 time, e.g. 2026-03-20T00:00:00Z"
        ) from None
    if when.tzinfo is None:
        raise _invalid(f"expiresAt: {value!r} has no time zone (add Z or +03:30)")
    return when


async def _body(request: Request) -> dict[str, Any]:
    """The JSON object a change sends (the gate has checked it is JSON from this origin)."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise _invalid(f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise _invalid("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    return body


# -- the routes -------------------------------------------------------------------------------


def access_routes(
    trust_domain: str,
    viewer_of: Callable[[Request], Viewer],
    now: Callable[[], dt.datetime],
) -> list[tuple[BaseRoute, Family]]:
    """The Access page's API, each route with the family the gate files it under."""

    def desk_of(request: Request) -> AccessDesk:
        found = getattr(request.app.state, "desk", None)
        if not isinstance(found, AccessDesk):
            raise LookupError(
                "this console manages no access: start it with `tabadol ops --config "
                "broker.toml` to see grants and requests"
            )
        return found

    async def answer(work: Callable[[], dict[str, Any]]) -> Response:
        try:
            return JSONResponse(await run_in_threadpool(work))
        except AccessError as e:
            status = status_of(e)
            body = jaeger.error_envelope(status, str(e)) | {"code": e.code.name}
            return JSONResponse(body, status_code=status)

    async def overview(request: Request) -> Response:
        """The viewer's grants and requests, and what it needs to ask for or grant more."""
        desk, viewer = desk_of(request), viewer_of(request)

        def work() -> dict[str, Any]:
            actor = actor_of(viewer, trust_domain)
            snap, grants = desk.grants(actor)
            _, requests = desk.requests(actor)
            at = now()
            return {
                "registryVersion": snap.version,
                "changeable": desk.changeable,
                "grants": [grant_json(g, snap, viewer, at) for g in grants],
                "requests": [request_json(r, snap, viewer) for r in reversed(requests)],
                "services": [
                    {"name": s.name, "provider": s.provider, "sensitive": s.sensitive}
                    for s in sorted(snap.entries.service, key=lambda s: s.name)
                ],
                "agencies": [
                    {"id": a.id, "name": a.name}
                    for a in sorted(snap.entries.agency, key=lambda a: a.id)
                ],
            }

        return await answer(work)

    async def audit(request: Request) -> Response:
        """A page of the audit trail, newest first: below version ``before`` when given."""
        desk, viewer = desk_of(request), viewer_of(request)
        before = _number(request.query_params.get("before", ""), "before")

        def work() -> dict[str, Any]:
            head = desk.snapshot().version
            newest = min(before - 1, head) if before else head
            after = max(0, newest - AUDIT_PAGE)
            if viewer.role == "auditor":
                # The rights table lets auditors read the trail; they are no actor of the desk.
                entries, _ = desk.trail(after, AUDIT_PAGE)
            else:
                entries, _ = desk.audit(actor_of(viewer, trust_domain), after, AUDIT_PAGE)
            shown = [e for e in entries if e.version <= newest]
            return {
                "registryVersion": head,
                "entries": [audit_json(e) for e in reversed(shown)],
                "more": after > 0,
            }

        return await answer(work)

    def change(
        act: Callable[[AccessDesk, Actor, dict[str, Any], dict[str, str]], Outcome],
    ) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            desk, viewer = desk_of(request), viewer_of(request)
            try:
                body = await _body(request)
            except AccessError as e:
                return JSONResponse(
                    jaeger.error_envelope(status_of(e), str(e)), status_code=status_of(e)
                )
            params = {k: str(v) for k, v in request.path_params.items()}

            def work() -> dict[str, Any]:
                outcome = act(desk, actor_of(viewer, trust_domain), body, params)
                return outcome_json(outcome, outcome.snapshot, viewer, now())

            return await answer(work)

        return endpoint

    grant = change(
        lambda desk, actor, body, _: desk.grant(
            actor, _text(body, "consumer", True), _text(body, "service", True), _methods(body),
            _text(body, "purpose"), _text(body, "reference"), _expiry(body),
        )
    )  # fmt: skip
    revoke = change(
        lambda desk, actor, body, p: desk.revoke(actor, p["grant"], _text(body, "reason"))
    )
    ask = change(
        lambda desk, actor, body, _: desk.request(
            actor, _text(body, "service", True), _methods(body), _text(body, "purpose"),
            _text(body, "reference"), _expiry(body),
        )
    )  # fmt: skip
    approve = change(lambda desk, actor, body, p: desk.approve(actor, p["request"], _expiry(body)))
    reject = change(
        lambda desk, actor, body, p: desk.reject(actor, p["request"], _text(body, "reason"))
    )
    withdraw = change(
        lambda desk, actor, body, p: desk.withdraw(actor, p["request"], _text(body, "reason"))
    )
    return [
        (Route(ACCESS_API, overview), "access"),
        (Route(AUDIT_API, audit), "audit"),
        (Route(f"{ACCESS_API}/grants", grant, methods=["POST"]), "access"),
        (Route(f"{ACCESS_API}/grants/{{grant}}/revoke", revoke, methods=["POST"]), "access"),
        (Route(f"{ACCESS_API}/requests", ask, methods=["POST"]), "access"),
        (Route(f"{ACCESS_API}/requests/{{request}}/approve", approve, methods=["POST"]), "access"),
        (Route(f"{ACCESS_API}/requests/{{request}}/reject", reject, methods=["POST"]), "access"),
        (
            Route(f"{ACCESS_API}/requests/{{request}}/withdraw", withdraw, methods=["POST"]),
            "access",
        ),
    ]


def _number(value: str, name: str) -> int:
    if not value:
        return 0
    if not value.isdigit():
        raise ValueError(f"{name}: {value!r} is not a registry version number")
    return int(value)
