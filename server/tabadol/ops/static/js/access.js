// The Access page: who may call which service, the requests waiting for an answer, and (for
// operators and auditors) the registry's audit trail. Every change goes to the server's
// access desk, which judges it again; a refusal's message is shown as the server wrote it.

import { accessActions, fetchAccess, fetchAudit, fetchWhoami } from './api.js';
import { h } from './dom.js';
import { clearError, reportError } from './shell.js';

const STATES = {
  pending: 'pending',
  awaiting_operator: 'awaiting an operator',
  approved: 'approved',
  rejected: 'rejected',
  withdrawn: 'withdrawn',
};
const VERBS = { approve: 'Approve', reject: 'Reject', withdraw: 'Withdraw', revoke: 'Revoke' };
// The changes that need a reason, and how the reason field asks for it.
const REASONS = { reject: 'Reason for rejecting', revoke: 'Reason for revoking', withdraw: 'Reason (optional)' };

function when(iso) {
  if (!iso) return h('span', { class: 'muted' }, 'never');
  const date = new Date(iso);
  return h('time', { datetime: iso, title: iso }, date.toLocaleString());
}

function purpose(row) {
  return h('td', { class: 'purpose' }, row.purpose || h('span', { class: 'muted' }, '(none given)'),
    row.reference ? h('div', { class: 'reference muted' }, row.reference) : null);
}

/** The local datetime-local value as an ISO time with its offset, or '' when empty. */
function isoOf(value) {
  return value ? new Date(value).toISOString() : '';
}

/** A row's buttons; reject, revoke and withdraw first ask for a reason in the row itself. */
function actionCell(kind, row, act) {
  const cell = h('td', { class: 'row-actions' });
  const buttons = () => row.actions.map((action) => h('button', {
    type: 'button',
    class: action === 'approve' ? 'small' : 'small danger',
    dataset: { action },
    'aria-label': `${VERBS[action]} ${kind} ${row.id}`,
    onclick: () => (REASONS[action] ? askReason(action) : act(action, row.id, {})),
  }, VERBS[action]));
  const askReason = (action) => {
    const reason = h('input', {
      type: 'text', name: 'reason', 'aria-label': `${REASONS[action]} ${row.id}`,
      placeholder: REASONS[action], required: action !== 'withdraw', maxlength: 2000,
    });
    const form = h('form', { class: 'reason-form', dataset: { action } },
      reason,
      h('button', { type: 'submit', class: 'small danger' }, VERBS[action]),
      h('button', { type: 'button', class: 'small secondary', onclick: () => cell.replaceChildren(...buttons()) }, 'Cancel'));
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      act(action, row.id, { reason: reason.value });
    });
    cell.replaceChildren(form);
    reason.focus();
  };
  cell.append(...buttons());
  return cell;
}

