// The search page: filters on the left, one page of matching traces (newest first) on the right.
// Submitting the form only changes the URL; the page then renders from the URL, so a search can
// be shared and Back returns to the previous one.

import { fetchOperations, fetchServices, searchTraces } from './api.js';
import { h } from './dom.js';
import {
  GRPC_CODES, LOOKBACKS, PAGE_SIZE, filterParams, formatAttributes, parseAttributes, readFilters,
} from './filters.js';
import {
  formatDuration, fromDatetimeLocal, plural, serviceBadge, shortOperation, timeElement, toDatetimeLocal,
} from './format.js';
import { navigate, reportError, showError } from './shell.js';

function field(id, label, control, hint) {
  return h('div', { class: 'field' },
    h('label', { for: id }, label),
    control,
    hint && h('p', { class: 'hint', id: `${id}-hint` }, hint));
}

function option(value, label) {
  return h('option', { value }, label);
}

function buildForm(filters, signal) {
  const service = h('select', { id: 'f-service', name: 'service' }, option('', 'All services'));
  const operation = h('select', { id: 'f-operation', name: 'operation', disabled: !filters.service },
    option('', 'All operations'));
  const status = h('select', { id: 'f-status', name: 'status' },
    option('', 'Any'), option('ok', 'OK (no errors)'), option('error', 'Error (any failed span)'),
    h('optgroup', { label: 'gRPC status code' }, GRPC_CODES.map((code) => option(code, code))));
  const lower = filters.status.toLowerCase();
  status.value = lower === 'ok' || lower === 'error' ? lower : filters.status.toUpperCase();

  const minDuration = h('input', {
    id: 'f-min', name: 'minDuration', value: filters.minDuration, placeholder: 'e.g. 100ms',
    autocomplete: 'off', spellcheck: 'false',
  });
  const maxDuration = h('input', {
    id: 'f-max', name: 'maxDuration', value: filters.maxDuration, placeholder: 'e.g. 2s',
    autocomplete: 'off', spellcheck: 'false',
  });

  const lookback = h('select', { id: 'f-lookback', name: 'lookback' },
    LOOKBACKS.map(([value, label]) => option(value, label)), option('custom', 'Custom range'));
  lookback.value = filters.lookback;
  if (lookback.value !== filters.lookback) lookback.value = 'custom';
  const now = Date.now() * 1000;
  // Keep the exact µs from the URL while the (to-the-second) inputs are left alone, so
  // re-submitting a link from the dependency graph searches exactly the same window.
  const rangeInput = (id, name, us) => h('input', {
    id, name, type: 'datetime-local', step: '1',
    value: toDatetimeLocal(us), dataset: { us: String(us) },
  });
  const hourUs = 3_600_000_000;
  const start = rangeInput('f-start', 'start', Number(filters.start) || now - hourUs);
  const end = rangeInput('f-end', 'end', Number(filters.end) || now);
  const custom = h('div', { class: 'custom-range', hidden: lookback.value !== 'custom' },
    field('f-start', 'From', start), field('f-end', 'To', end));
  lookback.addEventListener('change', () => { custom.hidden = lookback.value !== 'custom'; });

  const attributes = h('input', {
    id: 'f-attributes', name: 'attributes', value: formatAttributes(filters.tags),
    placeholder: 'consumer=post provider=nocr', autocomplete: 'off', spellcheck: 'false',
    'aria-describedby': 'f-attributes-hint',
  });

  const loadOperations = async (selected) => {
    operation.replaceChildren(option('', 'All operations'));
    operation.disabled = !service.value;
    if (!service.value) return;
    try {
      const names = await fetchOperations(service.value, signal);
      operation.append(...names.map((name) => option(name, name)));
      if (selected && !names.includes(selected)) operation.append(option(selected, selected));
      operation.value = selected || '';
    } catch (error) {
      reportError(error, signal);
    }
  };
  service.addEventListener('change', () => loadOperations(''));

  (async () => {
    try {
      const names = await fetchServices(signal);
      service.append(...names.map((name) => option(name, name)));
      // A shared link may name a service that has no spans here (yet): keep it selectable.
      if (filters.service && !names.includes(filters.service)) service.append(option(filters.service, filters.service));
      service.value = filters.service;
      await loadOperations(filters.operation);
    } catch (error) {
      reportError(error, signal);
    }
  })();

  const form = h('form', { class: 'filters', 'aria-label': 'Search filters', novalidate: true },
    h('h2', {}, 'Find traces'),
    field('f-service', 'Service (agency)', service),
    field('f-operation', 'Operation (method)', operation),
    field('f-status', 'Status', status),
    h('fieldset', { class: 'pair' },
      h('legend', {}, 'Trace duration'),
      field('f-min', 'Min', minDuration),
      field('f-max', 'Max', maxDuration)),
    field('f-lookback', 'Time range', lookback),
    custom,
    field('f-attributes', 'Attributes', attributes,
      'Space-separated key=value pairs, e.g. consumer=post provider=nocr'),
    h('div', { class: 'form-actions' },
      h('button', { type: 'submit', class: 'primary' }, 'Find traces'),
      h('a', { href: '/search', class: 'button secondary' }, 'Clear')));

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    let tags = '';
    try {
      const parsed = parseAttributes(attributes.value);
      tags = Object.keys(parsed).length ? JSON.stringify(parsed) : '';
    } catch (error) {
      showError(error.message);
      attributes.focus();
      return;
    }
    const rangeUs = (input) => (input.value === toDatetimeLocal(Number(input.dataset.us))
      ? input.dataset.us : fromDatetimeLocal(input.value));
    const next = {
      service: service.value,
      operation: operation.value,
      status: status.value,
      minDuration: minDuration.value,
      maxDuration: maxDuration.value,
      lookback: lookback.value,
      start: lookback.value === 'custom' ? rangeUs(start) : '',
      end: lookback.value === 'custom' ? rangeUs(end) : '',
      tags,
      offset: 0,
    };
    navigate(`/search?${filterParams(next)}`);
  });
  return form;
}

