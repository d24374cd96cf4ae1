// The trace page: a header about the whole trace, then the waterfall (one row per span,
// indented by depth, bars placed on the trace's time axis) with the selected span's details
// opened under its row.

import { ApiError, fetchTrace, traceJsonUrl } from './api.js';
import { h } from './dom.js';
import { GRPC_CODES } from './filters.js';
import {
  formatDuration, plural, serviceBadge, serviceColour, shortOperation, swatch, timeElement,
} from './format.js';
import { reportError } from './shell.js';
import { buildTrace, criticalPath } from './spantree.js';

const GRPC_CODE_NAMES = ['OK', ...GRPC_CODES];
const TICKS = [0, 0.25, 0.5, 0.75, 1];

function displayValue(value) {
  if (value === null || value === undefined) return '';
  return typeof value === 'object' ? JSON.stringify(value) : String(value);
}

function keyValueTable(caption, pairs) {
  if (!pairs.length) return h('p', { class: 'muted' }, `No ${caption.toLowerCase()}.`);
  return h('table', { class: 'kv' },
    h('caption', { class: 'visually-hidden' }, caption),
    h('tbody', {}, pairs.map(({ key, value }) => h('tr', {},
      h('th', { scope: 'row' }, key),
      h('td', {}, displayValue(value))))));
}

/** Copy with the async clipboard API; fall back to execCommand where that API is missing. */
async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // No clipboard API (insecure context) or permission refused: the old way still works.
  }
  const area = h('textarea', { readonly: true, style: { position: 'fixed', top: '0', opacity: '0' } });
  area.value = text;
  document.body.append(area);
  area.select();
  try {
    return document.execCommand('copy');
  } catch {
    return false;
  } finally {
    area.remove();
  }
}

function copyButton(text, idElement) {
  const status = h('span', { class: 'copy-status', role: 'status' });
  let timer;
  const button = h('button', {
    type: 'button',
    class: 'secondary small',
    onclick: async () => {
      const copied = await copyText(text);
      if (!copied) window.getSelection()?.selectAllChildren(idElement); // ready for Ctrl+C
      status.textContent = copied ? 'Copied' : 'Press Ctrl+C to copy';
      clearTimeout(timer);
      timer = setTimeout(() => { status.textContent = ''; }, 2500);
    },
  }, 'Copy ID');
  return [button, status];
}

function traceHeader(trace) {
  const root = trace.root;
  const idElement = h('code', { class: 'trace-id-value' }, trace.id);
  const meta = (term, ...value) => h('div', {}, h('dt', {}, term), h('dd', {}, ...value));
  return h('header', { class: 'trace-header' },
    h('h1', {}, serviceBadge(root.service), ' ', h('span', { class: 'operation' }, root.operation)),
    h('dl', { class: 'trace-meta' },
      meta('Started', timeElement(trace.start)),
      meta('Duration', formatDuration(trace.duration)),
      meta('Spans', trace.spans.length.toLocaleString()),
      meta('Errors', trace.errors.length
        ? h('span', { class: 'error-pill' }, plural(trace.errors.length, 'error'))
        : '0'),
      meta('Services', h('span', { class: 'badges' }, trace.services.map(serviceBadge)))),
    h('div', { class: 'trace-id-row' },
      h('span', { class: 'label' }, 'Trace ID'), idElement, ...copyButton(trace.id, idElement),
      h('a', {
        class: 'button secondary small', href: traceJsonUrl(trace.id), download: `trace-${trace.id}.json`,
      }, 'Download JSON')));
}