function requestsTable(requests, act) {
  if (!requests.length) return h('p', { class: 'empty' }, 'No access requests.');
  return h('table', { class: 'data-table access-table requests-table' },
    h('caption', {}, 'Access requests, newest first'),
    h('thead', {}, h('tr', {},
      ['Request', 'Consumer', 'Service', 'Methods', 'Purpose', 'Expires', 'State', ''].map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, requests.map((r) => h('tr', { dataset: { request: r.id, state: r.state } },
      h('th', { scope: 'row' }, h('code', {}, r.id), h('div', { class: 'muted' }, when(r.requestedAt))),
      h('td', {}, r.consumer),
      h('td', {}, h('code', {}, r.service), h('div', { class: 'muted' }, `by ${r.provider || '?'}`)),
      h('td', {}, r.methods.join(', ')),
      purpose(r),
      h('td', {}, when(r.expiresAt)),
      h('td', {}, h('span', { class: `state state-${r.state}` }, STATES[r.state] ?? r.state),
        r.reason ? h('div', { class: 'muted' }, r.reason) : null,
        r.grant ? h('div', { class: 'muted' }, 'grant ', h('code', {}, r.grant)) : null),
      actionCell('request', r, act)))));
}

function grantsTable(grants, act) {
  if (!grants.length) return h('p', { class: 'empty' }, 'No grants.');
  return h('table', { class: 'data-table access-table grants-table' },
    h('caption', {}, 'Grants in force'),
    h('thead', {}, h('tr', {},
      ['Grant', 'Consumer', 'Service', 'Methods', 'Purpose', 'Expires', 'Granted by', ''].map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, grants.map((g) => h('tr', { dataset: { grant: g.id, consumer: g.consumer, service: g.service } },
      h('th', { scope: 'row' }, h('code', {}, g.id)),
      h('td', {}, g.consumer),
      h('td', {}, h('code', {}, g.service), h('div', { class: 'muted' }, `by ${g.provider || '?'}`)),
      h('td', {}, g.methods.join(', ')),
      purpose(g),
      h('td', {}, when(g.expiresAt), g.expired ? h('span', { class: 'error-pill' }, 'expired') : null),
      h('td', {}, g.grantedBy ? h('code', {}, g.grantedBy) : h('span', { class: 'muted' }, 'the configuration'),
        g.grantedAt ? h('div', { class: 'muted' }, when(g.grantedAt)) : null),
      actionCell('grant', g, act)))));
}

function field(label, input, hint) {
  return h('div', { class: 'field' }, h('label', {}, label, input), hint ? h('p', { class: 'hint' }, hint) : null);
}

/** The request form (an agency asks a provider) or the grant form (a provider or operator grants). */
function accessForm(kind, data, viewer, submit) {
  const mine = (s) => s.provider === viewer.name;
  const services = kind === 'request'
    ? data.services.filter((s) => !mine(s))
    : data.services.filter((s) => viewer.role === 'operator' || mine(s));
  if (!services.length) return null;
  const service = h('select', { name: 'service', required: true },
    services.map((s) => h('option', { value: s.name }, `${s.name} (${s.provider})${s.sensitive ? ' · sensitive' : ''}`)));
  const consumer = h('select', { name: 'consumer', required: true },
    data.agencies.map((a) => h('option', { value: a.id }, `${a.id} (${a.name})`)));
  const methods = h('input', { type: 'text', name: 'methods', required: true, placeholder: 'Lookup, Verify or *' });
  const text = h('textarea', { name: 'purpose', required: true, rows: 2, maxlength: 2000 });
  const reference = h('input', { type: 'text', name: 'reference', maxlength: 200, placeholder: 'e.g. Postal Act art. 12' });
  const expires = h('input', { type: 'datetime-local', name: 'expiresAt' });
  const form = h('form', { class: 'access-form', dataset: { form: kind } },
    h('h2', {}, kind === 'request' ? 'Request access' : 'Grant access'),
    kind === 'grant' ? field('Consumer', consumer) : null,
    field('Service', service),
    field('Methods', methods, 'Method names separated by commas, or * for every method.'),
    field('Purpose', text, 'The legal basis of the access.'),
    field('Reference', reference, 'Optional: the law, article or agreement.'),
    field('Expires', expires, 'Optional: no call is admitted by the grant from then on.'),
    h('div', { class: 'form-actions' }, h('button', { type: 'submit' }, kind === 'request' ? 'Send request' : 'Grant')));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const body = {
      service: service.value,
      methods: methods.value.split(',').map((m) => m.trim()).filter(Boolean),
      purpose: text.value,
      reference: reference.value,
      expiresAt: isoOf(expires.value),
    };
    if (kind === 'grant') body.consumer = consumer.value;
    submit(body, form);
  });
  return form;
}

