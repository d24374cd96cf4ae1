// The dashboard: what the broker's ledger says about today (the day in Tehran), this Solar
// Hijri quarter and all time. It refreshes itself while it is the page on screen.

import { fetchDashboard } from './api.js';
import { h } from './dom.js';
import { formatDuration, formatPercent, plural, serviceColour, timeElement } from './format.js';
import { isNoLedger, noLedgerNotice } from './ledger.js';
import { clearError, reportError } from './shell.js';

export const REFRESH_MS = 30_000;

const count = (n) => n.toLocaleString();

function tile(id, label, value, note, tone) {
  const labelId = `tile-${id}-label`;
  return h('div', { class: tone ? `tile ${tone}` : 'tile', role: 'group', 'aria-labelledby': labelId, dataset: { tile: id } },
    h('div', { class: 'tile-label', id: labelId }, label),
    h('div', { class: 'tile-value' }, value),
    h('div', { class: 'tile-note' }, note));
}

function tiles(d) {
  const { agencies, transactions } = d;
  const rate = d.errorRateToday;
  return h('div', { class: 'tiles' },
    tile('transactions-today', 'Transactions today', count(transactions.today), 'since 00:00 Tehran time'),
    tile('transactions-quarter', `Transactions in ${d.quarter}`, count(transactions.quarter), d.quarterPeriod),
    tile('transactions-all-time', 'Transactions all time', count(transactions.allTime), 'every call in the ledger'),
    tile('agencies-registered', 'Agencies registered', count(agencies.registered), 'in the broker’s configuration'),
    tile('agencies-active', 'Agencies active today', count(agencies.activeToday),
      `of ${count(agencies.registered)} registered, as consumer or provider`),
    tile('error-rate', 'Error rate today', rate === null ? '–' : formatPercent(rate),
      rate === null ? 'no calls yet today' : 'calls that ended with a gRPC error', rate ? 'has-errors' : null),
    // Calls from certificates the broker could not identify: counted apart from every figure.
    tile('refused-unidentified', 'Refused before identification today',
      count(d.refusedBeforeIdentification ? d.refusedBeforeIdentification.today : 0),
      'revoked, expired or foreign certificates; in no figure above',
      d.refusedBeforeIdentification && d.refusedBeforeIdentification.today ? 'has-errors' : null),
    // Calls from identified agencies the configuration does not declare: counted apart too.
    tile('undeclared', 'From agencies not in the registry today',
      count(d.fromUndeclaredAgencies ? d.fromUndeclaredAgencies.today : 0),
      'agencies the broker’s configuration does not declare; in no figure above',
      d.fromUndeclaredAgencies && d.fromUndeclaredAgencies.today ? 'has-errors' : null));
}

function topList(id, title, rows) {
  const headingId = `${id}-heading`;
  const most = Math.max(1, ...rows.map((r) => r.calls));
  return h('section', { class: 'panel', 'aria-labelledby': headingId },
    h('h2', { id: headingId }, title),
    rows.length
      ? h('ol', { class: 'top-list', 'aria-labelledby': headingId }, rows.map((row) => h('li', { dataset: { agency: row.agency } },
        // "(refused identity)" stands for callers the broker could not identify, not an agency.
        h('span', { class: row.agency.startsWith('(') ? 'top-name muted' : 'top-name' }, row.agency),
        h('span', { class: 'top-bar', 'aria-hidden': 'true' },
          h('span', { style: { width: `${(100 * row.calls) / most}%`, background: serviceColour(row.agency) } })),
        h('span', { class: 'top-count num' }, plural(row.calls, 'call')))))
      : h('p', { class: 'empty' }, 'No calls yet today.'));
}

const ms = (value) => formatDuration(value === undefined ? NaN : value * 1000);

function latencyTable(rows) {
  if (!rows.length) {
    return h('section', { class: 'panel' }, h('h2', {}, 'Latency by service today'), h('p', { class: 'empty' }, 'No calls yet today.'));
  }
  return h('table', { class: 'data-table latency-table' },
    h('caption', {}, 'Latency by service today'),
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, 'Service'),
      h('th', { scope: 'col', class: 'num' }, 'Calls'),
      h('th', { scope: 'col', class: 'num' }, 'p50'),
      h('th', { scope: 'col', class: 'num' }, 'p95'),
      h('th', { scope: 'col', class: 'num' }, 'p99'))),
    h('tbody', {}, rows.map((row) => h('tr', { dataset: { service: row.service } },
      h('th', { scope: 'row' }, row.service),
      h('td', { class: 'num' }, count(row.calls)),
      h('td', { class: 'num' }, ms(row.p50Ms)),
      h('td', { class: 'num' }, ms(row.p95Ms)),
      h('td', { class: 'num' }, ms(row.p99Ms))))));
}

function figures(d) {
  return [
    tiles(d),
    h('div', { class: 'top-lists' },
      topList('top-consumers', 'Top consumers today', d.topConsumers),
      topList('top-providers', 'Top providers today', d.topProviders)),
    latencyTable(d.latencyByService),
  ];
}

export async function renderDashboard(view, { signal }) {
  const updated = h('span', { class: 'updated muted' });
  const refresh = h('button', { type: 'button', class: 'secondary' }, 'Refresh');
  const body = h('div', { class: 'dashboard-body', 'aria-busy': 'true' }, h('p', { class: 'loading' }, 'Loading…'));
  view.append(h('div', { class: 'dashboard-page' },
    h('div', { class: 'page-head' },
      h('h1', {}, 'Dashboard'),
      h('div', { class: 'inline-field' }, updated, refresh)),
    h('p', { class: 'muted' }, 'Calls accounted for in the broker’s ledger. “Today” is the day in Tehran; the figures refresh every 30 seconds.'),
    body));

  let shown = false;
  let inFlight = null;
  async function load() {
    // A newer load (the Refresh button, the timer) replaces one still waiting for the server.
    inFlight?.abort();
    const controller = new AbortController();
    inFlight = controller;
    const request = AbortSignal.any([signal, controller.signal]);
    body.setAttribute('aria-busy', 'true');
    try {
      const data = await fetchDashboard(request);
      body.replaceChildren(...figures(data));
      updated.replaceChildren('Updated ', timeElement(Date.parse(data.generated) * 1000));
      shown = true;
      clearError(); // a refresh that works again ends the last one's complaint
    } catch (error) {
      if (request.aborted) return;
      if (isNoLedger(error)) {
        body.replaceChildren(noLedgerNotice(error));
        updated.replaceChildren();
        shown = false;
        return;
      }
      // A failed refresh keeps the last figures on screen; the banner says why they are old.
      if (!shown) body.replaceChildren(h('p', { class: 'empty' }, 'The dashboard could not be loaded; see the message above.'));
      reportError(error, request);
    } finally {
      if (inFlight === controller) body.removeAttribute('aria-busy');
    }
  }

  let timer = null;
  const schedule = () => {
    clearInterval(timer);
    // A hidden tab skips its refreshes instead of polling the server for nobody.
    timer = setInterval(() => document.hidden || load(), REFRESH_MS);
  };
  refresh.addEventListener('click', () => {
    schedule(); // the next automatic refresh comes a full interval after this one
    load();
  });
  if (signal.aborted) return;
  signal.addEventListener('abort', () => clearInterval(timer), { once: true });
  schedule();
  await load();
}
