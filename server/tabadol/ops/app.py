"""The viewer's HTTP side: a Jaeger-compatible JSON API and the web UI (static, offline).

Every request first passes the gate (gate.py): Host, identity, rights, and for a change
its origin. The routes then show each viewer its share: an agency only its own traces,
ledger rows and assessment, and the grants and access requests it is a party to
(access_page.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from tabadol.ops import jaeger
from tabadol.ops.access import (
    RIGHTS,
    Family,
    Viewer,
    agency_view,
    family_of,
    own_edges,
    refuse_hidden_tags,
    trace_is_visible,
)
from tabadol.ops.access_page import access_routes
from tabadol.ops.dashboard import Accounts, dashboard
from tabadol.ops.gate import ConsoleAccess, Gate
from tabadol.ops.model import KIND_NAMES, SpanRecord, TraceQuery, TraceSummary
from tabadol.ops.query import trace_query, window_ns
from tabadol.ops.store import SpanStore, StoreUnavailable
from tabadol.reports import (
    Quarter,
    QuarterlyReport,
    build_quarterly,
    render_csv,
    render_html,
    render_json,
)

STATIC = Path(__file__).parent / "static"
DEFAULT_DEPENDENCY_LOOKBACK_MS = 3600 * 1000
REPORT_CACHE_SIZE = 32
REPORT_TYPES = {
    "html": "text/html; charset=utf-8",
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
}


def _params(request: Request) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        params.setdefault(key, []).append(value)
    return params


def viewer_of(request: Request) -> Viewer:
    """Who the gate let in; a route reached without the gate refuses to answer."""
    found = getattr(request.state, "viewer", None)
    if not isinstance(found, Viewer):
        raise PermissionError("no identity: the console's routes are served only behind its gate")
    return found


def agency_search(
    store: SpanStore, query: TraceQuery, agency: str
) -> tuple[list[TraceSummary], int]:
    """One page of the traces that are the agency's, and their total: those the broker's own
    spans name it consumer or provider in (the store's index of parties, kept at ingest,
    so no other sender's spans can hide an agency's traces or claim others' for it)."""
    refuse_hidden_tags(query.tags)
    return store.search(dataclasses.replace(query, party=agency))


def own_assessment(report: QuarterlyReport, agency: str) -> QuarterlyReport:
    """The quarterly report as one agency may see it: the national figures and its own
    figures and indicator, not the other agencies'."""
    return dataclasses.replace(
        report,
        agencies=tuple(a for a in report.agencies if a.id == agency),
        indicators=tuple(i for i in report.indicators if i.agency == agency),
    )


class ReportCache:
    """Rendered reports by what they depend on: quarter, format, the viewer's agency scope
    and the ledger's head (a new record makes a new key). Least recently used go first."""

    def __init__(self, size: int = REPORT_CACHE_SIZE) -> None:
        self._size = size
        self._items: OrderedDict[tuple[object, ...], str] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    def get(self, key: tuple[object, ...], build: Callable[[], str]) -> str:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        built = build()
        with self._lock:
            self.builds += 1
            self._items[key] = built
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return built


def create_app(
    store: SpanStore,
    access: ConsoleAccess,
    now_ns: Callable[[], int] = time.time_ns,
    accounts: Accounts | None = None,
) -> Starlette:
    """The viewer's web application over a span store, and over the ledger when given
    (``app.state.accounts``; it may also be set after start), behind the gate of ``access``.
    The Access page acts through ``app.state.desk``, set once the console knows its registry."""
    reports = ReportCache()

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return await run_in_threadpool(fn, *args)

    async def bad_request(request: Request, exc: Exception) -> Response:
        return JSONResponse(jaeger.error_envelope(400, str(exc)), status_code=400)

    # An agency's lists hold only what is in the traces it may see.
    async def services(request: Request) -> Response:
        names = await call(store.services, viewer_of(request).agency)
        return JSONResponse(jaeger.envelope(names, total=len(names)))

    async def service_operations(request: Request) -> Response:
        service = request.path_params["service"]
        ops = await call(store.operations, service, viewer_of(request).agency)
        names = sorted({name for name, _ in ops})
        return JSONResponse(jaeger.envelope(names, total=len(names)))

    async def operations(request: Request) -> Response:
        service = request.query_params.get("service", "")
        kind = request.query_params.get("spanKind", "")
        ops = await call(store.operations, service, viewer_of(request).agency)
        data = [
            {"name": name, "spanKind": KIND_NAMES.get(k, "unspecified")}
            for name, k in ops
            if not kind or KIND_NAMES.get(k) == kind
        ]
        return JSONResponse(jaeger.envelope(data, total=len(data)))

    def find(query: TraceQuery, viewer: Viewer) -> tuple[list[TraceSummary], int]:
        if viewer.agency is None:
            return store.search(query)
        return agency_search(store, query, viewer.agency)

    def shown(spans: list[SpanRecord], viewer: Viewer) -> list[SpanRecord]:
        """Spans as this viewer may see them: an agency without the exchange's addresses."""
        return spans if viewer.agency is None else agency_view(spans)

    async def traces(request: Request) -> Response:
        query = trace_query(_params(request), now_ns())
        viewer = viewer_of(request)
        summaries, total = await call(find, query, viewer)
        data = []
        for s in summaries:
            spans = await call(store.trace, s.trace_id)
            data.append(jaeger.trace_json(shown(spans, viewer)))
        return JSONResponse(
            jaeger.envelope(data, total=total, limit=query.limit, offset=query.offset)
        )

    async def trace(request: Request) -> Response:
        trace_id = request.path_params["trace_id"].lower()
        spans = await call(store.trace, trace_id)
        viewer = viewer_of(request)
        agency = viewer.agency
        if not spans or (agency is not None and not trace_is_visible(spans, agency)):
            # Another agency's trace is "not found", not "forbidden": its id stays secret.
            return JSONResponse(
                jaeger.error_envelope(404, f"trace {trace_id} not found"), status_code=404
            )
        return JSONResponse(jaeger.envelope([jaeger.trace_json(shown(spans, viewer))], total=1))

    async def dependencies(request: Request) -> Response:
        start, end = window_ns(_params(request), now_ns(), DEFAULT_DEPENDENCY_LOOKBACK_MS)
        edges = await call(store.dependencies, start, end)
        return JSONResponse(jaeger.envelope(jaeger.dependencies_json(edges)))

    async def search(request: Request) -> Response:
        """Tabadol's search: one summary per trace, for the result list."""
        query = trace_query(_params(request), now_ns())
        summaries, total = await call(find, query, viewer_of(request))
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
        agency = viewer_of(request).agency
        if agency is not None:
            edges = own_edges(edges, agency)
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

    async def whoami(request: Request) -> Response:
        """Who the console sees, and what they may open (the UI hides the rest)."""
        viewer = viewer_of(request)
        return JSONResponse(
            {
                "role": viewer.role,
                "name": viewer.name,
                "via": viewer.via,
                "expires": dt.datetime.fromtimestamp(viewer.expires_at, dt.UTC).isoformat(),
                "may": sorted(RIGHTS[viewer.role]),
                "label": str(viewer),
            }
        )

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
        return JSONResponse(await call(dashboard, accounts, now, viewer_of(request).agency))

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
        fmt = request.path_params["fmt"]
        if fmt not in REPORT_TYPES:
            raise ValueError(f"unknown report format {fmt!r}; expected html, csv or json")
        agency = viewer_of(request).agency

        def build() -> str:
            built = build_quarterly(accounts.config, accounts.store, quarter)
            if agency is not None:
                built = own_assessment(built, agency)
            if fmt == "html":
                return render_html(built)
            return render_csv(built) if fmt == "csv" else render_json(built)

        written = await call(accounts.store.records_count)  # a new record: a new report
        text = await call(reports.get, (str(quarter), fmt, agency, written), build)
        if fmt == "html":
            return HTMLResponse(text)
        return Response(text, media_type=REPORT_TYPES[fmt])

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse(jaeger.error_envelope(404, str(exc)), status_code=404)

    async def refused(request: Request, exc: Exception) -> Response:
        return JSONResponse(jaeger.error_envelope(401, str(exc)), status_code=401)

    async def unavailable(request: Request, exc: Exception) -> Response:
        return JSONResponse(jaeger.error_envelope(503, str(exc)), status_code=503)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    # Each path with the family the gate files it under (access.family_of): checked below,
    # so a new route cannot slip past the rights table under the wrong name.
    routes: list[tuple[BaseRoute, Family]] = [
        (Route("/api/services", services), "spans"),
        (Route("/api/services/{service:path}/operations", service_operations), "spans"),
        (Route("/api/operations", operations), "spans"),
        (Route("/api/traces", traces), "spans"),
        (Route("/api/traces/{trace_id}", trace), "spans"),
        (Route("/api/dependencies", dependencies), "service-graph"),
        (Route("/api/tabadol/search", search), "spans"),
        (Route("/api/tabadol/agencies", agencies), "spans"),
        (Route("/api/tabadol/whoami", whoami), "page"),
        (Route("/api/tabadol/dashboard", dashboard_api), "ledger"),
        (Route("/api/tabadol/reports", reports_api), "ledger"),
        (Route("/reports/quarterly-{quarter}.{fmt}", report), "ledger"),
        (Mount("/static", StaticFiles(directory=STATIC), name="static"), "page"),
        (Route("/", index), "page"),
        (Route("/search", index), "page"),
        (Route("/trace/{trace_id}", index), "page"),
        (Route("/dependencies", index), "page"),
        (Route("/dashboard", index), "page"),
        (Route("/reports", index), "page"),
        (Route("/access", index), "page"),
        *access_routes(
            access.trust.trust_domain,
            viewer_of,
            lambda: dt.datetime.fromtimestamp(now_ns() / 1e9, dt.UTC),
        ),
    ]
    for route, family in routes:
        path = str(getattr(route, "path", ""))
        example = re.sub(r"\{[^}]*\}", "x", path)
        if family_of(example) != family:
            raise AssertionError(f"route {path} is filed as {family_of(example)}, not {family}")
    app = Starlette(
        routes=[route for route, _ in routes],
        middleware=[Middleware(Gate, access=access)],
        exception_handlers={
            ValueError: bad_request,
            LookupError: not_found,
            PermissionError: refused,
            StoreUnavailable: unavailable,
        },
    )
    app.state.accounts = accounts
    app.state.reports = reports
    app.state.desk = None
    return app