function auditTable(page) {
  if (!page.entries.length) return h('p', { class: 'empty' }, 'No registry versions yet.');
  return h('table', { class: 'data-table audit-table' },
    h('caption', {}, 'Registry versions, newest first'),
    h('thead', {}, h('tr', {},
      ['Version', 'When', 'Who', 'Why', 'What changed'].map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, page.entries.map((e) => h('tr', { dataset: { version: e.version } },
      h('th', { scope: 'row', class: 'num' }, e.version),
      h('td', {}, when(e.at)),
      h('td', {}, h('code', {}, e.actor)),
      h('td', { class: 'reason' }, e.reason),
      h('td', {}, h('ul', { class: 'changes' }, e.changes.map((c) => h('li', {}, h('code', {}, c)))))))));
}

async function auditSection(signal) {
  const body = h('div', { 'aria-busy': 'true' }, h('p', { class: 'loading' }, 'Loading…'));
  const section = h('section', { class: 'panel audit-panel', 'aria-labelledby': 'audit-heading' },
    h('h2', { id: 'audit-heading' }, 'Audit trail'),
    h('p', { class: 'muted' }, 'Every change to the registry: who made it, when, why and what it changed. ',
      'Versions are never edited; ', h('code', {}, 'tabadol registry verify'), ' checks their chain.'),
    body);
  const show = async (before) => {
    try {
      const page = await fetchAudit(before, signal);
      const oldest = page.entries.at(-1)?.version;
      const older = h('div', { class: 'pager' },
        h('button', { type: 'button', class: 'secondary', onclick: () => show(oldest) }, 'Older versions'));
      body.replaceChildren(auditTable(page), ...(page.more ? [older] : []));
    } catch (error) {
      if (signal.aborted) return;
      // A registry in the configuration file has no trail: the server says so, plainly.
      body.replaceChildren(h('p', { class: 'notice' }, error.message));
    } finally {
      body.removeAttribute('aria-busy');
    }
  };
  await show();
  return section;
}

export async function renderAccess(view, { signal }) {
  const status = h('p', { class: 'action-status', role: 'status' });
  const body = h('div', { class: 'access-body', 'aria-busy': 'true' }, h('p', { class: 'loading' }, 'Loading…'));
  view.append(h('div', { class: 'access-page' },
    h('div', { class: 'page-head' }, h('h1', {}, 'Access')),
    h('p', { class: 'muted' }, 'Who may call which service, and why. Each change here is a new registry version naming you; the brokers apply it within seconds.'),
    status,
    body));

  const viewer = await fetchWhoami(signal);

  const act = async (action, id, payload) => {
    clearError();
    try {
      const done = await accessActions[action](id, payload);
      status.textContent = `${VERBS[action]}: done (registry version ${done.registryVersion})` +
        (done.grant && action === 'approve' ? `; grant ${done.grant.id}` : '') + '.';
      await draw();
    } catch (error) {
      status.textContent = '';
      reportError(error, signal);
    }
  };
  const send = (kind) => async (payload, form) => {
    clearError();
    try {
      const done = await accessActions[kind](payload);
      const made = done.request ? `request ${done.request.id} (${STATES[done.request.state]})` : `grant ${done.grant?.id}`;
      status.textContent = `Sent: ${made}, registry version ${done.registryVersion}.`;
      form.reset();
      await draw();
    } catch (error) {
      status.textContent = '';
      reportError(error, signal);
    }
  };

  const grantsAndRequests = async () => {
    try {
      const data = await fetchAccess(signal);
      const forms = [viewer.role === 'agency' ? accessForm('request', data, viewer, send('request')) : null,
        accessForm('grant', data, viewer, send('grant'))].filter(Boolean);
      return [
        data.changeable ? '' : h('p', { class: 'notice read-only' },
          'This exchange’s registry is its configuration file: the console shows it, and refuses changes. ' +
          'Trying one says how to move the registry into a database.'),
        h('section', { class: 'panel', 'aria-labelledby': 'requests-heading' },
          h('h2', { id: 'requests-heading' }, 'Requests'), requestsTable(data.requests, act)),
        h('section', { class: 'panel', 'aria-labelledby': 'grants-heading' },
          h('h2', { id: 'grants-heading' }, 'Grants'), grantsTable(data.grants, act)),
        forms.length ? h('div', { class: 'access-forms' }, forms) : '',
      ];
    } catch (error) {
      reportError(error, signal);
      return [h('p', { class: 'empty' }, 'Grants and requests could not be loaded; see the message above.')];
    }
  };
  // Every change redraws the page with what the registry now says.
  const draw = async () => {
    body.setAttribute('aria-busy', 'true');
    const sections = viewer.may.includes('access') ? await grantsAndRequests() : [];
    if (viewer.may.includes('audit')) sections.push(await auditSection(signal));
    if (signal.aborted) return;
    body.replaceChildren(...sections);
    body.removeAttribute('aria-busy');
  };
  await draw();
}
