// A trace as a tree of spans, and its critical path. Pure: Jaeger JSON in, plain objects out,
// no DOM, so the rules here can be read (and checked) on their own.

function tagValue(tags, key) {
  return tags.find((tag) => tag.key === key)?.value;
}

function toSpan(raw, processes) {
  const tags = raw.tags ?? [];
  const parentRef = (raw.references ?? []).find((ref) => ref.refType === 'CHILD_OF') ?? raw.references?.[0];
  const process = processes[raw.processID] ?? { serviceName: 'unknown service', tags: [] };
  const errorTag = tagValue(tags, 'error');
  const statusCode = tagValue(tags, 'otel.status_code') ?? 'UNSET';
  const isError = statusCode === 'ERROR' || errorTag === true || errorTag === 'true';
  return {
    id: raw.spanID,
    parentId: parentRef?.spanID ?? '',
    service: process.serviceName,
    operation: raw.operationName,
    start: raw.startTime,
    duration: raw.duration,
    end: raw.startTime + raw.duration,
    kind: tagValue(tags, 'span.kind') ?? 'unspecified',
    isError,
    statusCode: isError ? 'ERROR' : statusCode,
    statusMessage: tagValue(tags, 'otel.status_description') ?? '',
    grpcCode: tagValue(tags, 'rpc.grpc.status_code'),
    tags,
    logs: raw.logs ?? [],
    process,
    warnings: raw.warnings ?? [],
    parent: null,
    children: [],
    depth: 0,
  };
}

const byStart = (a, b) => a.start - b.start || a.end - b.end;

/**
 * The trace as a tree. Spans whose parent never arrived become extra roots (the trace still
 * shows everything received); `spans` lists every span in display order (depth first).
 */
export function buildTrace(json) {
  const spans = (json.spans ?? []).map((raw) => toSpan(raw, json.processes ?? {}));
  const byId = new Map(spans.map((span) => [span.id, span]));
  for (const span of spans) {
    const parent = byId.get(span.parentId);
    if (parent && parent !== span) {
      span.parent = parent;
      parent.children.push(span);
    }
  }
  for (const span of spans) span.children.sort(byStart);

  const ordered = [];
  const visited = new Set();
  const walk = (root) => {
    const stack = [[root, 0]];
    while (stack.length) {
      const [span, depth] = stack.pop();
      if (visited.has(span)) continue;
      visited.add(span);
      span.depth = depth;
      ordered.push(span);
      for (let i = span.children.length - 1; i >= 0; i -= 1) stack.push([span.children[i], depth + 1]);
    }
  };
  // True roots first, then spans whose parent is missing, each group by start time.
  const roots = spans.filter((span) => !span.parent).sort((a, b) => (a.parentId ? 1 : 0) - (b.parentId ? 1 : 0) || byStart(a, b));
  roots.forEach(walk);
  // Malformed input can make a parent cycle that no root reaches: cut it so nothing is lost.
  for (const span of [...spans].sort(byStart)) {
    if (visited.has(span)) continue;
    span.parent.children = span.parent.children.filter((child) => child !== span);
    span.parent = null;
    roots.push(span);
    walk(span);
  }

  // A loop, not Math.min(...spans): spreading a very large trace overflows the call stack.
  let start = spans.length ? Infinity : 0;
  let end = spans.length ? -Infinity : 0;
  for (const span of spans) {
    start = Math.min(start, span.start);
    end = Math.max(end, span.end);
  }
  return {
    id: json.traceID,
    spans: ordered,
    byId,
    roots,
    root: roots[0] ?? null,
    start,
    end,
    duration: Math.max(0, end - start),
    services: [...new Set(ordered.map((span) => span.service))],
    errors: ordered.filter((span) => span.isError),
  };
}

/**
 * Jaeger's critical path: the chain of work that decided when the root finished.
 *
 * Start at the root, explaining time back from its end. Pick the child that finished last
 * among the children that finished by then; the parent alone is on the path after that child
 * ended, and the child now has to be explained from its own end. A span with no such child is
 * on the path from its own start; the walk then returns to the parent, which is explained
 * back from that child's start: an earlier child that ended before it started (sequential
 * work) is next on the path. Returns the spans on the path and, per span, the time sections
 * [start, end] in which it was the critical one.
 */
export function criticalPath(trace) {
  const spans = new Set();
  const sections = new Map();
  const root = trace.root;
  if (!root) return { spans, sections };
  const addSection = (span, from, to) => {
    spans.add(span.id);
    if (to > from) sections.set(span.id, [...(sections.get(span.id) ?? []), [from, to]]);
  };
  const lastFinishing = (span, bound, inclusive) => {
    let best = null;
    for (const child of span.children) {
      const fits = inclusive ? child.end <= bound : child.end < bound;
      if (fits && (!best || child.end > best.end)) best = child;
    }
    return best;
  };

  let span = root;
  let bound = root.end;
  // Going down, a child may end exactly with its parent; going back up, only strictly before
  // the child we came from started, so every step moves earlier and the walk ends.
  let descending = true;
  while (span) {
    const child = lastFinishing(span, bound, descending);
    if (child) {
      addSection(span, child.end, bound);
      span = child;
      bound = child.end;
      descending = true;
    } else {
      addSection(span, span.start, bound);
      if (span === root || !span.parent) break;
      bound = span.start;
      span = span.parent;
      descending = false;
    }
  }
  return { spans, sections };
}
