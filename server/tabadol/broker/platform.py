"""The services the broker answers itself: discovery, reflection and health.

Discovery and reflection answer from the live registry and the caller's certificate: each
agency sees the contracts of the services it may call, and only their names otherwise.
Health follows the providers' reachability. All three answer declared agencies only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tabadol.admission import Now, Refused, admit_platform
from tabadol.broker.forward import GRPC_CODES
from tabadol.broker.proxy import Proxy, peer_certificate
from tabadol.broker.upstream import Upstream
from tabadol.catalogue import Catalogue
from tabadol.contracts import RpcKind
from tabadol.gateway.http_rules import Binding, RestRoutes
from tabadol.gateway.openapi import openapi_document
from tabadol.platform.v1 import discovery_pb2, discovery_pb2_grpc
from tabadol.revocation import RevocationList

log = logging.getLogger("tabadol.broker")

Context = grpc.aio.ServicerContext[Any, Any]
_DISCOVERY = discovery_pb2.DESCRIPTOR.services_by_name["Discovery"].full_name + "/"
_KINDS = {
    RpcKind.UNARY: discovery_pb2.RPC_KIND_UNARY,
    RpcKind.SERVER_STREAMING: discovery_pb2.RPC_KIND_SERVER_STREAMING,
    RpcKind.CLIENT_STREAMING: discovery_pb2.RPC_KIND_CLIENT_STREAMING,
    RpcKind.BIDI_STREAMING: discovery_pb2.RPC_KIND_BIDI_STREAMING,
}


async def declared_caller(proxy: Proxy, context: Context, method: str) -> str:
    """The calling agency, if its certificate proves it and the registry declares it;
    UNAUTHENTICATED or PERMISSION_DENIED otherwise (``tabadol.admission.admit_platform``)."""
    decision = admit_platform(
        peer_certificate(context), method, proxy.rules, Now(time.time(), time.monotonic())
    )
    if isinstance(decision, Refused):
        await refuse(proxy, context, decision)
    return decision.agency


async def refuse(proxy: Proxy, context: Context, refused: Refused) -> NoReturn:
    """Answer a call to the broker's own services with its refusal: logged (throttled),
    counted, and the status the consumer reads."""
    if refused.warning is not None:
        key, message, args = refused.warning
        proxy.refusals.warn(key, message, *args)
    proxy.metrics.refused.labels(refused.counted).inc()
    await context.abort(GRPC_CODES[refused.code], refused.details, refused.trailers)


class AgencyReflection(reflection_pb2_grpc.ServerReflectionServicer):
    """Standard gRPC server reflection, showing each caller the services it may call."""

    def __init__(self, current: Callable[[], Proxy]) -> None:
        self._current = current

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterator[reflection_pb2.ServerReflectionRequest],
        context: Context,
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        method = "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        await declared_caller(self._current(), context, method)
        async for request in request_iterator:
            # Judged again for every request, by the configuration and CRL of the moment: a
            # stream opened before a revocation or a grant's removal does not outlive it.
            proxy = self._current()
            agency = await declared_caller(proxy, context, method)
            yield reflect(proxy.catalogue_for(agency), request)


def reflect(
    catalogue: Catalogue, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    def files(name: str | None) -> reflection_pb2.ServerReflectionResponse:
        if name is None:
            return not_found()
        return reflection_pb2.ServerReflectionResponse(
            original_request=request,
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=[fd.SerializeToString() for fd in catalogue.closure(name)]
            ),
        )

    def not_found() -> reflection_pb2.ServerReflectionResponse:
        return reflection_pb2.ServerReflectionResponse(
            original_request=request,
            error_response=reflection_pb2.ErrorResponse(
                error_code=grpc.StatusCode.NOT_FOUND.value[0], error_message="not found"
            ),
        )

    which = request.WhichOneof("message_request")
    if which == "list_services":
        return reflection_pb2.ServerReflectionResponse(
            original_request=request,
            list_services_response=reflection_pb2.ListServiceResponse(
                service=[reflection_pb2.ServiceResponse(name=s) for s in catalogue.services()]
            ),
        )
    if which == "file_by_filename":
        name = request.file_by_filename
        return files(name if catalogue.visible_file(name) else None)
    if which == "file_containing_symbol":
        return files(catalogue.file_of(request.file_containing_symbol))
    return not_found()  # extensions: Tabadol contracts declare none


def callable_paths(proxy: Proxy, agency: str) -> list[str]:
    """The method paths the agency may call now, of the services the exchange routes, sorted."""
    paths = []
    for path in sorted(proxy.rules.policy.allowed_paths(agency, time.time())):
        method = proxy.contracts.method(path)
        if method is not None and method.service in proxy.config.services:
            paths.append(path)
    return paths


class OpenAPIDocuments:
    """Each caller's OpenAPI document as JSON (``tabadol.gateway.openapi``), built once per
    configuration and set of methods allowed: callers with the same grants share one."""

    _KEPT = 256  # documents kept per configuration, at most

    def __init__(self, url: Callable[[], str | None] = lambda: None) -> None:
        self._url = url  # the HTTP entry's, for the documents' servers; None without one
        self._proxy: Proxy | None = None
        self._routes: tuple[tuple[str, Binding], ...] = ()
        self._built: dict[tuple[tuple[str, ...], str | None], bytes] = {}

    def __call__(
        self,
        proxy: Proxy,
        routes: RestRoutes | None,
        agency: str,
        paths: Iterable[str] | None = None,
    ) -> bytes:
        """The document of the methods ``agency`` may call (of ``paths`` only, if given)."""
        self._follow(proxy, routes)
        allowed = tuple(paths if paths is not None else callable_paths(proxy, agency))
        url = self._url()
        built = self._built.get((allowed, url))
        if built is None:
            document = openapi_document(proxy.contracts, self._routes, allowed, server_url=url)
            built = json.dumps(document, indent=2, ensure_ascii=False).encode()
            if len(self._built) >= self._KEPT:
                self._built.clear()
            self._built[(allowed, url)] = built
        return built

    def _follow(self, proxy: Proxy, routes: RestRoutes | None = None) -> None:
        if proxy is self._proxy:
            return
        if routes is None:  # the contracts' rules were checked when the configuration loaded
            routes = RestRoutes.from_contracts(proxy.contracts)
        self._proxy, self._built = proxy, {}
        self._routes = tuple(routes.routes())


class Discovery(discovery_pb2_grpc.DiscoveryServicer):
    """ListAgencies, ListServices, ListMethods, AllowedMethods, GetContract, GetOpenAPI,
    GetRevocationList."""

    def __init__(
        self,
        current: Callable[[], Proxy],
        revocations: Callable[[], RevocationList | None] = lambda: None,
        openapi: OpenAPIDocuments | None = None,
    ) -> None:
        self._current = current
        self._revocations = revocations
        self._openapi = openapi if openapi is not None else OpenAPIDocuments()

    async def GetRevocationList(
        self, request: discovery_pb2.GetRevocationListRequest, context: Context
    ) -> discovery_pb2.GetRevocationListResponse:
        # Providers fetch it: declared agencies.
        await declared_caller(self._current(), context, _DISCOVERY + "GetRevocationList")
        crl = self._revocations()
        if crl is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "Tabadol broker: no CRL loaded")
        return discovery_pb2.GetRevocationListResponse(crl_der=crl.der, number=crl.number)

    def _methods(self, proxy: Proxy, agency: str, service: str) -> list[discovery_pb2.Method]:
        contract = proxy.contracts.services[service]
        now = time.time()
        fd = proxy.contracts.files[contract.file]
        prefix = f"{fd.package}." if fd.package else ""
        declared = next(s for s in fd.service if prefix + s.name == service)
        return [
            discovery_pb2.Method(
                name=m.name,
                kind=_KINDS[contract.methods[m.name].kind],
                input_type=m.input_type.lstrip("."),
                output_type=m.output_type.lstrip("."),
                allowed=proxy.rules.policy.allows(agency, contract.methods[m.name].path, now),
            )
            for m in declared.method
        ]

    async def _routed(self, proxy: Proxy, service: str, context: Context) -> None:
        if service not in proxy.config.services:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"the exchange routes no service {service!r}"
            )

    async def ListAgencies(
        self, request: discovery_pb2.ListAgenciesRequest, context: Context
    ) -> discovery_pb2.ListAgenciesResponse:
        proxy = self._current()
        await declared_caller(proxy, context, _DISCOVERY + "ListAgencies")
        return discovery_pb2.ListAgenciesResponse(
            agencies=[
                discovery_pb2.Agency(id=a.id, name=a.name)
                for a in sorted(proxy.config.agencies.values(), key=lambda a: a.id)
            ]
        )

    async def ListServices(
        self, request: discovery_pb2.ListServicesRequest, context: Context
    ) -> discovery_pb2.ListServicesResponse:
        proxy = self._current()
        agency = await declared_caller(proxy, context, _DISCOVERY + "ListServices")
        services = []
        for name in sorted(proxy.config.services):
            package = name.rpartition(".")[0]
            services.append(
                discovery_pb2.Service(
                    name=name,
                    provider=proxy.config.services[name].provider,
                    package=package,
                    version=package.rpartition(".")[2],
                    methods=self._methods(proxy, agency, name),
                )
            )
        return discovery_pb2.ListServicesResponse(services=services)

    async def ListMethods(
        self, request: discovery_pb2.ListMethodsRequest, context: Context
    ) -> discovery_pb2.ListMethodsResponse:
        proxy = self._current()
        agency = await declared_caller(proxy, context, _DISCOVERY + "ListMethods")
        await self._routed(proxy, request.service, context)
        return discovery_pb2.ListMethodsResponse(
            methods=self._methods(proxy, agency, request.service)
        )

    async def AllowedMethods(
        self, request: discovery_pb2.AllowedMethodsRequest, context: Context
    ) -> discovery_pb2.AllowedMethodsResponse:
        proxy = self._current()
        agency = await declared_caller(proxy, context, _DISCOVERY + "AllowedMethods")
        allowed = []
        for path in callable_paths(proxy, agency):
            method = proxy.contracts.method(path)
            assert method is not None  # callable_paths keeps the contracts' methods only
            allowed.append(
                discovery_pb2.AllowedMethod(
                    service=method.service, method=method.name, kind=_KINDS[method.kind]
                )
            )
        return discovery_pb2.AllowedMethodsResponse(agency=agency, methods=allowed)

    async def GetOpenAPI(
        self, request: discovery_pb2.GetOpenAPIRequest, context: Context
    ) -> discovery_pb2.GetOpenAPIResponse:
        proxy = self._current()
        agency = await declared_caller(proxy, context, _DISCOVERY + "GetOpenAPI")
        paths = callable_paths(proxy, agency)
        if request.service:
            await self._routed(proxy, request.service, context)
            paths = [p for p in paths if p.startswith(f"/{request.service}/")]
            if not paths:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"Tabadol broker: agency {agency!r} has no grant for any method of service "
                    f"{request.service!r}; ask its provider "
                    f"{proxy.config.services[request.service].provider!r} for a grant",
                )
        document = self._openapi(proxy, None, agency, paths)
        return discovery_pb2.GetOpenAPIResponse(json=document.decode())

    async def GetContract(
        self, request: discovery_pb2.GetContractRequest, context: Context
    ) -> descriptor_pb2.FileDescriptorSet:
        proxy = self._current()
        agency = await declared_caller(proxy, context, _DISCOVERY + "GetContract")
        await self._routed(proxy, request.service, context)
        if request.service not in proxy.catalogue_for(agency).visible:
            # Its name is no secret (ListServices names it), its contract is.
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Tabadol broker: agency {agency!r} has no grant for service "
                f"{request.service!r}, so it may not read its contract; ask its provider "
                f"{proxy.config.services[request.service].provider!r} for a grant",
            )
        catalogue = Catalogue(proxy.contracts.files, [request.service])
        file = proxy.contracts.services[request.service].file
        return descriptor_pb2.FileDescriptorSet(file=catalogue.closure(file))


class AgencyHealth(HealthServicer):
    """The standard health service, answering only identified agencies the registry declares:
    to anyone else the exchange's health is not theirs to watch."""

    def __init__(self, current: Callable[[], Proxy]) -> None:
        super().__init__()
        self._current = current

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        await declared_caller(self._current(), context, "grpc.health.v1.Health/Check")
        answer: health_pb2.HealthCheckResponse = await super().Check(request, context)
        return answer

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        await declared_caller(self._current(), context, "grpc.health.v1.Health/Watch")
        await super().Watch(request, context)


