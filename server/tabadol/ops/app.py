"""The viewer's HTTP side: a Jaeger-compatible JSON API and the web UI (static, offline)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tabadol.ops import jaeger
from tabadol.ops.dashboard import Accounts, dashboard
from tabadol.ops.model import KIND_NAMES
from tabadol.ops.query import trace_query, window_ns
from tabadol.ops.store import SpanStore
from tabadol.reports import Quarter, build_quarterly, render_csv, render_html, render_json

STATIC = Path(__file__).parent / "static"
DEFAULT_DEPENDENCY_LOOKBACK_MS = 3600 * 1000


def _params(request: Request) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        params.setdefault(key, []).append(value)
    return params


def create_app(
    store: SpanStore,
    now_ns: Callable[[], int] = time.time_ns,
    accounts: Accounts | None = None,
) -> Starlette:
    """The viewer's web application over a span store, and over the ledger when given
    (``app.state.accounts``; it may also be set after start)."""

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

    def ledger(request: Request) -> Accounts:
        found: Accounts | None = request.app.state.accounts
        if found is None:
            raise LookupError(
                "this trace viewer has no ledger: start it with `tabadol ops --config "
                "broker.toml` to see the dashboard and the quarterly reports"
            )
        return found

    async def dashboard_api(request: Request) -> Response:
        accounts = ledger(request)
        now = dt.datetime.fromtimestamp(now_ns() / 1e9, dt.UTC)
        return JSONResponse(await call(dashboard, accounts, now))

    async def reports_api(request: Request) -> Response:
        ledger(request)
        current = Quarter.containing(dt.datetime.fromtimestamp(now_ns() / 1e9, dt.UTC))
        quarters = [current]
        for _ in range(7):
            quarters.append(quarters[-1].previous())
        data = [{"quarter": str(q), "period": q.period, "months": q.months} for q in quarters]
        return JSONResponse(jaeger.envelope(data, total=len(data)))

    async def report(request: Request) -> Response:
        accounts = ledger(request)
        quarter = Quarter.parse(request.path_params["quarter"])
        built = await call(build_quarterly, accounts.config, accounts.store, quarter)
        fmt = request.path_params["fmt"]
        if fmt == "html":
            return HTMLResponse(render_html(built))
        if fmt == "csv":
            return Response(render_csv(built), media_type="text/csv; charset=utf-8")
        if fmt == "json":
            return Response(render_json(built), media_type="application/json")
        raise ValueError(f"unknown report format {fmt!r}; expected html, csv or json")

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse(jaeger.error_envelope(404, str(exc)), status_code=404)

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
        Route("/api/tabadol/dashboard", dashboard_api),
        Route("/api/tabadol/reports", reports_api),
        Route("/reports/quarterly-{quarter}.{fmt}", report),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/", index),
        Route("/search", index),
        Route("/trace/{trace_id}", index),
        Route("/dependencies", index),
        Route("/dashboard", index),
        Route("/reports", index),
    ]
    app = Starlette(
        routes=routes, exception_handlers={ValueError: bad_request, LookupError: not_found}
    )
    app.state.accounts = accounts
    return app
