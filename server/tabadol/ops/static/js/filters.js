// Search filters as data. The page URL carries exactly the API's query parameters, so a
// shared link reproduces the search and the URL is the one source of truth for the form.

export const PAGE_SIZE = 20;
export const DEFAULT_LOOKBACK = '1h';
export const LOOKBACKS = [
  ['15m', 'Last 15 minutes'],
  ['1h', 'Last hour'],
  ['6h', 'Last 6 hours'],
  ['24h', 'Last 24 hours'],
  ['7d', 'Last 7 days'],
];
export const GRPC_CODES = [
  'CANCELLED', 'UNKNOWN', 'INVALID_ARGUMENT', 'DEADLINE_EXCEEDED', 'NOT_FOUND', 'ALREADY_EXISTS',
  'PERMISSION_DENIED', 'RESOURCE_EXHAUSTED', 'FAILED_PRECONDITION', 'ABORTED', 'OUT_OF_RANGE',
  'UNIMPLEMENTED', 'INTERNAL', 'UNAVAILABLE', 'DATA_LOSS', 'UNAUTHENTICATED',
];

const UNIT_MS = { m: 60_000, h: 3_600_000, d: 86_400_000 };

/** '15m', '1h', '7d' in milliseconds. */
export function lookbackMs(lookback) {
  const match = /^(\d+)([mhd])$/.exec(lookback);
  if (!match) throw new Error(`${lookback} is not a time window such as 15m, 1h or 7d`);
  return Number(match[1]) * UNIT_MS[match[2]];
}

export function lookbackLabel(lookback) {
  return (LOOKBACKS.find(([value]) => value === lookback)?.[1] ?? `Last ${lookback}`).toLowerCase();
}

/** The filters a URL's query string describes. */
export function readFilters(params) {
  const get = (name) => params.get(name) ?? '';
  const start = get('start');
  const end = get('end');
  let lookback = get('lookback');
  // A Jaeger-style link with only start/end is a custom range.
  if (!lookback) lookback = start || end ? 'custom' : DEFAULT_LOOKBACK;
  return {
    service: get('service'),
    operation: get('operation'),
    status: get('status'),
    minDuration: get('minDuration'),
    maxDuration: get('maxDuration'),
    lookback,
    start,
    end,
    tags: get('tags'),
    offset: Math.max(0, Number.parseInt(get('offset'), 10) || 0),
  };
}

/** Query parameters for filters, used both in the page URL and for the API. */
export function filterParams(filters) {
  const params = new URLSearchParams();
  const put = (name, value) => {
    if (value !== undefined && value !== null && String(value).trim() !== '') params.set(name, String(value).trim());
  };
  put('service', filters.service);
  put('operation', filters.service ? filters.operation : '');
  put('status', filters.status);
  put('minDuration', filters.minDuration);
  put('maxDuration', filters.maxDuration);
  put('lookback', filters.lookback);
  // The API prefers start over lookback: send start/end only for a custom range.
  if (filters.lookback === 'custom') {
    put('start', filters.start);
    put('end', filters.end);
  }
  put('tags', filters.tags);
  if (filters.offset > 0) params.set('offset', String(filters.offset));
  return params;
}

/** The URL of a search, e.g. for a link from the dependency graph. */
export function searchUrl(filters) {
  const query = filterParams({ lookback: DEFAULT_LOOKBACK, ...filters }).toString();
  return query ? `/search?${query}` : '/search';
}

/**
 * `consumer=post provider=nocr` as the API's tags object. Values with spaces can be quoted:
 * `note="two words"`. Throws an Error naming the piece that is not key=value.
 */
export function parseAttributes(text) {
  const tags = {};
  const token = /\s*([^\s=]+)=(?:"([^"]*)"|(\S*))|\s*(\S+)/gy;
  let match;
  while ((match = token.exec(text)) !== null) {
    if (match[4] !== undefined) {
      throw new Error(`Attribute filter "${match[4]}" is not key=value (for example consumer=post)`);
    }
    tags[match[1]] = match[2] ?? match[3];
  }
  return tags;
}

/** The tags URL parameter (JSON, as Jaeger has it) back as `key=value` text for the input. */
export function formatAttributes(tagsParam) {
  if (!tagsParam) return '';
  let tags;
  try {
    tags = JSON.parse(tagsParam);
  } catch {
    return tagsParam; // shown as it is; the API will say what is wrong with it
  }
  if (tags === null || typeof tags !== 'object') return tagsParam;
  return Object.entries(tags)
    .map(([key, value]) => (/[\s"]/.test(String(value)) || value === '' ? `${key}="${value}"` : `${key}=${value}`))
    .join(' ');
}