function spanDetails(span, trace, onClose) {
  const item = (term, ...value) => h('div', {}, h('dt', {}, term), h('dd', {}, ...value));
  const grpcName = GRPC_CODE_NAMES[Number(span.grpcCode)];
  const status = h('span', {},
    h('span', { class: span.isError ? 'status status-error' : 'status' }, span.statusCode),
    span.statusMessage && h('span', { class: 'status-message' }, ` ${span.statusMessage}`),
    span.grpcCode !== undefined && h('span', { class: 'muted' },
      ` · gRPC ${span.grpcCode}${grpcName ? ` ${grpcName}` : ''}`));
  const tags = [...span.tags].sort((a, b) => a.key.localeCompare(b.key));
  const events = span.logs.length
    ? h('table', { class: 'events' },
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Time'), h('th', { scope: 'col' }, 'Event'), h('th', { scope: 'col' }, 'Fields'))),
      h('tbody', {}, span.logs.map((log) => {
        const fields = log.fields ?? [];
        const name = fields.find((f) => f.key === 'event')?.value ?? '';
        return h('tr', {},
          h('td', {}, timeElement(log.timestamp),
            h('span', { class: 'muted' }, ` +${formatDuration(log.timestamp - span.start)}`)),
          h('td', {}, displayValue(name)),
          h('td', {}, fields.filter((f) => f.key !== 'event')
            .map((f) => h('div', {}, h('span', { class: 'field-key' }, f.key), ' = ', displayValue(f.value)))));
      })))
    : h('p', { class: 'muted' }, 'No events.');

  return [
    h('div', { class: 'details-head' },
      h('h2', {}, serviceBadge(span.service), ' ', span.operation),
      h('button', { type: 'button', class: 'close', 'aria-label': 'Close span details', onclick: onClose }, '×')),
    span.warnings.length > 0 && h('ul', { class: 'warnings' }, span.warnings.map((w) => h('li', {}, w))),
    h('dl', { class: 'details-grid' },
      item('Service', span.service),
      h('div', { class: 'wide' }, h('dt', {}, 'Operation'), h('dd', {}, span.operation)),
      item('Kind', span.kind),
      item('Span ID', h('code', {}, span.id)),
      item('Parent ID', span.parentId ? h('code', {}, span.parentId) : '— (root span)'),
      item('Start', timeElement(span.start),
        h('span', { class: 'muted' }, ` (+${formatDuration(span.start - trace.start)} into the trace)`)),
      item('Duration', formatDuration(span.duration)),
      h('div', { class: 'full' }, h('dt', {}, 'Status'), h('dd', {}, status))),
    h('div', { class: 'details-columns' },
      h('div', {}, h('h3', {}, `Attributes (${tags.length})`), keyValueTable('Attributes', tags)),
      h('div', {},
        h('h3', {}, `Events (${span.logs.length})`), events,
        h('h3', {}, 'Process'),
        keyValueTable('Process tags', [{ key: 'service.name', value: span.process.serviceName }, ...(span.process.tags ?? [])]))),
  ];
}

/** The waterfall and everything that changes it: collapsed subtrees, selection, critical path. */
class Waterfall {
  constructor(trace) {
    this.trace = trace;
    this.critical = criticalPath(trace);
    this.collapsed = new Set();
    this.selected = null;
    this.position = new Map(trace.spans.map((span, i) => [span, i]));
    this.rows = new Map();
    this.details = h('section', { class: 'span-details', id: 'span-details', hidden: true, 'aria-label': 'Span details' });
    this.rowList = h('div', { class: 'span-rows' }, trace.spans.map((span) => this.row(span)));
    this.element = h('div', { class: 'waterfall show-critical' }, this.ruler(), this.rowList);
  }

  at(us) {
    return `${((us - this.trace.start) / (this.trace.duration || 1)) * 100}%`;
  }

  ruler() {
    return h('div', { class: 'waterfall-head', 'aria-hidden': 'true' },
      h('div', { class: 'span-name' }, 'Service & operation'),
      h('div', { class: 'span-timeline ruler' }, TICKS.map((f) => h('span', {
        class: 'tick', style: { left: `${f * 100}%` },
      }, formatDuration(this.trace.duration * f)))));
  }

