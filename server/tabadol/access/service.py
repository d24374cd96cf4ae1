"""``tabadol.platform.v1.Access`` on the broker: the wire side of ``AccessDesk``.

The caller is whoever its certificate proves (``admission.admit_access``): a declared agency
or an operator. A change answers once this node applies the version that holds it, so the
caller's next call already sees it here (it waits at most APPLIED_WAIT_S for that); other
nodes follow within the registry's bound.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp

from tabadol.access.desk import AccessDesk, AccessError, Actor, Outcome
from tabadol.admission import Now, Refused, admit_access
from tabadol.broker.forward import GRPC_CODES
from tabadol.broker.platform import refuse
from tabadol.broker.proxy import Proxy, peer_certificate
from tabadol.config import GrantEntry, RequestEntry, RequestState, grant_id
from tabadol.platform.v1 import access_pb2, access_pb2_grpc
from tabadol.status import Code

log = logging.getLogger("tabadol.broker")
Context = grpc.aio.ServicerContext[Any, Any]
_T = TypeVar("_T")
_ACCESS = access_pb2.DESCRIPTOR.services_by_name["Access"].full_name + "/"
APPLIED_WAIT_S = 5.0  # how long a change waits to see its version applied on this node

STATES: dict[RequestState, int] = {
    "pending": access_pb2.REQUEST_STATE_PENDING,
    "awaiting_operator": access_pb2.REQUEST_STATE_AWAITING_OPERATOR,
    "approved": access_pb2.REQUEST_STATE_APPROVED,
    "rejected": access_pb2.REQUEST_STATE_REJECTED,
    "withdrawn": access_pb2.REQUEST_STATE_WITHDRAWN,
}
_STATE_NAMES = {number: name for name, number in STATES.items()}


def _timestamp(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(dt.UTC))
    return stamp


def _time(message: Any, name: str) -> dt.datetime | None:
    if not message.HasField(name):
        return None
    try:
        return getattr(message, name).ToDatetime(dt.UTC)  # type: ignore[no-any-return]
    except (ValueError, OverflowError) as e:
        raise AccessError(Code.INVALID_ARGUMENT, f"{name}: {e}") from None


def grant_message(grant: GrantEntry, provider: str, now: dt.datetime) -> access_pb2.Grant:
    return access_pb2.Grant(
        id=grant_id(grant),
        consumer=grant.consumer,
        provider=provider,
        service=grant.service,
        methods=grant.methods,
        purpose=access_pb2.Purpose(
            text=grant.purpose or "", reference=grant.purpose_reference or ""
        ),
        expires_at=_timestamp(grant.expires_at),
        granted_by=grant.granted_by or "",
        granted_at=_timestamp(grant.granted_at),
        request_id=grant.request or "",
        expired=grant.expires_at is not None and grant.expires_at <= now,
    )


def request_message(request: RequestEntry, provider: str) -> access_pb2.AccessRequest:
    return access_pb2.AccessRequest(
        id=request.id,
        consumer=request.consumer,
        provider=provider,
        service=request.service,
        methods=request.methods,
        purpose=access_pb2.Purpose(text=request.purpose, reference=request.purpose_reference or ""),
        expires_at=_timestamp(request.expires_at),
        state=STATES[request.state],  # type: ignore[arg-type]
        requested_by=request.requested_by,
        requested_at=_timestamp(request.requested_at),
        decided_by=request.decided_by or "",
        decided_at=_timestamp(request.decided_at),
        reason=request.reason or "",
        grant_id=request.grant or "",
        provider_approved_by=request.provider_approved_by or "",
    )


class AccessService(access_pb2_grpc.AccessServicer):
    """Each call: who is asking (certificate), then the desk's rules, then the answer."""

    def __init__(
        self,
        current: Callable[[], Proxy],
        desk: Callable[[], AccessDesk],
        applied: Callable[[int, float], Awaitable[bool]],
    ) -> None:
        self._current = current
        self._desk = desk
        self._applied = applied

    async def _actor(self, context: Context, method: str) -> Actor:
        proxy = self._current()
        decision = admit_access(
            peer_certificate(context), _ACCESS + method, proxy.rules,
            Now(time.time(), time.monotonic()),
        )  # fmt: skip
        if isinstance(decision, Refused):
            await refuse(proxy, context, decision)
        role, name = decision
        trust_domain = proxy.config.broker.trust_domain
        return (
            Actor.agency(trust_domain, name)
            if role == "agency"
            else Actor.operator(trust_domain, name)
        )

    async def _run(self, context: Context, action: Callable[[], _T]) -> _T:
        try:
            return await asyncio.to_thread(action)
        except AccessError as e:
            await context.abort(GRPC_CODES[e.code], f"Tabadol broker: {e}")
            raise  # abort raises; this line is for the type checker

    async def _changed(
        self, context: Context, method: str, action: Callable[[AccessDesk, Actor], Outcome]
    ) -> Outcome:
        """The change ``action`` makes as the caller, once this node has applied it."""
        actor = await self._actor(context, method)
        desk = self._desk()
        outcome = await self._run(context, lambda: action(desk, actor))
        if not await self._applied(outcome.version, APPLIED_WAIT_S):
            # Committed all the same: answered, and the node catches up when it can.
            log.warning(
                "registry version %d (%s's %s) not applied on this node within %g s",
                outcome.version, actor, method, APPLIED_WAIT_S,
            )  # fmt: skip
        return outcome

    def _now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    async def ListGrants(
        self, request: access_pb2.ListGrantsRequest, context: Context
    ) -> access_pb2.ListGrantsResponse:
        actor = await self._actor(context, "ListGrants")
        desk = self._desk()
        snap, grants = await self._run(
            context, lambda: desk.grants(actor, request.service, request.consumer)
        )
        now = self._now()
        return access_pb2.ListGrantsResponse(
            grants=[grant_message(g, snap.provider_of(g.service), now) for g in grants],
            registry_version=snap.version,
        )

    async def ListRequests(
        self, request: access_pb2.ListRequestsRequest, context: Context
    ) -> access_pb2.ListRequestsResponse:
        actor = await self._actor(context, "ListRequests")
        desk = self._desk()
        state = _STATE_NAMES.get(request.state)
        snap, found = await self._run(context, lambda: desk.requests(actor, state, request.service))
        return access_pb2.ListRequestsResponse(
            requests=[request_message(r, snap.provider_of(r.service)) for r in found],
            registry_version=snap.version,
        )

    def _views(
        self, outcome: Outcome
    ) -> tuple[access_pb2.Grant | None, access_pb2.AccessRequest | None]:
        snap = outcome.snapshot  # as committed: nothing to read back, nothing to fail after
        grant = request = None
        if outcome.grant is not None:
            grant = grant_message(
                outcome.grant, snap.provider_of(outcome.grant.service), self._now()
            )
        if outcome.request is not None:
            request = request_message(outcome.request, snap.provider_of(outcome.request.service))
        return grant, request

    async def GrantAccess(
        self, request: access_pb2.GrantAccessRequest, context: Context
    ) -> access_pb2.GrantAccessResponse:
        outcome = await self._changed(
            context,
            "GrantAccess",
            lambda desk, actor: desk.grant(
                actor, request.consumer, request.service, list(request.methods),
                request.purpose.text, request.purpose.reference, _time(request, "expires_at"),
            ),
        )  # fmt: skip
        grant, pending = self._views(outcome)
        return access_pb2.GrantAccessResponse(
            grant=grant, request=pending, registry_version=outcome.version
        )

    async def RevokeAccess(
        self, request: access_pb2.RevokeAccessRequest, context: Context
    ) -> access_pb2.RevokeAccessResponse:
        outcome = await self._changed(
            context,
            "RevokeAccess",
            lambda desk, actor: desk.revoke(actor, request.grant_id, request.reason),
        )
        grant, _ = self._views(outcome)
        return access_pb2.RevokeAccessResponse(grant=grant, registry_version=outcome.version)

    async def RequestAccess(
        self, request: access_pb2.RequestAccessRequest, context: Context
    ) -> access_pb2.RequestAccessResponse:
        outcome = await self._changed(
            context,
            "RequestAccess",
            lambda desk, actor: desk.request(
                actor, request.service, list(request.methods), request.purpose.text,
                request.purpose.reference, _time(request, "expires_at"),
            ),
        )  # fmt: skip
        _, made = self._views(outcome)
        return access_pb2.RequestAccessResponse(request=made, registry_version=outcome.version)

    async def ApproveRequest(
        self, request: access_pb2.ApproveRequestRequest, context: Context
    ) -> access_pb2.ApproveRequestResponse:
        outcome = await self._changed(
            context,
            "ApproveRequest",
            lambda desk, actor: desk.approve(
                actor, request.request_id, _time(request, "expires_at")
            ),
        )
        grant, updated = self._views(outcome)
        return access_pb2.ApproveRequestResponse(
            request=updated, grant=grant, registry_version=outcome.version
        )

    async def RejectRequest(
        self, request: access_pb2.RejectRequestRequest, context: Context
    ) -> access_pb2.RejectRequestResponse:
        outcome = await self._changed(
            context,
            "RejectRequest",
            lambda desk, actor: desk.reject(actor, request.request_id, request.reason),
        )
        _, updated = self._views(outcome)
        return access_pb2.RejectRequestResponse(request=updated, registry_version=outcome.version)

    async def WithdrawRequest(
        self, request: access_pb2.WithdrawRequestRequest, context: Context
    ) -> access_pb2.WithdrawRequestResponse:
        outcome = await self._changed(
            context,
            "WithdrawRequest",
            lambda desk, actor: desk.withdraw(actor, request.request_id, request.reason),
        )
        _, updated = self._views(outcome)
        return access_pb2.WithdrawRequestResponse(request=updated, registry_version=outcome.version)

    async def OnboardAgency(
        self, request: access_pb2.OnboardAgencyRequest, context: Context
    ) -> access_pb2.OnboardAgencyResponse:
        outcome = await self._changed(
            context,
            "OnboardAgency",
            lambda desk, actor: desk.onboard(actor, request.id, request.name, request.reason),
        )
        trust_domain = self._current().config.broker.trust_domain
        return access_pb2.OnboardAgencyResponse(
            spiffe_id=Actor.agency(trust_domain, request.id).identity,
            issue_certificate=f"tabadol pki issue --dir PKI_DIR --agency {request.id}",
            registry_version=outcome.version,
        )

    async def PublishService(
        self, request: access_pb2.PublishServiceRequest, context: Context
    ) -> access_pb2.PublishServiceResponse:
        outcome = await self._changed(
            context,
            "PublishService",
            lambda desk, actor: desk.publish(
                actor, request.name, request.provider, list(request.endpoints),
                sensitive=request.sensitive, contract_public=request.contract_public,
                contract=request.contract, reason=request.reason,
            ),
        )  # fmt: skip
        return access_pb2.PublishServiceResponse(
            contract_findings=outcome.findings, registry_version=outcome.version
        )

    async def RetireService(
        self, request: access_pb2.RetireServiceRequest, context: Context
    ) -> access_pb2.RetireServiceResponse:
        outcome = await self._changed(
            context,
            "RetireService",
            lambda desk, actor: desk.retire(actor, request.name, request.reason),
        )
        return access_pb2.RetireServiceResponse(
            revoked_grants=outcome.revoked, registry_version=outcome.version
        )

    async def SetLimit(
        self, request: access_pb2.SetLimitRequest, context: Context
    ) -> access_pb2.SetLimitResponse:
        outcome = await self._changed(
            context,
            "SetLimit",
            lambda desk, actor: desk.set_limit(
                actor, request.consumer, request.service, rate=request.rate,
                burst=request.burst, concurrency=request.concurrency, clear=request.clear,
                reason=request.reason,
            ),
        )  # fmt: skip
        return access_pb2.SetLimitResponse(registry_version=outcome.version)

    async def ListAuditEntries(
        self, request: access_pb2.ListAuditEntriesRequest, context: Context
    ) -> access_pb2.ListAuditEntriesResponse:
        actor = await self._actor(context, "ListAuditEntries")
        desk = self._desk()
        entries, more = await self._run(
            context, lambda: desk.audit(actor, request.after_version, request.limit)
        )
        return access_pb2.ListAuditEntriesResponse(
            entries=[
                access_pb2.AuditEntry(
                    version=e.version,
                    at=_timestamp(e.at),
                    actor=e.actor,
                    reason=e.reason,
                    changes=[str(c) for c in e.changes],
                    digest=e.digest,
                    chain=e.chain,
                )
                for e in entries
            ],
            more=more,
        )
