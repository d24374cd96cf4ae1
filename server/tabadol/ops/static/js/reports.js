// The quarterly reports: one row per Solar Hijri quarter, with the report as a page and as
// CSV and JSON. The server builds each report from the ledger when it is asked for.

import { fetchReports, reportUrl } from './api.js';
import { h } from './dom.js';
import { isNoLedger, noLedgerNotice } from './ledger.js';
import { reportError } from './shell.js';

/** Visible text plus the quarter for screen readers: every row has an "Open report" link. */
const label = (text, quarter) => [text, h('span', { class: 'visually-hidden' }, ` for ${quarter}`)];

function quarterRow({ quarter, months, period }, current) {
  const file = `quarterly-${quarter}`;
  return h('tr', { dataset: { quarter } },
    h('th', { scope: 'row' }, h('span', { class: 'quarter-code' }, quarter),
      current ? h('span', { class: 'current-pill' }, 'current') : null),
    h('td', {}, months),
    h('td', { class: 'period' }, period),
    h('td', { class: 'report-links' },
      // A page the server renders, not one of the viewer's routes: the browser loads it whole.
      h('a', { class: 'button small', href: reportUrl(quarter, 'html') }, label('Open report', quarter)),
      h('a', { class: 'button secondary small', href: reportUrl(quarter, 'csv'), download: `${file}.csv` }, label('CSV', quarter)),
      h('a', { class: 'button secondary small', href: reportUrl(quarter, 'json'), download: `${file}.json` }, label('JSON', quarter))));
}

function quartersTable(quarters) {
  return h('table', { class: 'data-table reports-table' },
    h('caption', {}, 'Solar Hijri quarters, newest first'),
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, 'Quarter'),
      h('th', { scope: 'col' }, 'Months'),
      h('th', { scope: 'col' }, 'Period (Solar Hijri and Gregorian)'),
      h('th', { scope: 'col' }, 'Report'))),
    h('tbody', {}, quarters.map((q, i) => quarterRow(q, i === 0))));
}

export async function renderReports(view, { signal }) {
  const body = h('div', { class: 'reports-body', 'aria-busy': 'true' }, h('p', { class: 'loading' }, 'Loading…'));
  view.append(h('div', { class: 'reports-page' },
    h('div', { class: 'page-head' }, h('h1', {}, 'Quarterly reports')),
    h('p', { class: 'muted' },
      'The e-service assessment of each quarter, worked out from the broker’s ledger when you open it. ' +
      'A quarter runs from 00:00 Tehran time on its first day; the current one covers the days so far.'),
    body));
  try {
    const quarters = await fetchReports(signal);
    body.replaceChildren(quarters.length ? quartersTable(quarters) : h('p', { class: 'empty' }, 'No quarters to report on.'));
  } catch (error) {
    if (signal.aborted) return;
    if (isNoLedger(error)) {
      body.replaceChildren(noLedgerNotice(error));
      return;
    }
    body.replaceChildren(h('p', { class: 'empty' }, 'The reports could not be listed; see the message above.'));
    reportError(error, signal);
  } finally {
    body.removeAttribute('aria-busy');
  }
}