  row(span) {
    const colour = serviceColour(span.service);
    const sections = (this.critical.sections.get(span.id) ?? []).map(([from, to]) => h('span', {
      class: 'critical-section',
      style: {
        left: `${((from - span.start) / (span.duration || 1)) * 100}%`,
        width: `${((to - from) / (span.duration || 1)) * 100}%`,
      },
    }));
    // Right of the bar; the timeline keeps a margin on its right for the longest bars' labels.
    const barLabel = h('span', { class: 'bar-label', style: { left: `calc(${this.at(span.end)} + 6px)` } },
      formatDuration(span.duration));

    const toggle = span.children.length
      ? h('button', { type: 'button', class: 'toggle', 'aria-expanded': 'true', onclick: () => this.toggle(span) })
      : h('span', { class: 'toggle-spacer', 'aria-hidden': 'true' });
    const label = h('button', {
      type: 'button', class: 'span-label', 'aria-expanded': 'false', 'aria-controls': 'span-details',
      title: `${span.service}: ${span.operation}`,
    },
    swatch(span.service),
    h('span', { class: 'service' }, span.service),
    h('span', { class: 'operation' }, shortOperation(span.operation)),
    span.isError && h('span', { class: 'error-mark', title: 'Error' }, '!', h('span', { class: 'visually-hidden' }, ' (error)')),
    h('span', { class: 'critical-mark', title: 'On the critical path' }, h('span', { class: 'visually-hidden' }, ' (critical path)')),
    h('span', { class: 'hidden-count' }));

    const classes = ['span-row'];
    if (span.isError) classes.push('is-error');
    if (this.critical.spans.has(span.id)) classes.push('on-critical-path');
    const row = h('div', {
      class: classes.join(' '), dataset: { spanId: span.id, service: span.service }, style: { '--depth': span.depth },
    },
    h('div', { class: 'span-name' }, toggle, label),
    h('div', { class: 'span-timeline' },
      h('div', {
        class: 'bar', style: { left: this.at(span.start), width: `${(span.duration / (this.trace.duration || 1)) * 100}%`, background: colour },
      }, sections),
      barLabel));
    row.addEventListener('click', (event) => {
      if (!event.target.closest('.toggle')) this.select(span === this.selected ? null : span);
    });
    this.rows.set(span, { row, toggle, label });
    this.updateToggle(span);
    return row;
  }

  updateToggle(span) {
    const { toggle, label } = this.rows.get(span);
    if (!span.children.length) return;
    const open = !this.collapsed.has(span);
    toggle.setAttribute('aria-expanded', String(open));
    toggle.setAttribute('aria-label', `${open ? 'Collapse' : 'Expand'} ${span.service} ${span.operation}`);
    toggle.textContent = open ? '▾' : '▸';
    label.querySelector('.hidden-count').textContent = open ? '' : `+${this.descendants(span)}`;
  }

  descendants(span) {
    let count = 0;
    for (let i = this.position.get(span) + 1; i < this.trace.spans.length && this.trace.spans[i].depth > span.depth; i += 1) count += 1;
    return count;
  }

  /** Hide every row inside a collapsed subtree: descendants follow their span in display order. */
  applyVisibility() {
    let hideDeeperThan = Infinity;
    for (const span of this.trace.spans) {
      if (span.depth <= hideDeeperThan) hideDeeperThan = Infinity;
      const hidden = span.depth > hideDeeperThan;
      this.rows.get(span).row.hidden = hidden;
      if (!hidden && this.collapsed.has(span)) hideDeeperThan = span.depth;
    }
    if (this.selected && this.rows.get(this.selected).row.hidden) this.select(null);
  }

  toggle(span) {
    if (this.collapsed.has(span)) this.collapsed.delete(span);
    else this.collapsed.add(span);
    this.updateToggle(span);
    this.applyVisibility();
  }

  setAllCollapsed(collapse) {
    this.collapsed = new Set(collapse ? this.trace.spans.filter((span) => span.children.length) : []);
    this.trace.spans.forEach((span) => this.updateToggle(span));
    this.applyVisibility();
  }

  /** Open every collapsed ancestor, so the span's row can be shown. */
  reveal(span) {
    for (let parent = span.parent; parent; parent = parent.parent) {
      if (this.collapsed.delete(parent)) this.updateToggle(parent);
    }
    this.applyVisibility();
  }