function resultRow(trace, longest) {
  const href = `/trace/${trace.traceID}`;
  const row = h('tr', { class: trace.errorCount ? 'has-errors' : undefined, dataset: { traceId: trace.traceID } },
    h('td', { class: 'started' }, timeElement(trace.startTime)),
    h('td', { class: 'root' },
      h('a', { href, class: 'trace-link', title: `${trace.rootService}: ${trace.rootOperation}` },
        serviceBadge(trace.rootService),
        // A line may break after the slash of Service/Method, not in the middle of a word.
        h('span', { class: 'operation' }, shortOperation(trace.rootOperation).split('/')
          .flatMap((part, i) => (i ? ['/', h('wbr'), part] : [part])))),
      h('span', { class: 'trace-id' }, trace.traceID.slice(0, 12))),
    h('td', { class: 'duration num' },
      h('span', { class: 'duration-bar', style: { '--share': longest ? trace.duration / longest : 0 }, 'aria-hidden': 'true' }),
      formatDuration(trace.duration)),
    h('td', { class: 'num' }, trace.spanCount.toLocaleString()),
    h('td', { class: 'num' }, trace.errorCount
      ? h('span', { class: 'error-pill' }, plural(trace.errorCount, 'error'))
      : h('span', { class: 'muted' }, '0')),
    h('td', { class: 'services' }, trace.services.map(serviceBadge)));
  // The whole row opens the trace; the link inside stays the keyboard and middle-click path.
  row.addEventListener('click', (event) => {
    if (event.target.closest('a') || window.getSelection()?.toString()) return;
    navigate(href);
  });
  return row;
}

function renderResults(container, page, filters) {
  const { data, total } = page;
  const first = filters.offset + 1;
  const last = filters.offset + data.length;
  const goTo = (offset) => navigate(`/search?${filterParams({ ...filters, offset })}`);
  const pager = () => h('nav', { class: 'pager', 'aria-label': 'Result pages' },
    h('button', { type: 'button', disabled: filters.offset === 0, onclick: () => goTo(Math.max(0, filters.offset - PAGE_SIZE)) }, '← Newer'),
    h('span', { class: 'pager-range' }, data.length ? `${first}–${last} of ${total.toLocaleString()}` : ''),
    h('button', { type: 'button', disabled: last >= total, onclick: () => goTo(filters.offset + PAGE_SIZE) }, 'Older →'));

  const count = h('p', { class: 'result-count', role: 'status' }, plural(total, 'trace'));
  if (!data.length) {
    container.replaceChildren(count, total
      ? h('p', { class: 'empty' }, 'This page is past the last result. ',
        h('button', { type: 'button', class: 'link', onclick: () => goTo(0) }, 'Go to the first page'))
      : h('p', { class: 'empty' }, 'No traces match these filters. Try a longer time range or fewer filters.'));
    return;
  }
  const longest = Math.max(...data.map((trace) => trace.duration));
  // Native replaceChildren would print `false` for the missing pagers: drop them first.
  container.replaceChildren(...[
    h('div', { class: 'results-head' }, count, total > PAGE_SIZE && pager()),
    h('table', { class: 'results-table' },
      h('caption', { class: 'visually-hidden' }, 'Matching traces, newest first'),
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col', class: 'col-started' }, 'Started'),
        h('th', { scope: 'col' }, 'Root service & operation'),
        h('th', { scope: 'col', class: 'num col-duration' }, 'Duration'),
        h('th', { scope: 'col', class: 'num col-spans' }, 'Spans'),
        h('th', { scope: 'col', class: 'num col-errors' }, 'Errors'),
        h('th', { scope: 'col', class: 'col-services' }, 'Services'))),
      h('tbody', {}, data.map((trace) => resultRow(trace, longest)))),
    total > PAGE_SIZE && pager(),
  ].filter(Boolean));
}

export async function renderSearch(view, { signal, params }) {
  const filters = readFilters(params);
  const results = h('section', { class: 'results', 'aria-label': 'Results', 'aria-busy': 'true' },
    h('p', { class: 'loading' }, 'Searching…'));
  view.append(h('div', { class: 'search-page' }, buildForm(filters, signal), results));

  const query = filterParams(filters);
  query.set('limit', String(PAGE_SIZE));
  try {
    renderResults(results, await searchTraces(query, signal), filters);
  } catch (error) {
    results.replaceChildren(h('p', { class: 'empty' }, 'The search could not run; see the message above.'));
    reportError(error, signal);
  } finally {
    results.removeAttribute('aria-busy');
  }
}
