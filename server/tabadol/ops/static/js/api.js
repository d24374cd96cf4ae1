// The viewer's JSON API. Every failure becomes an ApiError carrying the server's own message
// (errors[0].msg), because that message names what is wrong, e.g. which filter.

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
  }
}

async function getJSON(path, params, signal) {
  const url = new URL(path, location.origin);
  for (const [key, value] of new URLSearchParams(params ?? {})) {
    if (value !== '') url.searchParams.append(key, value);
  }
  return send(url, { signal, headers: { Accept: 'application/json' } });
}

/** A change: JSON, from this page's origin (the console refuses any other kind of POST). */
function postJSON(path, body, signal) {
  const url = new URL(path, location.origin);
  return send(url, {
    method: 'POST',
    signal,
    headers: { Accept: 'application/json', 'Content-Type': 'application/json' },
    body: JSON.stringify(body ?? {}),
  });
}

async function send(url, init) {
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new ApiError(`Cannot reach the trace viewer at ${url.origin}: ${error.message}`, 0);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's error page, say): fall through to the HTTP status below.
  }
  const message = body?.errors?.[0]?.msg;
  if (!response.ok || message) {
    throw new ApiError(message || `${url.pathname}: HTTP ${response.status} ${response.statusText}`, response.status);
  }
  return body;
}

/** Who the console sees: {role, name, via, expires, may: [families], label}. */
export function fetchWhoami(signal) {
  return getJSON('/api/tabadol/whoami', null, signal);
}

export async function fetchServices(signal) {
  return (await getJSON('/api/services', null, signal)).data ?? [];
}

export async function fetchOperations(service, signal) {
  return (await getJSON(`/api/services/${encodeURIComponent(service)}/operations`, null, signal)).data ?? [];
}

/** One page of trace summaries: {data, total, limit, offset}. */
export function searchTraces(params, signal) {
  return getJSON('/api/tabadol/search', params, signal);
}

export const traceJsonUrl = (traceId) => `/api/traces/${encodeURIComponent(traceId)}`;

export async function fetchTrace(traceId, signal) {
  return (await getJSON(traceJsonUrl(traceId), null, signal)).data[0];
}

/** Consumer agency → provider agency calls in [endTs - lookback, endTs], both in ms. */
export async function fetchAgencyCalls({ endTs, lookback }, signal) {
  return (await getJSON('/api/tabadol/agencies', { endTs, lookback }, signal)).data ?? [];
}

/** The ledger's figures for today, this quarter and all time (404 when the viewer has no ledger). */
export function fetchDashboard(signal) {
  return getJSON('/api/tabadol/dashboard', null, signal);
}

/** The quarters a report can be opened for, newest first: {quarter, months, period}. */
export async function fetchReports(signal) {
  return (await getJSON('/api/tabadol/reports', null, signal)).data ?? [];
}

/** A quarterly report as a page (html) or a download (csv, json). */
export const reportUrl = (quarter, format) => `/reports/quarterly-${encodeURIComponent(quarter)}.${format}`;

/** The viewer's grants and access requests, and the services and agencies to ask for or grant. */
export function fetchAccess(signal) {
  return getJSON('/api/tabadol/access', null, signal);
}

/** A page of the registry's audit trail, newest first; `before` a version number for older ones. */
export function fetchAudit(before, signal) {
  return getJSON('/api/tabadol/access/audit', { before: before ?? '' }, signal);
}

const ACCESS = '/api/tabadol/access';
const id = encodeURIComponent;

/** The changes the Access page makes; each answers {registryVersion, grant, request, revoked}. */
export const accessActions = {
  request: (body) => postJSON(`${ACCESS}/requests`, body),
  grant: (body) => postJSON(`${ACCESS}/grants`, body),
  approve: (request, body) => postJSON(`${ACCESS}/requests/${id(request)}/approve`, body),
  reject: (request, body) => postJSON(`${ACCESS}/requests/${id(request)}/reject`, body),
  withdraw: (request, body) => postJSON(`${ACCESS}/requests/${id(request)}/withdraw`, body),
  revoke: (grant, body) => postJSON(`${ACCESS}/grants/${id(grant)}/revoke`, body),
};