  select(span) {
    if (this.selected) {
      const { row, label } = this.rows.get(this.selected);
      row.classList.remove('selected');
      label.setAttribute('aria-expanded', 'false');
    }
    this.selected = span;
    const url = new URL(location.href);
    if (span) url.searchParams.set('span', span.id);
    else url.searchParams.delete('span');
    // The selected span is part of the address (shareable), but not a step for Back.
    history.replaceState(null, '', url);
    if (!span) {
      this.details.hidden = true;
      return;
    }
    const { row, label } = this.rows.get(span);
    row.classList.add('selected');
    label.setAttribute('aria-expanded', 'true');
    this.details.replaceChildren(...spanDetails(span, this.trace, () => {
      this.select(null);
      label.focus();
    }).filter(Boolean));
    this.details.setAttribute('aria-label', `Details of ${span.service} ${span.operation}`);
    row.after(this.details);
    this.details.hidden = false;
  }

  /** Select and show the span, e.g. for Jump to error or a ?span= link. */
  focusSpan(span) {
    this.reveal(span);
    this.select(span);
    const { row, label } = this.rows.get(span);
    row.scrollIntoView({ block: 'center' });
    label.focus({ preventScroll: true });
  }

  /** The first error after the selected span (display order), wrapping to the first one. */
  nextError() {
    const errors = this.trace.errors;
    const from = this.selected ? this.position.get(this.selected) : -1;
    return errors.find((span) => this.position.get(span) > from) ?? errors[0];
  }

  setShowCritical(show) {
    this.element.classList.toggle('show-critical', show);
  }
}

function toolbar(trace, waterfall) {
  const errorStatus = h('span', { class: 'jump-status', role: 'status' });
  const critical = h('button', {
    type: 'button', class: 'secondary', 'aria-pressed': 'true',
    title: 'Dark stripes on the bars mark the work that decided when the trace ended',
    onclick: () => {
      const show = critical.getAttribute('aria-pressed') !== 'true';
      critical.setAttribute('aria-pressed', String(show));
      waterfall.setShowCritical(show);
    },
  }, 'Show critical path');
  const counts = new Map();
  for (const span of trace.spans) counts.set(span.service, (counts.get(span.service) ?? 0) + 1);
  return h('div', { class: 'toolbar' },
    h('div', { class: 'toolbar-buttons' },
      h('button', { type: 'button', class: 'secondary', onclick: () => waterfall.setAllCollapsed(false) }, 'Expand all'),
      h('button', { type: 'button', class: 'secondary', onclick: () => waterfall.setAllCollapsed(true) }, 'Collapse all'),
      critical,
      h('button', {
        type: 'button',
        class: 'danger',
        disabled: !trace.errors.length,
        title: trace.errors.length ? undefined : 'This trace has no errors',
        onclick: () => {
          const span = waterfall.nextError();
          waterfall.focusSpan(span);
          errorStatus.textContent = `Error ${trace.errors.indexOf(span) + 1} of ${trace.errors.length}`;
        },
      }, 'Jump to error'),
      errorStatus),
    h('ul', { class: 'legend', 'aria-label': 'Services (bar colours)' }, trace.services.map((name) => h('li', {},
      swatch(name), h('span', { class: 'legend-name' }, name), h('span', { class: 'muted' }, ` ${counts.get(name)}`)))));
}

export async function renderTrace(view, traceId, { signal, params }) {
  view.append(h('p', { class: 'loading' }, 'Loading trace…'));
  let json;
  try {
    json = await fetchTrace(traceId, signal);
  } catch (error) {
    const missing = error instanceof ApiError && error.status === 404;
    view.replaceChildren(h('div', { class: 'empty-page' },
      h('h1', {}, missing ? 'Trace not found' : 'The trace could not be loaded'),
      missing && h('p', {}, 'It may not have arrived yet (spans are sent in batches) or retention may have removed it.'),
      h('p', {}, h('a', { href: '/search' }, 'Search for traces'))));
    reportError(error, signal);
    return;
  }
  const trace = buildTrace(json);
  document.title = `${trace.root.service}: ${trace.root.operation} · Tabadol ops`;
  const waterfall = new Waterfall(trace);
  view.replaceChildren(h('div', { class: 'trace-page' }, traceHeader(trace), toolbar(trace, waterfall), waterfall.element));
  const linked = trace.byId.get(params.get('span') ?? '');
  if (linked) waterfall.focusSpan(linked);
}
