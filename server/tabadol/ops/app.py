"""The viewer's HTTP side: a Jaeger-compatible JSON API and the web UI (static, offline)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tabadol.ops import jaeger
from tabadol.ops.model import KIND_NAMES
from tabadol.ops.query import trace_query, window_ns
from tabadol.ops.store import SpanStore

STATIC = Path(__file__).parent / "static"
DEFAULT_DEPENDENCY_LOOKBACK_MS = 3600 * 1000


def _params(request: Request) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        params.setdefault(key, []).append(value)
    return params


def create_app(store: SpanStore, now_ns: Callable[[], int] = time.time_ns) -> Starlette:
    """The viewer's web application over a span store."""

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return await run_in_threadpool(fn, *args)

    async def bad_request(request: Request, exc: Exception) -> Response:
        return JSONResponse(jaeger.error_envelope(400, str(exc)), status_code=400)

    async def services(request: Request) -> Response:
        names = await call(store.services)
        return JSONResponse(jaeger.envelope(names, total=len(names)))

    async def service_operations(request: Request) -> Response:
        ops = await call(store.operations, request.path_params["service"])
        names = sorted({name for name, _ in ops})
        return JSONResponse(jaeger.envelope(names, total=len(names)))

    async def operations(request: Request) -> Response:
        service = request.query_params.get("service", "")
        kind = request.query_params.get("spanKind", "")
        ops = await call(store.operations, service)
        data = [
            {"name": name, "spanKind": KIND_NAMES.get(k, "unspecified")}
            for name, k in ops
            if not kind or KIND_NAMES.get(k) == kind
        ]
        return JSONResponse(jaeger.envelope(data, total=len(data)))

    async def traces(request: Request) -> Response:
        query = trace_query(_params(request), now_ns())
        summaries, total = await call(store.search, query)
        data = [jaeger.trace_json(await call(store.trace, s.trace_id)) for s in summaries]
        return JSONResponse(
            jaeger.envelope(data, total=total, limit=query.limit, offset=query.offset)
        )

    async def trace(request: Request) -> Response:
        trace_id = request.path_params["trace_id"].lower()
        spans = await call(store.trace, trace_id)
        if not spans:
            return JSONResponse(
                jaeger.error_envelope(404, f"trace {trace_id} not found"), status_code=404
            )
        return JSONResponse(jaeger.envelope([jaeger.trace_json(spans)], total=1))

    async def dependencies(request: Request) -> Response:
        start, end = window_ns(_params(request), now_ns(), DEFAULT_DEPENDENCY_LOOKBACK_MS)
        edges = await call(store.dependencies, start, end)
        return JSONResponse(jaeger.envelope(jaeger.dependencies_json(edges)))

    async def search(request: Request) -> Response:
        """Tabadol's search: one summary per trace, for the result list."""
        query = trace_query(_params(request), now_ns())
        summaries, total = await call(store.search, query)
        data = [
            {
                "traceID": s.trace_id,
                "startTime": s.start_ns // 1000,
                "duration": s.duration_ns // 1000,
                "spanCount": s.span_count,
                "errorCount": s.error_count,
                "rootService": s.root_service,
                "rootOperation": s.root_name,
                "services": list(s.services),
            }
            for s in summaries
        ]
        return JSONResponse(
            jaeger.envelope(data, total=total, limit=query.limit, offset=query.offset)
        )

    async def agencies(request: Request) -> Response:
        """Consumer agency -> provider agency, with call counts and error rates."""
        start, end = window_ns(_params(request), now_ns(), DEFAULT_DEPENDENCY_LOOKBACK_MS)
        edges = await call(store.agency_calls, start, end)
        data = [
            {
                "consumer": e.parent,
                "provider": e.child,
                "callCount": e.calls,
                "errorCount": e.errors,
                "errorRate": e.errors / e.calls if e.calls else 0.0,
            }
            for e in edges
        ]
        return JSONResponse(jaeger.envelope(data, total=len(data)))

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    routes = [
        Route("/api/services", services),
        Route("/api/services/{service:path}/operations", service_operations),
        Route("/api/operations", operations),
        Route("/api/traces", traces),
        Route("/api/traces/{trace_id}", trace),
        Route("/api/dependencies", dependencies),
        Route("/api/tabadol/search", search),
        Route("/api/tabadol/agencies", agencies),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/", index),
        Route("/search", index),
        Route("/trace/{trace_id}", index),
        Route("/dependencies", index),
    ]
    return Starlette(routes=routes, exception_handlers={ValueError: bad_request})