class ProviderHealth:
    """grpc.health.v1.Health: "" for the broker, and each routed service by its providers.

    Every ``interval`` seconds each provider endpoint gets an active check: the standard
    health Check (a provider without the health service counts as healthy once it answers
    at all). Unhealthy endpoints get no calls while another is healthy. A service is SERVING
    while one of its endpoints is healthy, NOT_SERVING when none is.
    """

    def __init__(self, current: Callable[[], Proxy], interval: float = 2.0) -> None:
        self.servicer = AgencyHealth(current)
        self._current = current
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._known: dict[str, int] = {}

    async def start(self) -> None:
        await self.servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.refresh()
        self._task = asyncio.create_task(self._poll())

    async def _check(self, upstream: Upstream) -> None:
        try:
            stub: Any = health_pb2_grpc.HealthStub(upstream.channel)  # the stubs type it sync
            answer = await stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=min(self._interval, 5.0)
            )
            healthy = answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as e:
            healthy = e.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)
        if healthy != upstream.health.healthy:
            log.warning(
                "provider %s endpoint %s is %s",
                upstream.provider,
                upstream.endpoint,
                "healthy again" if healthy else "failing its health check",
            )
        upstream.health.healthy = healthy

    async def refresh(self) -> None:
        proxy = self._current()
        upstreams = {u for us in proxy.upstreams_by_service.values() for u in us}
        await asyncio.gather(*(self._check(u) for u in upstreams))
        for service, serving in proxy.upstreams_by_service.items():
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if any(u.health.healthy for u in serving)
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            if self._known.get(service) != status:
                self._known[service] = status
                await self.servicer.set(service, status)
        for gone in set(self._known) - set(proxy.upstreams_by_service):
            del self._known[gone]
            await self.servicer.set(gone, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:
                log.exception("health check of the providers failed; trying again")

    async def stop(self) -> None:
        await self.servicer.enter_graceful_shutdown()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def register(
    server: grpc.aio.Server,
    current: Callable[[], Proxy],
    interval: float = 2.0,
    revocations: Callable[[], RevocationList | None] = lambda: None,
    openapi: OpenAPIDocuments | None = None,
) -> ProviderHealth:
    """Add the platform services to the broker's server (before the proxy's catch-all)."""
    discovery_pb2_grpc.add_DiscoveryServicer_to_server(
        Discovery(current, revocations, openapi), server
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
        AgencyReflection(current), server
    )
    health = ProviderHealth(current, interval)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    return health
